"""Unit tests of the results protocol (results/): atomic writes, ledger reads, commits, id digests."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_ray import faults
from prism_ray.results.layout import Layout, digest
from prism_ray.results.ledger import (
    LedgerError,
    OutputGuard,
    OutputWriteError,
    check_config_hash,
    check_writable,
    commit,
    read_state,
    write_json_atomic,
    write_part,
    write_table_atomic,
)


def table(*ids: str) -> pa.Table:
    return pa.table({"slot_id": list(ids), "config_hash": ["h"] * len(ids)})


@pytest.fixture
def with_faults(monkeypatch):
    def switch(spec: str) -> None:
        faults.reset()
        monkeypatch.setenv(faults.ENV, spec)

    yield switch
    faults.reset()


def test_layout_paths_and_local_roots_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = Layout.of("out/")
    assert layout.root == str(tmp_path / "out")
    assert layout.manifest == f"{tmp_path}/out/manifest.parquet"
    assert layout.ledger("rows", "a.parquet") == f"{tmp_path}/out/_ledger/rows/a.parquet"
    assert Layout.of("s3://bucket/x/").root == "s3://bucket/x"
    assert Layout.image_key("g", "id") == "images/g/id.png"


def test_digest_is_deterministic_and_separates_its_parts():
    assert digest("a", 1) == digest("a", 1) and len(digest("a")) == 24
    assert digest("ab", "c") != digest("a", "bc")  # a separator, not plain concatenation
    assert len(digest("x", size=8)) == 8


def test_atomic_write_switches_and_leaves_no_temporary_file(tmp_path):
    uri = str(tmp_path / "t.parquet")
    write_table_atomic(table("a"), uri)
    write_table_atomic(table("a", "b"), uri)
    assert pq.read_table(uri).column("slot_id").to_pylist() == ["a", "b"]
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_a_full_disk_during_an_atomic_write_keeps_the_previous_file(tmp_path, with_faults):
    uri = str(tmp_path / "t.parquet")
    write_table_atomic(table("a"), uri)
    with_faults("w=enospc")
    with pytest.raises(OutputWriteError, match=rf"cannot write '{uri}' \(ENOSPC: No space left.*not retried"):
        write_table_atomic(table("a", "b"), uri, fault="w")
    assert pq.read_table(uri).column("slot_id").to_pylist() == ["a"]
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_read_state_merges_committed_tables_and_parts_and_ignores_temporary_files(tmp_path):
    layout = Layout.of(str(tmp_path))
    write_table_atomic(table("a"), layout.manifest)
    write_part(layout, "rows", "p1.parquet", table("b"))
    write_part(layout, "errors", "p1.parquet", table("e"))
    (tmp_path / "_ledger" / "rows" / ".p2.parquet.tmp-123").write_bytes(b"half written")
    (tmp_path / "images" / "g").mkdir(parents=True)
    (tmp_path / "images" / "g" / "x.png").write_bytes(b"png")
    state = read_state(layout)
    assert [r["slot_id"] for r in state.rows] == ["a", "b"]
    assert [r["slot_id"] for r in state.errors] == ["e"]
    assert sorted(os.path.basename(p) for p in state.parts) == ["p1.parquet", "p1.parquet"]
    assert state.images == {"images/g/x.png"}


def test_an_unreadable_part_raises_naming_it_and_is_kept(tmp_path):
    layout = Layout.of(str(tmp_path))
    write_part(layout, "rows", "good.parquet", table("a"))
    bad = tmp_path / "_ledger" / "rows" / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(LedgerError, match="bad.parquet.*nothing was deleted"):
        read_state(layout)
    assert bad.exists() and (tmp_path / "_ledger" / "rows" / "good.parquet").exists()


def test_storage_errors_are_retried_then_named(tmp_path, monkeypatch):
    from fsspec.implementations import local

    layout = Layout.of(str(tmp_path))
    write_part(layout, "rows", "a.parquet", table("a"))
    real_open, calls = local.LocalFileSystem._open, []

    def flaky(self, path, mode="rb", **kwargs):
        if path.endswith("a.parquet") and "r" in mode:
            calls.append(path)
            if len(calls) <= 2:
                raise ConnectionResetError("connection reset by peer")
        return real_open(self, path, mode, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "_open", flaky)
    assert [r["slot_id"] for r in read_state(layout, wait=0.0).rows] == ["a"]  # third try reads
    calls.clear()
    monkeypatch.setattr(local.LocalFileSystem, "_open", lambda self, path, mode="rb", **kw: (_ for _ in ()).throw(
        TimeoutError("storage timed out")))
    with pytest.raises(LedgerError, match="a.parquet.*storage error after 2 tries"):
        read_state(layout, retries=1, wait=0.0)


def test_commit_switches_both_tables_then_removes_only_the_consumed_parts(tmp_path):
    layout = Layout.of(str(tmp_path))
    write_part(layout, "rows", "p1.parquet", table("a"))
    consumed = read_state(layout).parts
    write_part(layout, "rows", "p2.parquet", table("b"))  # written after the read: not consumed
    commit(layout, table("a"), table(), consumed)
    assert pq.read_table(layout.manifest).column("slot_id").to_pylist() == ["a"]
    assert pq.read_table(layout.errors).num_rows == 0
    assert sorted(os.listdir(tmp_path / "_ledger" / "rows")) == ["p2.parquet"]


def test_a_commit_that_consumes_every_part_leaves_no_ledger_folder(tmp_path):
    layout = Layout.of(str(tmp_path))
    write_part(layout, "rows", "p1.parquet", table("a"))
    write_part(layout, "errors", "e1.parquet", table("e"))
    commit(layout, table("a"), table("e"), read_state(layout).parts)
    assert sorted(os.listdir(tmp_path)) == ["errors.parquet", "manifest.parquet"]  # no empty _ledger/ left
    write_part(layout, "rows", "p2.parquet", table("b"))  # and the next batch's part still finds its folder
    assert read_state(layout).parts == [str(tmp_path / "_ledger" / "rows" / "p2.parquet")]


def test_a_commit_killed_between_its_switches_keeps_every_part(tmp_path, with_faults):
    layout = Layout.of(str(tmp_path))
    write_part(layout, "rows", "p1.parquet", table("a"))
    state = read_state(layout)
    with_faults("commit.between=interrupt")
    with pytest.raises(faults.InjectedFault):
        commit(layout, table("a"), table(), state.parts)
    assert os.listdir(tmp_path / "_ledger" / "rows") == ["p1.parquet"]
    # The next read sees the row twice (manifest + part): callers de-duplicate by id.
    assert [r["slot_id"] for r in read_state(layout).rows] == ["a", "a"]


def test_outputs_of_another_configuration_are_refused_in_one_line():
    check_config_hash([{"config_hash": "h"}, {"config_hash": None}], "h", "out")
    with pytest.raises(ValueError, match=r"output 'out' holds results of another configuration.*\['old'\]"):
        check_config_hash([{"config_hash": "old"}], "h", "out")


def test_json_is_written_atomically(tmp_path):
    uri = str(tmp_path / "s.json")
    write_json_atomic({"a": 1}, uri)
    assert open(uri).read().strip().startswith("{") and os.listdir(tmp_path) == ["s.json"]


def test_fault_points_fire_once_per_marker_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "p=interrupt@2")
    monkeypatch.setenv(faults.ONCE_ENV, str(tmp_path))
    faults.reset()
    faults.fault_point("p")  # first reach: not yet
    with pytest.raises(faults.InjectedFault):
        faults.fault_point("p")
    faults.reset()
    faults.fault_point("p")
    faults.fault_point("p")  # the marker says it already fired
    faults.fault_point("other")


def test_outputs_resolve_on_the_driver_and_relative_paths_are_refused_under_job_submit(tmp_path, monkeypatch):
    from prism_ray.config import ConfigError
    from prism_ray.results.layout import SUBMITTED_JOB_ENV, resolve_output

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SUBMITTED_JOB_ENV, raising=False)
    assert resolve_output("out") == str(tmp_path / "out")
    assert resolve_output("s3://b/run/") == "s3://b/run"
    assert resolve_output("/abs/run") == "/abs/run"
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    with pytest.raises(ConfigError, match="config field 'output': relative path 'out' under `ray job submit`"):
        resolve_output("out")
    assert resolve_output("/abs/run") == "/abs/run" and resolve_output("gs://b/x") == "gs://b/x"


def test_the_output_probe_leaves_nothing_and_names_an_output_it_cannot_write(tmp_path):
    check_writable(Layout.of(str(tmp_path / "out")))
    assert os.listdir(tmp_path / "out") == []  # made, probed, the probe removed
    (tmp_path / "file").write_text("a file where the output's parent folder should be")
    with pytest.raises(OutputWriteError, match=r"output '.*file/out' cannot be written \(ENOTDIR"):
        check_writable(Layout.of(str(tmp_path / "file" / "out")))


def test_the_output_guard_leaves_other_storage_errors_to_the_runners_retries(tmp_path):
    class Step:
        model_loads = 1

        def __call__(self, batch):
            raise ConnectionResetError(104, "Connection reset by peer")

    guarded = OutputGuard(Step, str(tmp_path))
    assert guarded.model_loads == 1
    with pytest.raises(ConnectionResetError):  # transient: the runner retries the batch
        guarded([])


def test_the_clock_is_timezone_aware_utc_and_fits_the_created_at_column():
    from datetime import timedelta

    from prism_ray.data.schemas import ERROR_SCHEMA
    from prism_ray.results.clock import utc_now

    now = utc_now()
    assert now.utcoffset() == timedelta(0)
    column = pa.array([now], ERROR_SCHEMA.field("created_at").type)  # timestamp("ms", tz="UTC")
    assert column.type.tz == "UTC" and column.to_pylist()[0] == now.replace(microsecond=now.microsecond // 1000 * 1000)
