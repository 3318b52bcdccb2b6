"""The audit job in-process: planning, resuming, error accounting, and a planted co-change it must flag."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mounts import Mounts, fill

from prism_ray import faults
from prism_ray.config import ConfigError, build_config
from prism_ray.phantom.dataset import PhantomDatasetConfig, subject_attributes, write_phantom_dataset
from prism_ray.phantom.render import render_phantom
from prism_ray.pipelines import audit
from prism_ray.pipelines.augment import in_process
from prism_ray.pipelines.counterfactuals import Edited
from prism_ray.results.ledger import OutputWriteError
from prism_ray.scoring.audit_stats import COCHANGE_COLUMNS

RESOLUTION = 64  # the shipped classifier's input size


class PlantedEngine:
    """Edits that are the phantoms' true counterfactuals, except that do(Cardiomegaly=0) also removes
    the pacemaker: the hidden relationship the audit has to find. The control is the source itself."""

    vae_scale_factor = 8

    def __init__(self, ground_truth: dict[str, dict], fail: set[str] = frozenset()):
        self.truth = ground_truth
        self.fail = fail
        self.calls = 0

    def counterfactuals(self, pixels, tasks):
        self.calls += 1
        out, errors = [], []
        for i, (image, task) in enumerate(zip(pixels, tasks, strict=True)):
            name = Path(task["source_uri"]).name
            if name in self.fail:
                errors.append((i, "invert", "planted inversion failure"))
                continue
            gt = self.truth[name]
            attrs = subject_attributes(gt)
            edits = []
            for e in task["edits"]:
                change = {
                    "Cardiomegaly=0": {"cardiomegaly": False, "devices": attrs.devices - {"pacemaker"}},
                    "Cardiomegaly=1": {"cardiomegaly": True},
                    "Pleural Effusion=0": {"pleural_effusion": False},
                }[e["intervention"]]
                edits.append(render_phantom(attrs.intervene(change), int(gt["seed"]), RESOLUTION))
            edits = np.repeat(np.stack(edits)[..., None], 3, axis=-1)  # (K, R, R, 3)
            source = (
                image
                if image.shape[0] == RESOLUTION
                else np.repeat(render_phantom(attrs, int(gt["seed"]), RESOLUTION)[..., None], 3, axis=-1)
            )
            k = len(edits)
            scores = dict(
                s_clip=np.full(k, 0.2),
                clip_image_image=np.full(k, 0.9),
                clip_image_text=np.full(k, 0.3),
                l1=np.abs(edits.astype(float) - source).mean(axis=(1, 2, 3)) / 255,
                reconstruction_error=np.full(k, 1e-4),
                reconstruction_psnr=np.full(k, 35.0),
            )
            out.append(Edited(i, edits, scores, source=source, reconstruction=source))
        return out, errors


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("audit-data"))
    # Enough images with cardiomegaly + pacemaker that a real effect reaches q < 0.01.
    config = PhantomDatasetConfig(
        n_subjects=90, resolution=RESOLUTION, seed=11, p_cardiomegaly=0.5, p_pacemaker_given_cardiomegaly=0.9
    )
    summary = write_phantom_dataset(root, config)
    truth = {Path(r["image_uri"]).name: r for r in pq.read_table(summary.ground_truth_uri).to_pylist()}
    return summary.manifest_uri, truth


def make_config(manifest: str, output, **update) -> audit.AuditConfig:
    data = {
        "data": {"manifest": manifest},
        "classifiers": [{"path": "tiny"}],
        "interventions": ["Cardiomegaly=0", "Cardiomegaly=1", "Pleural Effusion=0"],
        "subgroups": ["Support Devices", ["Cardiomegaly", "Support Devices"]],
        "implied": {},
        "stats": {"bootstrap": 200},
        "output": str(output),
        "compute": {"batch_size": 8},
    }
    data.update(update)
    return build_config(audit.AuditConfig, data)


def run(config, engine, **env):
    faults.reset()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return audit.run(config, runner=lambda f, c, o: in_process(f, c, o, engine=engine))
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_audit_flags_a_planted_co_change_and_writes_its_outputs(dataset, tmp_path):
    manifest, truth = dataset
    summary = run(make_config(manifest, tmp_path / "out"), PlantedEngine(truth))
    out = tmp_path / "out"
    for name in (
        "rows.parquet",
        "errors.parquet",
        "cochange.parquet",
        "interventions.parquet",
        "summary.json",
        "report.html",
    ):
        assert (out / name).exists(), name
    rows = pq.read_table(out / "rows.parquet")
    # Every source gets every intervention that changes its caption: Cardiomegaly=0 or =1, and effusion
    # removal where it has one.
    n_effusion = sum(bool(t["pleural_effusion"]) for t in truth.values())
    assert rows.num_rows == len(truth) + n_effusion == summary["rows"]
    assert set(rows.column("intervention").to_pylist()) == {
        "Cardiomegaly=0",
        "Cardiomegaly=1",
        "Pleural Effusion=0",
    }
    assert {"p_orig__pacemaker", "p_ctrl__pacemaker", "p_cf__pacemaker", "group__Support Devices"} <= set(
        rows.column_names
    )
    cochange = pq.read_table(out / "cochange.parquet")
    assert cochange.column_names[: len(COCHANGE_COLUMNS)] == list(COCHANGE_COLUMNS)
    cells = {(r["intervention"], r["attribute"], r["subgroup"]): r for r in cochange.to_pylist()}
    planted = cells[("Cardiomegaly=0", "pacemaker", "all")]
    assert planted["flagged"] and not planted["expected"]
    assert planted["change_rate"] > 0.5 and planted["control_rate"] == 0.0 and planted["q_value"] < 0.01
    assert planted["ci_low"] > 0.3
    # The targets change as asked and are expected, never flagged; an untouched head is not flagged.
    target = cells[("Cardiomegaly=0", "cardiomegaly", "all")]
    assert target["expected"] and not target["flagged"] and target["change_rate"] > 0.9
    assert not cells[("Pleural Effusion=0", "pacemaker", "all")]["flagged"]
    flagged = {(f["intervention"], f["attribute"]) for f in summary["flagged"]}
    assert ("Cardiomegaly=0", "pacemaker") in flagged
    assert all(i == "Cardiomegaly=0" for i, _ in flagged), flagged
    # Subgroups: by Support Devices, and the combination.
    assert ("Cardiomegaly=0", "pacemaker", "Support Devices=true") in cells
    assert any(" & " in s for _, _, s in cells)
    # The report names the finding in words and embeds examples.
    html = (out / "report.html").read_text()
    assert "do(Cardiomegaly=0)" in html and "pacemaker" in html and "data:image/png;base64," in html
    saved = json.loads((out / "summary.json").read_text())
    assert saved["accounting"]["input_rows"] == 90 and saved["rows"] == rows.num_rows


def test_audit_resumes_after_a_crash_without_redoing_or_duplicating(dataset, tmp_path):
    manifest, truth = dataset
    config = make_config(manifest, tmp_path / "out", interventions=["Pleural Effusion=0"])
    engine = PlantedEngine(truth)
    # Killed after the second batch's ledger part: those rows are kept, nothing is compacted yet.
    with pytest.raises(faults.InjectedFault):
        run(config, engine, PRISM_RAY_FAULTS="audit.batch_done=interrupt@2")
    parts = list((tmp_path / "out" / "_ledger" / "rows").glob("*.parquet"))
    assert len(parts) == 2
    calls = engine.calls
    summary = run(config, engine)
    n_effusion = sum(bool(t["pleural_effusion"]) for t in truth.values())
    assert summary["rows"] == n_effusion
    assert summary["this_run"]["sources"] == n_effusion - 16  # two batches of 8 were finished
    rows = pq.read_table(tmp_path / "out" / "rows.parquet")
    assert len(set(rows.column("row_id").to_pylist())) == rows.num_rows == n_effusion
    # A third run finds everything done: no engine call, same tables.
    calls = engine.calls
    again = run(config, engine)
    assert engine.calls == calls and again["rows"] == n_effusion
    # Another configuration must not write into this folder.
    with pytest.raises(ValueError, match="another configuration"):
        run(make_config(manifest, tmp_path / "out", interventions=["Pleural Effusion=0"], seed=5), engine)


def test_bad_images_and_failed_inversions_become_error_rows(dataset, tmp_path):
    manifest, truth = dataset
    table = pq.read_table(manifest)
    uris = table.column("image_uri").to_pylist()
    Path(uris[0]).write_bytes(b"not a png")
    bad_manifest = tmp_path / "manifest.parquet"
    pq.write_table(table, bad_manifest)
    fail = {Path(uris[1]).name}
    try:
        summary = run(
            make_config(str(bad_manifest), tmp_path / "out", interventions=["Cardiomegaly=1"]),
            PlantedEngine(truth, fail=fail),
        )
    finally:
        Path(uris[0]).write_bytes(b"")  # the module's dataset is regenerated per module, but be tidy
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    stages = {Path(e["source_uri"]).name: e["stage"] for e in errors}
    assert stages.get(Path(uris[0]).name) == "read" or Path(uris[0]).name not in {
        Path(u).name for u, t in zip(uris, table.column("Cardiomegaly").to_pylist(), strict=True) if t == 0
    }
    a = summary["accounting"]
    assert a["input_rows"] == 90
    assert (
        a["input_rows"]
        == a["not_selected"] + a["duplicate_rows_collapsed"] + a["rows_with_errors"] + a["sources"]
    )
    no_cardio = sum(not t["cardiomegaly"] for t in truth.values())
    assert a["tasks"] == no_cardio
    assert (
        summary["rows"] + len({e["source_uri"] for e in errors if e["stage"] in ("read", "invert")})
        == no_cardio
    )


def test_config_errors_name_the_field(dataset, tmp_path):
    manifest, _ = dataset
    with pytest.raises(ValueError, match="Pacemaker"):
        make_config(manifest, tmp_path, interventions=["Pacemaker=0"])
    with pytest.raises(ValueError, match="targets: no target attribute for intervention 'Edema=1'"):
        make_config(manifest, tmp_path, interventions=["Edema=1"])
    with pytest.raises(ValueError, match="control"):
        make_config(manifest, tmp_path, interventions=["control"])


@pytest.mark.slow
def test_the_planner_handles_100k_sources_with_metadata_only(tmp_path):
    """100k manifest rows (no images are read to plan): one task per source with its applicable edits."""
    n = 100_000
    rng = np.random.default_rng(0)
    cardio = rng.random(n) < 0.3
    table = pa.table(
        {
            "image_uri": [f"s3://bucket/cxr/{i:06d}.png" for i in range(n)],
            "Cardiomegaly": cardio.astype(float),
            "Pleural Effusion": (rng.random(n) < 0.2).astype(float),
            "Support Devices": (rng.random(n) < 0.1).astype(float),
        }
    )
    pq.write_table(table, tmp_path / "big.parquet")
    config = make_config(
        str(tmp_path / "big.parquet"),
        tmp_path / "out",
        data={
            "manifest": str(tmp_path / "big.parquet"),
            "adapter": "chexpert",
            "adapter_options": {"labels": ["Cardiomegaly", "Pleural Effusion", "Support Devices"]},
        },
    )
    tracemalloc.start()
    start = time.perf_counter()
    tasks, errors, accounting = audit.plan_tasks(config, "hash")
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"planned {n} sources in {seconds:.1f}s, peak {peak / 2**20:.0f} MiB")
    assert len(tasks) == n and not errors
    assert accounting["planned_rows"] == n + int(table.column("Pleural Effusion").to_numpy().sum())
    # Metadata only: well under 2 kB per source at peak (images would be ~50-800 kB each).
    assert peak / n < 2048, peak / n


@pytest.mark.slow
def test_the_audit_runs_the_real_method_on_ray_actors(dataset, tmp_path, ray_local):
    """The tiny family's real inversion and editing on two long-lived Ray actors (short schedules)."""
    manifest, truth = dataset
    config = make_config(
        manifest, tmp_path / "out", interventions=["Cardiomegaly=1"], max_sources=6,
        model={"path": "tiny", "device": "cpu"},
        inversion={"num_inference_steps": 5, "num_inner_steps": 2, "learning_rate": 0.05, "batch_size": 2},
        compute={"num_actors": 2, "batch_size": 2, "num_cpus_per_actor": 1},
    )
    from prism_ray.distributed.rounds import ray_runner

    summary = audit.run(config, runner=ray_runner)
    n = summary["accounting"]["tasks"]
    assert 0 < n <= 6 and summary["rows"] == n and summary["error_rows"] == 0
    assert summary["actors"]["model_loads_per_actor"] == [1, 1]
    rows = pq.read_table(tmp_path / "out" / "rows.parquet").to_pylist()
    for row in rows:
        assert 0.0 <= row["p_cf__cardiomegaly"] <= 1.0 and row["s_clip"] is not None
        assert Path(row["image_uri"]).exists() and Path(row["control_uri"]).exists()
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


def test_a_corrected_copy_of_the_manifest_resumes_the_folder(dataset, tmp_path):
    """Issue 28.12: the manifest's name is not in the results hash; a task carries its row's content."""
    manifest, truth = dataset
    out = tmp_path / "out"
    first = run(make_config(manifest, out, interventions=["Pleural Effusion=0"]), PlantedEngine(truth))
    table = pq.read_table(manifest)
    with_effusion = [i for i, v in enumerate(table.column("Pleural Effusion").to_pylist()) if v == 1.0]
    drop, fix = with_effusion[:2]  # a bad row removed, another one's label corrected
    rows = table.to_pylist()
    rows[fix]["Support Devices"] = 1.0 - rows[fix]["Support Devices"]
    copy = tmp_path / "corrected.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:drop] + rows[drop + 1 :], schema=table.schema), copy)
    engine = PlantedEngine(truth)
    again = run(make_config(str(copy), out, interventions=["Pleural Effusion=0"]), engine)
    assert again["accounting"]["tasks"] == first["accounting"]["tasks"] - 1
    assert again["this_run"]["sources"] == 1 and engine.calls == 1  # only the corrected row is redone


def test_a_changed_filter_is_refused_on_resume_never_mixed(dataset, tmp_path):
    """Issue 26: every audit row stores `accepted` from the filter, so the filter is in the results hash."""
    manifest, truth = dataset
    out = tmp_path / "out"
    run(make_config(manifest, out, interventions=["Pleural Effusion=0"]), PlantedEngine(truth))
    changed = make_config(manifest, out, interventions=["Pleural Effusion=0"], filter={"s_clip_min": 0.3})
    engine = PlantedEngine(truth)
    with pytest.raises(ValueError, match="config_hash"):
        run(changed, engine)
    assert engine.calls == 0  # refused before any compute
    rows = pq.read_table(out / "rows.parquet").to_pylist()
    assert len({r["config_hash"] for r in rows}) == 1


# --- issues 28.9 and 28.17: an output that cannot be written, a wrong model path --------------------


@pytest.fixture
def mounts(tmp_path):
    made = Mounts(tmp_path)
    yield made
    made.close()


def test_a_read_only_output_ends_the_audit_before_any_compute(dataset, mounts):
    manifest, truth = dataset
    out = mounts.read_only("out") / "out"
    engine = PlantedEngine(truth)
    with pytest.raises(OutputWriteError, match=rf"output '{out}' cannot be written \(EROFS"):
        run(make_config(manifest, out), engine)
    assert engine.calls == 0


def test_a_disk_that_fills_mid_audit_ends_it_naming_the_output_without_retries(dataset, mounts):
    manifest, truth = dataset
    disk = mounts.small_disk()
    engine = PlantedEngine(truth)
    planted = engine.counterfactuals

    def fill_first(pixels, tasks):
        if engine.calls == 0:
            fill(disk)
        return planted(pixels, tasks)

    engine.counterfactuals = fill_first
    with pytest.raises(OutputWriteError, match=rf"cannot write '{disk / 'out'}.*\(ENOSPC"):
        run(make_config(manifest, disk / "out", interventions=["Pleural Effusion=0"]), engine)
    assert engine.calls == 1


def test_a_full_disk_at_the_audit_report_warns_and_keeps_the_results(dataset, tmp_path, caplog):
    manifest, truth = dataset
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="prism_ray.audit"):
        summary = run(make_config(manifest, out, interventions=["Pleural Effusion=0"]), PlantedEngine(truth),
                      PRISM_RAY_FAULTS="report.write=enospc")
    warned = [m for m in caplog.messages if "report" in m]
    assert len(warned) == 1 and f"cannot write '{out / 'report.html'}' (ENOSPC" in warned[0]
    assert summary["rows"] > 0 and (out / "summary.json").exists() and not (out / "report.html").exists()


def test_wrong_model_paths_are_config_errors_before_the_output_exists(dataset, tmp_path):
    manifest, truth = dataset
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="config field 'model.path': .*no such folder"):
        run(make_config(manifest, tmp_path / "out", model={"path": nowhere}), PlantedEngine(truth))
    with pytest.raises(ConfigError, match="config field 'classifiers.1.path': .*no such folder"):
        run(make_config(manifest, tmp_path / "out", classifiers=[{"path": "tiny"}, {"path": nowhere}]),
            PlantedEngine(truth))
    assert not (tmp_path / "out").exists()
