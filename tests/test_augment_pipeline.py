"""The augment job in-process (no Ray) with a deterministic fake engine: every results-protocol rule.

The fake engine stands in for the method (its numerics are tested in test_editor/test_inversion):
it "edits" by inverting the source and gives S_CLIP 1 to even attempt ranks and 0 to odd ones, so
the filter (S_CLIP >= 0.1) accepts exactly every other attempt of a subgroup's order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from mounts import Mounts, fill

from prism_ray import faults
from prism_ray.config import ConfigError, build_config
from prism_ray.data.storage import read_table, write_table
from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
from prism_ray.pipelines import augment
from prism_ray.pipelines.counterfactuals import Edited
from prism_ray.results.layout import Layout
from prism_ray.results.ledger import LedgerError, OutputWriteError
from prism_ray.results.summary import RunIncomplete


class FakeEngine:
    """Deterministic method stand-in; `fail` maps a source file name to an exception to raise."""

    vae_scale_factor = 4  # the tiny family's: images of 32 px and up

    def __init__(self, fail: dict[str, BaseException] | None = None):
        self.fail = fail or {}
        self.calls = 0

    def counterfactuals(self, pixels, tasks):
        self.calls += 1
        out = []
        for i, (image, task) in enumerate(zip(pixels, tasks, strict=True)):
            err = self.fail.get(Path(task["source_uri"]).name)
            if err is not None:
                raise err
            k = len(task["edits"])
            images = np.repeat((255 - image[:16, :16])[None], k, axis=0)  # (K, 16, 16, 3)
            zeros = np.zeros(k)
            s_clip = np.array([1.0 if e["rank"] % 2 == 0 else 0.0 for e in task["edits"]])
            scores = dict(s_clip=s_clip, clip_image_image=zeros, clip_image_text=zeros, l1=zeros, l1_255=zeros,
                          reconstruction_error=zeros + 1e-4)
            out.append(Edited(i, images, scores))
        return out, []


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("pipeline-data"))
    return write_phantom_dataset(root, PhantomDatasetConfig(n_subjects=200, resolution=32, seed=3)).manifest_uri


def make_config(manifest: str, output, quota: int = 6, **update) -> augment.AugmentConfig:
    data = {
        "data": {"manifest": manifest},
        "subgroups": [
            {"name": "effusion", "selector": {"Pleural Effusion": 1}, "interventions": ["Pleural Effusion=0"],
             "quota": quota},
            {"name": "devices", "selector": {"Support Devices": 1}, "interventions": ["Support Devices=0"],
             "quota": quota},
        ],
        "output": str(output),
        "compute": {"batch_size": 3},
    }
    data.update(update)
    return build_config(augment.AugmentConfig, data)


def run(config, engine=None, **env):
    """The job in this process with the fake engine; `env` switches fault points on for this call."""
    faults.reset()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return augment.run(config, runner=lambda factory, compute, output: augment.in_process(
            factory, compute, output, engine=engine or FakeEngine()))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def manifest_rows(output) -> list[dict]:
    return read_table(Layout.of(str(output)).manifest).to_pylist()


def snapshot(output) -> tuple:
    """What a finished run delivers: the quota sets (rows without timings, their PNG bytes), the
    error rows, and the ledger parts left (none). Beyond-quota rows are extra work and may differ
    after an interruption (the re-run plans from a partial acceptance estimate); they are checked
    to be complete rows with PNGs."""
    root = Path(output)
    rows = manifest_rows(output)
    assert all(Path(r["image_uri"]).exists() for r in rows)
    quota = [r for r in rows if r["quota_status"] == "in_quota"]
    kept = sorted((r["cf_id"], r["slot_id"], r["subgroup"], r["accepted"], r["attempt_rank"]) for r in quota)
    pngs = sorted(Path(r["image_uri"]).read_bytes() for r in quota)
    errors = sorted((e["source_uri"], e["stage"], e["reason"]) for e in read_table(str(root / "errors.parquet")).to_pylist())
    parts = sorted(p.name for p in (root / "_ledger").rglob("*.parquet")) if (root / "_ledger").exists() else []
    return kept, pngs, errors, parts


def test_quotas_are_exact_and_the_manifest_marks_the_quota_set(manifest, tmp_path):
    summary = run(make_config(manifest, tmp_path / "out"))
    rows = manifest_rows(tmp_path / "out")
    for name in ("effusion", "devices"):
        mine = sorted((r for r in rows if r["subgroup"] == name), key=lambda r: r["attempt_rank"])
        quota_set = [r for r in mine if r["quota_status"] == "in_quota"]
        assert sum(r["accepted"] for r in quota_set) == 6 == summary["subgroups"][name]["accepted"]
        # The quota set is the prefix of the attempt order that ends on the 6th accept.
        assert quota_set == mine[: len(quota_set)] and quota_set[-1]["accepted"]
        assert summary["subgroups"][name]["status"] == "met"
    assert summary["actors"]["model_loads_per_actor"] == [0]  # the fake engine loads nothing
    assert all(Path(r["image_uri"]).exists() for r in rows)
    assert snapshot(tmp_path / "out")[3] == []  # every ledger part committed


def test_first_round_wastes_at_most_ten_percent_at_acceptance_one_half(manifest, tmp_path):
    summary = run(make_config(manifest, tmp_path / "out", quota=10))
    first = summary["rounds"][0]["subgroups"]
    for name, info in summary["subgroups"].items():
        accepted_first_round = first[name].get("accepted", 0)
        assert info["beyond_quota_accepted"] <= 0.1 * accepted_first_round, (name, info, first[name])


def test_surplus_is_kept_beyond_quota_and_counts_first_when_the_quota_is_raised(manifest, tmp_path):
    out = tmp_path / "out"
    over = {"planner": {"over_provision": 2.0}}
    first = run(make_config(manifest, out, quota=4, **over))
    beyond = [r for r in manifest_rows(out) if r["quota_status"] == "beyond_quota"]
    assert beyond and all(Path(r["image_uri"]).exists() for r in beyond)
    assert sum(i["beyond_quota_accepted"] for i in first["subgroups"].values()) == sum(r["accepted"] for r in beyond)
    engine = FakeEngine()
    raised = run(make_config(manifest, out, quota=6, **over), engine=engine)
    # The surplus (8 accepted of 16 attempts per subgroup) covers a quota of 6: no new attempt, and
    # the quota set grows over the surplus in attempt order, to the 6th accept (even ranks: rank 10).
    assert engine.calls == 0 and raised["attempts_this_run"] == 0
    assert all(i["accepted"] == 6 and i["status"] == "met" for i in raised["subgroups"].values())
    for r in manifest_rows(out):
        assert r["quota_status"] == ("in_quota" if r["attempt_rank"] <= 10 else "beyond_quota")


@pytest.mark.parametrize("point", [
    "augment.batch_done=interrupt@2",  # mid-round, between batches
    "step.before_ledger=interrupt@2",  # a batch's PNGs written, its ledger part not
    "commit.between=interrupt",  # finalise: manifest switched, errors table not
    "commit.write=interrupt",  # during the manifest commit (temporary file written, not switched)
    "augment.after_commit=interrupt",  # after the commit, before the run summary
])
def test_a_killed_driver_reruns_to_the_uninterrupted_result(manifest, tmp_path, point):
    run(make_config(manifest, tmp_path / "straight"))
    config = make_config(manifest, tmp_path / "killed")
    with pytest.raises(faults.InjectedFault):
        run(config, PRISM_RAY_FAULTS=point)
    run(config)
    killed, straight = snapshot(tmp_path / "killed"), snapshot(tmp_path / "straight")
    assert killed[0] and killed == straight


def test_enospc_during_the_manifest_commit_leaves_the_previous_manifest_readable(manifest, tmp_path):
    out = tmp_path / "out"
    run(make_config(manifest, out, quota=2))
    before = manifest_rows(out)
    with pytest.raises(OutputWriteError, match=r"cannot write '.*manifest.parquet' \(ENOSPC: No space left"):
        run(make_config(manifest, out, quota=4), PRISM_RAY_FAULTS="commit.write=enospc")
    assert manifest_rows(out) == before  # still the last committed manifest, readable
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the failed temporary file is gone
    summary = run(make_config(manifest, out, quota=4))
    assert all(i["accepted"] == 4 for i in summary["subgroups"].values())


def test_an_unreadable_ledger_part_stops_the_job_and_nothing_is_deleted(manifest, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(faults.InjectedFault):
        run(make_config(manifest, out), PRISM_RAY_FAULTS="commit.write=interrupt")
    parts = sorted((out / "_ledger" / "rows").glob("*.parquet"))
    assert parts
    parts[0].write_bytes(b"PAR1 damaged")
    files_before = sorted(p for p in out.rglob("*") if p.is_file())
    with pytest.raises(LedgerError, match=parts[0].name):
        run(make_config(manifest, out))
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files_before


def test_identical_bytes_at_two_paths_get_two_ids(manifest, tmp_path):
    table = read_table(manifest)
    rows = table.filter(pa.compute.equal(table["Pleural Effusion"], 1.0)).slice(0, 1).to_pylist()
    copy = tmp_path / "copy.png"
    copy.write_bytes(Path(rows[0]["image_uri"]).read_bytes())
    twin = dict(rows[0], image_uri=str(copy), subject_id="twin")
    dup_manifest = str(tmp_path / "dup.parquet")
    write_table(pa.Table.from_pylist(rows + [twin], schema=table.schema), dup_manifest)
    config = make_config(dup_manifest, tmp_path / "out", quota=2,
                         filter={"s_clip_min": -1.0})  # accept both
    config = config.model_copy(update={"subgroups": config.subgroups[:1]})
    run(config)
    got = manifest_rows(tmp_path / "out")
    assert len(got) == 2 and got[0]["source_id"] == got[1]["source_id"]  # same bytes
    assert len({r["cf_id"] for r in got}) == 2 and len({r["image_uri"] for r in got}) == 2


def test_an_injected_oom_is_retried_not_an_error_row(manifest, tmp_path):
    summary = run(make_config(manifest, tmp_path / "out"), PRISM_RAY_FAULTS="step.before_ledger=oom@1")
    assert summary["actors"]["batch_retries"] == 1
    assert summary["error_rows"] == 0 and all(i["status"] == "met" for i in summary["subgroups"].values())


def test_transient_errors_past_the_retries_fail_the_job_naming_the_cause(manifest, tmp_path):
    import torch

    engine = FakeEngine({name: torch.OutOfMemoryError("CUDA out of memory") for name in
                         [Path(r["image_uri"]).name for r in read_table(manifest).to_pylist()]})
    with pytest.raises(RuntimeError, match="failed 3 times.*OutOfMemoryError"):
        run(make_config(manifest, tmp_path / "out"), engine=engine)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_a_programming_error_crashes_instead_of_becoming_error_rows(manifest, tmp_path):
    names = [Path(r["image_uri"]).name for r in read_table(manifest).to_pylist()]
    engine = FakeEngine({name: TypeError("unsupported operand") for name in names})
    with pytest.raises(TypeError, match="unsupported operand"):
        run(make_config(manifest, tmp_path / "out"), engine=engine)
    assert engine.calls == 1  # not retried


@pytest.mark.parametrize("change", ["renamed", "dropped", "narrowed", "new_intervention"])
def test_changed_subgroups_never_delete_finished_work(manifest, tmp_path, change):
    out = tmp_path / "out"
    run(make_config(manifest, out, quota=3))
    before = {r["cf_id"]: r for r in manifest_rows(out)}
    config = make_config(manifest, out, quota=3)
    groups = [g.model_dump() for g in config.subgroups]
    if change == "renamed":
        groups[0]["name"] = "effusion_v2"
    elif change == "dropped":
        groups = groups[1:]
    elif change == "narrowed":
        groups[0]["selector"] = {"Pleural Effusion": 1, "Sex": "Female"}
    else:
        groups[0]["interventions"] = ["Pleural Effusion=0", "Cardiomegaly=1"]
    summary = run(build_config(augment.AugmentConfig, {**config.model_dump(), "subgroups": groups}))
    after = {r["cf_id"]: r for r in manifest_rows(out)}
    assert set(before) <= set(after)  # every finished row is still there ...
    assert all(Path(r["image_uri"]).exists() for r in before.values())  # ... with its PNG
    set_aside = [r for r in after.values() if r["quota_status"] == "set_aside"]
    if change in ("renamed", "dropped"):
        assert {r["subgroup"] for r in set_aside} == {"effusion"}
        assert summary["set_aside"] == {"effusion": len(set_aside)}
    if change == "narrowed":
        assert all(r["subgroup"] == "effusion" for r in set_aside)
    assert all(i["status"] == "met" for i in summary["subgroups"].values())


def test_a_shortfall_and_zero_outputs_end_the_run_incomplete(manifest, tmp_path):
    with pytest.raises(RunIncomplete, match="effusion short by") as info:
        run(make_config(manifest, tmp_path / "short", quota=1000))
    assert info.value.summary["subgroups"]["effusion"]["status"] == "shortfall"
    assert (tmp_path / "short" / "run_summary.json").exists() and (tmp_path / "short" / "manifest.parquet").exists()

    table = read_table(manifest)
    broken = table.slice(0, 4).to_pylist()
    for i, row in enumerate(broken):
        row["image_uri"] = str(tmp_path / f"missing-{i}.png")
        row["Pleural Effusion"] = 1.0
    bad_manifest = str(tmp_path / "bad.parquet")
    write_table(pa.Table.from_pylist(broken, schema=table.schema), bad_manifest)
    config = make_config(bad_manifest, tmp_path / "none", quota=1)
    config = config.model_copy(update={"subgroups": config.subgroups[:1]})
    with pytest.raises(RunIncomplete, match="0 rows, 4 error rows"):
        run(config)


def _cli_fake_run(config, runner=None):
    return run(config)


def run_cli(config, folder: Path, **env) -> tuple[int, str]:
    """`prism-ray augment --config <config>` with the fake engine: (exit code, stderr)."""
    import contextlib
    import io

    from prism_ray import cli

    path = folder / "job.yaml"
    path.write_text(config.to_yaml())
    old = cli.JOBS["augment"]
    cli.JOBS["augment"] = cli.Job("", "prism_ray.pipelines.augment:AugmentConfig", f"{__name__}:_cli_fake_run")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = cli.main(["augment", "--config", str(path)])
    finally:
        cli.JOBS["augment"] = old
    return code, err.getvalue()


def the_error_line(stderr: str) -> str:
    """The one line the CLI ends a failed job with (the job's own log lines come before it)."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith("prism-ray augment: "), stderr
    assert sum(line.startswith("prism-ray augment: ") for line in lines) == 1, stderr
    return lines[-1]


def test_the_cli_exits_non_zero_on_a_shortfall(manifest, tmp_path):
    code, err = run_cli(make_config(manifest, tmp_path / "out", quota=1000), tmp_path)
    assert code == 3 and "augment incomplete: effusion short by" in err


def test_inversion_needs_fp32_weights_at_config_load(manifest, tmp_path):
    with pytest.raises(ConfigError, match="model.dtype"):
        make_config(manifest, tmp_path, model={"dtype": "bfloat16"})


def test_a_storage_error_reading_a_source_is_retried_not_written_off(manifest, tmp_path, monkeypatch):
    from prism_ray.data import storage

    real, calls = storage.read_image_bytes, []

    def flaky(uri):
        calls.append(uri)
        if len(calls) == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(uri)

    monkeypatch.setattr(storage, "read_image_bytes", flaky)
    summary = run(make_config(manifest, tmp_path / "out"))
    assert summary["actors"]["batch_retries"] == 1 and summary["error_rows"] == 0
    missing = storage.ImageReadError  # a missing file, by contrast, is the image's fault: an item error
    with pytest.raises(missing, match="file not found"):
        real(str(tmp_path / "nope.png"))


def test_the_whole_job_runs_in_process_with_the_real_method_and_without_ray(tmp_path):
    """The pipeline layer needs no Ray: the shipped tiny family, real inversion/editing/CLIP, in one process."""
    import subprocess
    import sys

    code = f"""
import sys
from prism_ray.config import build_config
from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
from prism_ray.pipelines import augment
data = write_phantom_dataset({str(tmp_path / 'data')!r}, PhantomDatasetConfig(n_subjects=24, seed=5))
config = build_config(augment.AugmentConfig, {{
    "model": {{"device": "cpu"}},
    "data": {{"manifest": data.manifest_uri}},
    "subgroups": [{{"name": "devices", "selector": {{"Support Devices": 1}},
                    "interventions": ["Support Devices=0"], "quota": 2}}],
    "inversion": {{"num_inference_steps": 3, "num_inner_steps": 1}},
    "filter": {{"s_clip_min": -1.0}},
    "output": {str(tmp_path / 'out')!r},
}})
summary = augment.run(config, runner=augment.in_process)
print(summary["subgroups"]["devices"]["accepted"], summary["actors"]["model_loads_per_actor"],
      sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2 [1] []"


def test_unknown_intervention_attribute_and_impossible_selector_are_one_line_config_errors(manifest, tmp_path):
    groups = [{"name": "pace", "selector": {"Support Devices": 1}, "interventions": ["Pacemaker=0"], "quota": 1}]
    with pytest.raises(ConfigError, match=r"subgroups\.pace\.interventions: .*unknown attribute 'Pacemaker'") as err:
        make_config(manifest, tmp_path, subgroups=groups)
    assert "\n" not in str(err.value)
    groups = [{"name": "odd", "selector": {"Support Devices": 2}, "interventions": ["Support Devices=0"], "quota": 1}]
    with pytest.raises(ConfigError, match=r"subgroups\.odd\.selector: .*'2'"):
        make_config(manifest, tmp_path, subgroups=groups)


def test_a_subgroup_matching_no_row_stops_the_job_naming_it(manifest, tmp_path):
    groups = [{"name": "nobody", "selector": {"Sex": "Female", "Age": 200}, "interventions": ["Support Devices=0"],
               "quota": 1}]
    with pytest.raises(ConfigError, match=r"subgroups\.nobody\.selector.* matches no usable row"):
        run(make_config(manifest, tmp_path / "out", subgroups=groups))


def test_every_input_row_is_accounted_for(manifest, tmp_path):
    table = read_table(manifest)
    rows = table.to_pylist()
    extra = [dict(rows[0]), dict(rows[1], image_uri=str(tmp_path / "missing.png"), **{"Pleural Effusion": 1.0})]
    bad_manifest = str(tmp_path / "m.csv")
    import pyarrow.csv as pacsv

    merged = pa.Table.from_pylist(rows + extra, schema=table.schema)
    pacsv.write_csv(merged, bad_manifest)
    text = Path(bad_manifest).read_text().splitlines()
    header = text[0].split(",")
    col = header.index('"Support Devices"') if '"Support Devices"' in header else header.index("Support Devices")
    cells = text[3].split(",")
    cells[col] = "yes"  # one text cell in a label column: that row only
    text[3] = ",".join(cells)
    Path(bad_manifest).write_text("\n".join(text) + "\n")
    with pytest.raises(RunIncomplete) as info:  # quotas beyond the sources: every source is attempted
        run(make_config(bad_manifest, tmp_path / "out", quota=1000))
    a = info.value.summary["accounting"]
    assert a["input_rows"] == len(rows) + 2 and a["duplicate_rows_collapsed"] == 1 and a["rows_with_errors"] == 1
    assert a["input_rows"] == a["not_selected"] + a["duplicate_rows_collapsed"] + a["rows_with_errors"] + a["sources"]
    assert a["sources"] == a["sources_with_outputs"] + a["sources_failed"] + a["sources_not_needed"]
    assert a["sources_failed"] == 1 and a["sources_not_needed"] == 0  # the missing file; all others used
    errors = read_table(str(tmp_path / "out" / "errors.parquet")).to_pylist()
    assert any("row 2 " in e["reason"] and "'yes'" in e["reason"] for e in errors)  # the input row, 0-based
    assert any(e["stage"] == "read" and e["source_uri"].endswith("missing.png") for e in errors)


def test_a_wrong_model_folder_is_a_config_error_before_the_output_exists(manifest, tmp_path):
    """Issue 28.17: exit 2 naming the field, and no empty output folder left behind."""
    (tmp_path / "model" / "unet").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"config field 'model.path': model '.*model': missing component folder"):
        run(make_config(manifest, tmp_path / "out", model={"path": str(tmp_path / "model")}))
    with pytest.raises(ConfigError, match="config field 'model.path': .*no such folder"):
        run(make_config(manifest, tmp_path / "out", model={"path": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="config field 'model.clip_path': .*no such folder"):
        run(make_config(manifest, tmp_path / "out", model={"clip_path": str(tmp_path / "nowhere")}))
    assert not (tmp_path / "out").exists()
    code, err = run_cli(make_config(manifest, tmp_path / "out", model={"path": str(tmp_path / "nowhere")}), tmp_path)
    assert code == 2 and "config field 'model.path'" in the_error_line(err)
    assert not (tmp_path / "out").exists()


def test_an_unsupported_prediction_type_is_refused_before_any_work(manifest, tmp_path, tiny_family):
    import json
    import shutil

    model = tmp_path / "sample_pred"
    shutil.copytree(tiny_family, model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "sample"}))
    with pytest.raises(ValueError, match="scheduler.prediction_type 'sample': the editing engine supports"):
        run(make_config(manifest, tmp_path / "out", model={"path": str(model)}))
    assert not (tmp_path / "out" / "manifest.parquet").exists()


class VerdictEngine(FakeEngine):
    """Accepts by what an attempt is (source file, intervention), not by its rank, so a resumed run
    and a fresh one decide every attempt alike."""

    def counterfactuals(self, pixels, tasks):
        from prism_ray.results.layout import digest

        out, errors = super().counterfactuals(pixels, tasks)
        for item in out:
            task = tasks[item.index]
            name = Path(task["source_uri"]).name
            item.scores["s_clip"] = np.array(
                [float(int(digest(name, e["intervention"]), 16) % 3 != 0) for e in task["edits"]])
        return out, errors


def test_an_added_intervention_resumes_into_the_fresh_runs_quota_set(manifest, tmp_path):
    """Issue 28.11: the old rows no longer fill the quota on their own; the new intervention is tried."""
    first = make_config(manifest, tmp_path / "out", quota=4)
    run(first, engine=VerdictEngine())
    groups = [g.model_dump() for g in first.subgroups]
    groups[0]["interventions"] = ["Pleural Effusion=0", "Cardiomegaly=1"]
    both = build_config(augment.AugmentConfig, {**first.model_dump(), "subgroups": groups})
    engine = VerdictEngine()
    resumed = run(both, engine=engine)
    run(both.model_copy(update={"output": str(tmp_path / "fresh")}), engine=VerdictEngine())

    def quota_set(output):
        return sorted((r["cf_id"], r["intervention"], r["accepted"]) for r in manifest_rows(output)
                      if r["quota_status"] == "in_quota" and r["subgroup"] == "effusion")

    assert engine.calls > 0 and resumed["subgroups"]["effusion"]["this_run"].get("accepted", 0) > 0
    assert quota_set(tmp_path / "out") == quota_set(tmp_path / "fresh")
    assert "Cardiomegaly=1" in {i for _, i, _ in quota_set(tmp_path / "out")}
    assert resumed["subgroups"]["effusion"]["accepted"] == 4


# --- issue 28.9: an output that cannot be written -------------------------------------------------


@pytest.fixture
def mounts(tmp_path):
    made = Mounts(tmp_path)
    yield made
    made.close()


@pytest.mark.parametrize("exists", [True, False])
def test_a_read_only_output_ends_the_job_before_any_compute(manifest, mounts, exists):
    out = mounts.read_only(*["out"] * exists) / "out"
    engine = FakeEngine()
    with pytest.raises(OutputWriteError, match=rf"output '{out}' cannot be written \(EROFS: Read-only file system\)"):
        run(make_config(manifest, out), engine=engine)
    assert engine.calls == 0  # nothing computed, nothing retried


def test_an_output_under_a_file_exits_1_in_one_line_before_any_compute(manifest, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    code, err = run_cli(make_config(manifest, out), tmp_path)
    assert code == 1 and f"output '{out}' cannot be written (ENOTDIR" in the_error_line(err)


class FaultEngine(FakeEngine):
    """Runs `fault` (fill the output's disk, remount it read-only) before its first batch, as a long run
    meets a disk that fills up or fails."""

    def __init__(self, fault):
        super().__init__()
        self.fault = fault

    def counterfactuals(self, pixels, tasks):
        if self.calls == 0:
            self.fault()
        return super().counterfactuals(pixels, tasks)


@pytest.mark.parametrize("fault, code", [("full", "ENOSPC"), ("read_only", "EROFS")])
def test_an_output_that_fills_or_fails_mid_run_ends_the_job_naming_it_without_retries(manifest, mounts, fault, code):
    disk = mounts.small_disk()
    out = disk / "out"
    engine = FaultEngine(lambda: fill(disk) if fault == "full" else mounts.make_read_only(disk))
    with pytest.raises(OutputWriteError) as info:
        run(make_config(manifest, out), engine=engine)
    message = str(info.value)
    assert f"cannot write '{out}" in message and f"({code}: " in message and "\n" not in message
    assert engine.calls == 1  # the batch is not computed again


def test_a_full_disk_at_the_report_warns_and_the_run_ends_by_its_results(manifest, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="prism_ray.augment"):
        summary = run(make_config(manifest, out), PRISM_RAY_FAULTS="report.write=enospc")
    assert all(i["status"] == "met" for i in summary["subgroups"].values())  # exit 0
    warned = [m for m in caplog.messages if "report" in m]
    assert len(warned) == 1 and f"cannot write '{out / 'report.html'}' (ENOSPC" in warned[0]
    assert not (out / "report.html").exists() and (out / "run_summary.json").exists()
    with pytest.raises(RunIncomplete):  # a shortfall still ends short (exit 3), not failed
        run(make_config(manifest, tmp_path / "short", quota=1000), PRISM_RAY_FAULTS="report.write=enospc")
