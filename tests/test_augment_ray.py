"""The augment job on a local Ray, tiny family: exact quotas, resume, a killed actor, an OOM, bad files, s3://."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from prism_ray.data.storage import read_table, write_table
from prism_ray.distributed.rounds import ray_runner  # the runner of `prism-ray augment`
from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
from prism_ray.pipelines.augment import AugmentConfig, in_process
from prism_ray.pipelines.augment import run as augment_run
from prism_ray.results.layout import Layout
from prism_ray.results.summary import RunIncomplete

pytestmark = pytest.mark.slow
QUOTAS = {"effusion": 2, "devices": 2, "broken": 1}
S_CLIP_MIN = -1.0


def _with_bad_rows(manifest_uri: str, data_root: str) -> None:
    """Append a row whose PNG is missing and one whose PNG is corrupt (only `broken` selects them)."""
    table = read_table(manifest_uri)
    bad = table.slice(0, 2).to_pylist()
    corrupt = f"{data_root}/images/corrupt.png"
    with fsspec.open(corrupt, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a PNG")
    for row, (sid, uri) in zip(bad, [("missing", f"{data_root}/images/missing.png"), ("corrupt", corrupt)], strict=True):
        row.update(subject_id=sid, image_uri=uri, split="train")
        for label in ("Pleural Effusion", "Support Devices", "Cardiomegaly"):
            row[label] = 0.0
    write_table(pa.concat_tables([table, pa.Table.from_pylist(bad, schema=table.schema)]), manifest_uri)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("augment-data"))
    summary = write_phantom_dataset(root, PhantomDatasetConfig(n_subjects=48, resolution=64, seed=1))
    _with_bad_rows(summary.manifest_uri, root)
    return summary.manifest_uri


SUBGROUPS = [
    {"name": "effusion", "selector": {"Pleural Effusion": 1}, "interventions": ["Pleural Effusion=0"]},
    {"name": "devices", "selector": {"Support Devices": [1]}, "interventions": ["Support Devices=0"]},
    {"name": "broken", "selector": {"subject_id": ["missing", "corrupt"]}, "interventions": ["Fracture=1"]},
]


def augment(config: AugmentConfig, runner=ray_runner) -> dict:
    """The job; the `broken` subgroup can never meet its quota, so every run ends incomplete."""
    with pytest.raises(RunIncomplete, match="broken short by 1") as info:
        augment_run(config, runner=runner)
    return info.value.summary


def _config(tiny_family, manifest: str, output: str, planner: dict | None = None, **compute) -> AugmentConfig:
    return AugmentConfig.model_validate(
        {
            "model": {"path": str(tiny_family), "device": "cpu"},
            "data": {"manifest": manifest},
            "subgroups": [{**g, "quota": QUOTAS[g["name"]]} for g in SUBGROUPS],
            "inversion": {"num_inference_steps": 4, "num_inner_steps": 2},
            # Random tiny weights give S_CLIP ~ noise around 0 that flips with batch composition, so
            # this test accepts every edit (-1.0) and checks quotas, trimming of the over-provisioned
            # round, resume and faults; rejection bookkeeping is covered by tests/test_quota.py.
            "filter": {"s_clip_min": S_CLIP_MIN},
            "output": output,
            "planner": planner or {},
            "compute": {"batch_size": 2, **compute},
        }
    )


@pytest.fixture(scope="module")
def reference(tiny_family, manifest, tmp_path_factory):
    """The same job with the worker in this process (no Ray): the numbers the Ray runs must reproduce."""
    out = str(tmp_path_factory.mktemp("augment-ref") / "out")
    return augment(_config(tiny_family, manifest, out), runner=in_process), out


@pytest.fixture(scope="module")
def ray_run(ray_local, tiny_family, manifest, tmp_path_factory):
    """Two CPU actors over several small rounds; one batch raises an OOM once (retried), and one actor
    is killed once after writing a batch's PNGs and before its ledger part (Ray restarts it)."""
    out = tmp_path_factory.mktemp("augment-ray")
    env = {"PRISM_RAY_FAULTS": "step.start=oom,step.before_ledger=exit", "PRISM_RAY_FAULTS_ONCE": str(out / "faults")}
    config = _config(tiny_family, manifest, str(out / "out"), planner={"max_attempts_per_round": 3},
                     num_actors=2, env_vars=env)
    return config, augment(config), str(out / "out")


def _manifest(out: str) -> pa.Table:
    return read_table(Layout.of(out).manifest)


def _check_outputs(out: str, summary: dict) -> pa.Table:
    table = _manifest(out)
    rows = table.to_pylist()
    ids = [r["cf_id"] for r in rows]
    assert len(ids) == len(set(ids)) and len({r["slot_id"] for r in rows}) == len(rows)
    for name in ("effusion", "devices"):
        mine = [r for r in rows if r["subgroup"] == name and r["quota_status"] == "in_quota"]
        accepted = sum(r["accepted"] for r in mine)
        assert accepted == QUOTAS[name] == summary["subgroups"][name]["accepted"]
        # The quota set = the attempt order's prefix up to the quota-th accept: accepted + the rejects before it.
        assert len(mine) == accepted + summary["subgroups"][name]["rejected"]
        ranks = sorted(r["attempt_rank"] for r in mine)
        assert max(mine, key=lambda r: r["attempt_rank"])["accepted"]  # the prefix ends on an accept
        assert ranks == sorted(set(ranks))
        beyond = [r for r in rows if r["subgroup"] == name and r["quota_status"] == "beyond_quota"]
        assert all(r["attempt_rank"] > ranks[-1] for r in beyond)  # surplus is kept, after the prefix
        assert len(beyond) == summary["subgroups"][name]["beyond_quota"]
    assert all((r["s_clip"] >= S_CLIP_MIN) == r["accepted"] for r in rows)
    assert all(np.isfinite(r["reconstruction_error"]) and r["reconstruction_error"] > 0 for r in rows)
    broken = summary["subgroups"]["broken"]
    assert broken["status"] == "shortfall" and broken["shortfall"] == 1 and broken["accepted"] == 0
    # Every row's PNG exists and decodes at the model resolution; no PNG without a row.
    fs, root = fsspec.core.url_to_fs(out)
    on_disk = {p for p in fs.find(f"{root}/images")}
    assert on_disk == {fsspec.core.url_to_fs(r["image_uri"])[1] for r in rows}
    for r in rows:
        with fsspec.open(r["image_uri"], "rb") as f:
            image = np.asarray(Image.open(io.BytesIO(f.read())))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert not fs.exists(f"{root}/_ledger/rows") or not fs.find(f"{root}/_ledger/rows")
    return table


def test_in_process_worker_meets_quotas(reference):
    summary, out = reference
    _check_outputs(out, summary)
    assert summary["attempts_this_run"] >= sum(QUOTAS.values()) - QUOTAS["broken"]


def test_reconstruction_error_filter_rejects_every_edit_of_a_bad_inversion(tiny_family, manifest, tmp_path):
    """filter.reconstruction_error_max: an attempt whose source reconstructs worse than the bound is a
    reject (row kept, accepted False) even when S_CLIP passes; one round, one subgroup."""
    config = _config(tiny_family, manifest, str(tmp_path / "out"))
    rows = {}
    for bound in (None, 0.0):
        update = {
            "subgroups": config.subgroups[:1],
            "filter": config.filter.model_copy(update={"reconstruction_error_max": bound}),
            "planner": config.planner.model_copy(update={"max_rounds": 1}),
            "output": str(tmp_path / f"out-{bound}"),
        }
        try:
            augment_run(config.model_copy(update=update), runner=in_process)
        except RunIncomplete:
            assert bound == 0.0  # everything rejected: a shortfall, but every attempt has its row
        rows[bound] = _manifest(update["output"]).to_pylist()
    assert rows[None] and all(r["accepted"] for r in rows[None])  # S_CLIP >= -1 accepts everything
    assert rows[0.0] and not any(r["accepted"] for r in rows[0.0])  # every reconstruction error is > 0
    assert all(r["reconstruction_error"] > 0 for r in rows[0.0])


def test_ray_meets_quotas_exactly_despite_a_killed_actor(ray_run, reference):
    config, summary, out = ray_run
    table = _check_outputs(out, summary)
    faults = Path(config.compute.env_vars["PRISM_RAY_FAULTS_ONCE"])
    assert (faults / "step.before_ledger.fired").exists() and (faults / "step.start.fired").exists()
    actors = summary["actors"]
    assert actors["actor_restarts"] == 1 and actors["batch_retries"] == 2  # the lost actor's batch, the OOM's
    # Models are loaded once per actor for the whole job (the restarted actor loaded them once more).
    assert len(summary["rounds"]) >= 2 and actors["model_loads_per_actor"] == [1, 1]
    assert summary["error_rows"] == 2  # only the two bad files: neither fault became an error row
    ref = _manifest(reference[1])
    for name in ("effusion", "devices"):
        assert summary["subgroups"][name]["accepted"] == reference[0]["subgroups"][name]["accepted"]
    # Same slots got the same scores (deterministic ids; tolerance for thread-count-dependent kernels).
    ref_scores = dict(zip(ref.column("slot_id").to_pylist(), ref.column("s_clip").to_pylist(), strict=True))
    scores = zip(table.column("slot_id").to_pylist(), table.column("s_clip").to_pylist(), strict=True)
    common = [(s, v) for s, v in scores if s in ref_scores]
    assert common and all(abs(v - ref_scores[s]) < 1e-3 for s, v in common)
    assert summary["throughput"]["attempts_per_second"] > 0
    assert set(summary["actor_stage_seconds"]) >= {"read", "invert", "edit", "score", "write"}


def test_missing_and_corrupt_files_are_two_error_rows(ray_run):
    _, summary, out = ray_run
    errors = read_table(Layout.of(out).errors).to_pylist()
    assert len(errors) == 2 == summary["error_rows"]
    by_file = {Path(e["source_uri"]).name: e for e in errors}
    assert set(by_file) == {"missing.png", "corrupt.png"}
    assert all(e["stage"] == "read" and e["subgroup"] == "broken" for e in errors)
    assert "not found" in by_file["missing.png"]["reason"] and "corrupt" in by_file["corrupt.png"]["reason"]


def test_second_run_does_no_new_work(ray_run):
    config, first, out = ray_run
    before = _manifest(out)
    again = augment(config)
    assert again["rounds"] == [] and again["attempts_this_run"] == 0
    after = _manifest(out)
    assert after.column("cf_id").to_pylist() == before.column("cf_id").to_pylist()
    assert again["error_rows"] == first["error_rows"] == 2
    assert again["config_hash"] == first["config_hash"]


def test_s3_on_a_loopback_server(ray_local, tiny_family, tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",  # moto's fake credentials
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("prism-test")
        phantoms = PhantomDatasetConfig(n_subjects=8, resolution=64, seed=2)
        data = write_phantom_dataset("s3://prism-test/data", phantoms)
        config = AugmentConfig.model_validate(
            {
                "model": {"path": str(tiny_family), "device": "cpu"},
                "data": {"manifest": data.manifest_uri},
                "subgroups": [{"name": "all", "interventions": ["Fracture=1"], "quota": 1}],
                "inversion": {"num_inference_steps": 4, "num_inner_steps": 2},
                "filter": {"s_clip_min": -1.0},  # accept everything: one round, one source
                "planner": {"over_provision": 1.0, "initial_acceptance": 1.0},
                "output": "s3://prism-test/augment",
                "compute": {"num_actors": 1, "env_vars": env},
            }
        )
        summary = augment_run(config, runner=ray_runner)
        assert summary["subgroups"]["all"]["accepted"] == 1
        rows = read_table("s3://prism-test/augment/manifest.parquet").to_pylist()
        assert len(rows) == 1 and rows[0]["image_uri"].startswith("s3://prism-test/augment/images/all/")
        with fsspec.open(rows[0]["image_uri"], "rb") as f:
            assert np.asarray(Image.open(io.BytesIO(f.read()))).shape == (64, 64, 3)
        assert fs.exists("prism-test/augment/run_summary.json")
    finally:
        server.stop()


def test_cli_resolves_the_job_and_its_config():
    repo = Path(__file__).resolve().parents[1]
    config = repo / "configs" / "augment_tiny.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "prism_ray.cli", "augment", "--config", str(config)]
        + ["--set", "compute.num_actors=3", "--print-config"],
        capture_output=True,
        text=True,
        cwd=repo,
    )
    assert out.returncode == 0, out.stderr
    assert "num_actors: 3" in out.stdout and "name: effusion" in out.stdout


def test_samples_mode_writes_unfiltered_text_to_image_samples(tiny_family, tmp_path):
    """The "SD samples" control arm: N samples per subgroup prompt, seeded per sample, no filter."""
    config = AugmentConfig.model_validate(
        {
            "model": {"path": str(tiny_family), "device": "cpu"},
            "mode": "samples",
            "subgroups": [{"name": "cardio", "prompt": "Chest X-ray showing Cardiomegaly", "quota": 2}],
            "sampling": {"num_inference_steps": 3},
            "output": str(tmp_path / "samples"),
        }
    )
    summary = augment_run(config, runner=in_process)
    rows = _manifest(str(tmp_path / "samples")).to_pylist()
    assert summary["subgroups"]["cardio"]["accepted"] == 2 and len(rows) == 2
    assert all(r["accepted"] and r["edit_prompt"] == "Chest X-ray showing Cardiomegaly" for r in rows)
    assert len({r["sample_seed"] for r in rows}) == 2
    with fsspec.open(rows[0]["image_uri"], "rb") as f:
        assert np.asarray(Image.open(io.BytesIO(f.read()))).shape == (64, 64, 3)
