"""Bad input never kills a job or slips through: 30 kinds of odd rows, one augment run, every row accounted for.

The method is the fake engine of test_augment_pipeline (decoding, captions, ledger and accounting
are the real ones), so the whole manifest runs in seconds in the fast lane.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_augment_pipeline import FakeEngine, run
from test_images import _bare_dicom, _dicom, _png_header_only

from prism_ray.config import build_config
from prism_ray.data.captions import CHEXPERT_LABELS
from prism_ray.data.images import decode_image
from prism_ray.data.storage import read_table
from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
from prism_ray.pipelines import augment
from prism_ray.results.summary import RunIncomplete


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def odd_files(root: Path, gray: np.ndarray) -> dict[str, tuple[bytes | None, str | None]]:
    """name -> (file bytes or None for 'no file', expected error stage or None for 'decodes')."""
    g = Image.fromarray(gray, "L")
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    alpha = np.full_like(gray, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    frames = io.BytesIO()
    g.save(frames, format="GIF", save_all=True, append_images=[g.point(lambda v: 255 - v)])
    truncated = _png(g)[:60]
    big16 = (gray.astype(np.uint16) * 257)
    return {
        "palette.png": (_png(g.convert("P")), None),
        "palette_transparent.png": (_png(g.convert("P"), transparency=0), None),  # palette + tRNS
        "gray_alpha.png": (_png(Image.fromarray(np.dstack([gray, alpha]), "LA")), None),
        "rgba.png": (_png(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), None),
        "bilevel.png": (_png(g.convert("1")), None),
        "cmyk.jpg": (_png(Image.fromarray(rgb, "RGB").convert("CMYK"), format="JPEG", quality=95), None),
        "sixteen.png": (_png(Image.fromarray(big16)), None),
        "int32.tif": (_png(Image.fromarray(gray.astype(np.int32) * 1000), format="TIFF"), None),
        "float.tif": (_png(Image.fromarray(gray.astype(np.float32) / 255), format="TIFF"), "read"),
        "mono2.dcm": (_dicom(gray, "MONOCHROME2", bits=8), None),
        "mono1_voi.dcm": (_dicom((gray.astype(np.uint16) * 16), "MONOCHROME1", WindowCenter=2000,
                                 WindowWidth=3000), None),
        "rle.dcm": (_dicom(gray.astype(np.uint16) * 16, syntax=__import__("pydicom").uid.RLELossless), None),
        "bare_dicom_no_suffix": (_bare_dicom(gray.astype(np.uint16) * 16), None),  # no preamble, no file meta
        "rotated.jpg": (_png(g, format="JPEG", exif=exif.tobytes()), None),
        "wide.png": (_png(Image.fromarray(np.repeat(gray, 2, axis=1), "L")), None),
        "name with spaces ü#%::.png": (_png(g), None),
        "tiny.png": (_png(Image.fromarray(gray[:10, :10], "L")), "read"),
        "bomb.png": (_png_header_only(20000, 20000), "read"),
        "truncated.png": (truncated, "read"),
        "garbage.png": (b"this is not an image at all" * 10, "read"),
        "empty.png": (b"", "read"),
        "missing.png": (None, "read"),
        "frames.gif": (frames.getvalue(), "read"),
    }


def build_manifest(tmp_path: Path) -> tuple[str, dict[str, str | None]]:
    """Phantoms plus one row per odd kind; returns (manifest path, image_uri -> expected error stage)."""
    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=24, resolution=64, seed=9))
    table = read_table(data.manifest_uri)
    rows = table.to_pylist()
    template = dict(rows[0])
    gray = np.asarray(Image.open(rows[0]["image_uri"]).convert("L"))
    expected: dict[str, str | None] = {}
    odd = []
    for name, (content, stage) in odd_files(tmp_path, gray).items():
        path = tmp_path / "odd" / name
        path.parent.mkdir(exist_ok=True)
        if content is not None:
            path.write_bytes(content)
        odd.append(dict(template, image_uri=str(path), subject_id=f"odd-{name}", **{"Support Devices": 1.0}))
        expected[str(path)] = stage
    (tmp_path / "odd" / "a_folder").mkdir()
    loop = tmp_path / "odd" / "loop.png"  # a symlink loop: ELOOP, the path's fault
    loop.symlink_to(tmp_path / "odd" / "loop_back.png")
    (tmp_path / "odd" / "loop_back.png").symlink_to(loop)
    odd.append(dict(template, image_uri=str(loop), subject_id="odd-loop", **{"Support Devices": 1.0}))
    expected[str(loop)] = "read"
    for uri in ("s4://bucket/typo.png", str(tmp_path / "odd" / "a_folder"), ""):
        odd.append(dict(template, image_uri=uri, subject_id=f"uri-{uri[-8:]}", **{"Support Devices": 1.0}))
        expected[uri] = "read"
    all_rows = rows + odd + [dict(rows[1])]  # an exact duplicate of a phantom row: collapses
    conflict = dict(rows[2], **{"Cardiomegaly": 1.0 - (rows[2]["Cardiomegaly"] or 0.0)})  # same path, other label
    all_rows.append(conflict)
    strings = pa.Table.from_pylist(all_rows, schema=table.schema).cast(
        pa.schema([pa.field(f.name, pa.string() if f.name in ("Support Devices", "Edema") else f.type)
                   for f in table.schema])
    )
    bad_cells = strings.to_pylist()
    bad_cells[3]["Support Devices"], bad_cells[4]["Edema"] = "yes", "True"  # text in label columns
    path = str(tmp_path / "manifest.csv")
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.Table.from_pylist(bad_cells, schema=strings.schema), path)
    return path, expected


def config(manifest: str, out: Path, quota: int = 1000, **data) -> augment.AugmentConfig:
    return build_config(augment.AugmentConfig, {
        "data": {"manifest": manifest, **data},
        "subgroups": [{"name": "devices", "selector": {"Support Devices": 1}, "interventions": ["Support Devices=0"],
                       "quota": quota}],
        "filter": {"s_clip_min": -1.0},
        "output": str(out),
        "compute": {"batch_size": 5},
    })


def test_thirty_kinds_of_odd_input_are_outputs_or_named_error_rows(tmp_path):
    manifest, expected = build_manifest(tmp_path)
    with pytest.raises(RunIncomplete) as info:  # the quota exceeds the sources: every one is attempted
        run(config(manifest, tmp_path / "out"))
    summary = info.value.summary
    rows = read_table(str(tmp_path / "out" / "manifest.parquet")).to_pylist()
    errors = read_table(str(tmp_path / "out" / "errors.parquet")).to_pylist()
    produced = {r["source_uri"] for r in rows}
    failed = {e["source_uri"] or "": e for e in errors}
    for uri, stage in expected.items():
        if stage is None:
            assert uri in produced, (uri, failed.get(uri))
        else:
            assert uri in failed and failed[uri]["stage"] == stage, (uri, failed.get(uri))
            reason = failed[uri]["reason"]
            assert (uri and Path(uri).name in reason) or "row " in reason, reason
    assert "ELOOP" in failed[str(tmp_path / "odd" / "loop.png")]["reason"]
    by_name = {Path(r["source_uri"]).name: r for r in rows}
    assert by_name["wide.png"]["square"] == "center_crop" and by_name["wide.png"]["source_width"] == 128
    assert by_name["rotated.jpg"]["source_width"] == 64
    label_errors = [e["reason"] for e in errors if "not in {" in e["reason"]]
    assert any("'yes'" in r and "row 3 " in r for r in label_errors)
    assert any("'True'" in r and "row 4 " in r for r in label_errors)
    assert any("different" in e["reason"] for e in errors)  # the conflicting duplicate
    a = summary["accounting"]
    assert a["duplicate_rows_collapsed"] == 1
    assert a["input_rows"] == a["not_selected"] + a["duplicate_rows_collapsed"] + a["rows_with_errors"] + a["sources"]
    assert a["sources"] == a["sources_with_outputs"] + a["sources_failed"] + a["sources_not_needed"]
    assert a["sources_not_needed"] == 0


def test_decoded_odd_modes_equal_their_plain_references(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (64, 1))  # a gradient: every level distinct
    files = odd_files(tmp_path, gray)
    plain = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(decode_image(files["palette.png"][0], "p.png"), plain)
    assert np.array_equal(decode_image(files["mono2.dcm"][0], "m2.dcm"), plain)
    mono1 = decode_image(_dicom(gray, "MONOCHROME1", bits=8), "m1.dcm")
    assert np.array_equal(mono1, 255 - plain)  # MONOCHROME1 is the inverted MONOCHROME2
    assert np.array_equal(decode_image(files["sixteen.png"][0], "s.png"), plain)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["good", "missing", "garbage", "yes", "dup", "tiny"]), min_size=1, max_size=12))
def test_accounting_identity_holds_for_random_manifests(tmp_path_factory, kinds):
    tmp = tmp_path_factory.mktemp("prop")
    gray = np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (64, 1))
    rows = []
    for i, kind in enumerate(kinds):
        path = tmp / f"img{i}.png"
        if kind in ("good", "yes", "dup"):
            path.write_bytes(_png(Image.fromarray(np.roll(gray, i, axis=1), "L")))
        elif kind == "garbage":
            path.write_bytes(b"\x00" * 50)
        elif kind == "tiny":
            path.write_bytes(_png(Image.fromarray(gray[:8, :8], "L")))
        row = {"image_uri": str(path), **{label: "0" for label in CHEXPERT_LABELS}}
        row["Support Devices"] = "yes" if kind == "yes" else "1"
        rows.append(row)
        if kind == "dup":
            rows.append(dict(row))
    manifest = str(tmp / "m.csv")
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.Table.from_pylist(rows), manifest)
    try:
        summary = run(config(manifest, tmp / "out"), engine=FakeEngine())
    except RunIncomplete as err:
        summary = err.summary
    except ValueError as err:  # no usable row for the subgroup: a job-level stop naming it
        assert "matches no usable row" in str(err)
        assert all(k not in ("good", "dup") for k in kinds) or not kinds
        return
    a = summary["accounting"]
    assert a["input_rows"] == len(rows)
    assert a["input_rows"] == a["not_selected"] + a["duplicate_rows_collapsed"] + a["rows_with_errors"] + a["sources"]
    assert a["sources"] == a["sources_with_outputs"] + a["sources_failed"] + a["sources_not_needed"]
    out_rows = read_table(str(tmp / "out" / "manifest.parquet")).to_pylist()
    assert len(out_rows) == a["sources_with_outputs"] == sum(k in ("good", "dup") for k in kinds)


def _phantom_rows(tmp_path: Path) -> list[dict]:
    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=12, resolution=64, seed=4))
    return [dict(r, **{"Support Devices": 1.0}) for r in read_table(data.manifest_uri).to_pylist()]


def _outcome(manifest: str, out: Path, **data) -> tuple[list[dict], list[dict]]:
    """One augment run (quota above the sources: every one is attempted) -> (manifest rows, error rows)."""
    with pytest.raises(RunIncomplete):
        run(config(manifest, out, **data))
    return (read_table(str(out / "manifest.parquet")).to_pylist(), read_table(str(out / "errors.parquet")).to_pylist())


def test_a_mask_that_is_a_decompression_bomb_is_its_rows_error(tmp_path):
    rows = _phantom_rows(tmp_path)
    bombs = {"bomb.png": _png_header_only(20000, 20000), "huge.png": _png_header_only(12000, 12000)}
    for name, content in bombs.items():
        (tmp_path / name).write_bytes(content)
    good = tmp_path / "keep.png"
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(good)
    for row, mask in zip(rows, ["bomb.png", "huge.png"] + ["keep.png"] * len(rows), strict=False):
        row["keep_mask"] = str(tmp_path / mask)
    manifest = str(tmp_path / "m.parquet")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), manifest)
    produced, errors = _outcome(manifest, tmp_path / "out", keep_mask_column="keep_mask")
    assert {r["source_uri"] for r in produced} == {r["image_uri"] for r in rows[2:]}
    reasons = {e["source_uri"]: e["reason"] for e in errors}
    for row, name in zip(rows, bombs, strict=False):
        reason = reasons[row["image_uri"]]
        assert f"data.keep_mask_column 'keep_mask': image '{tmp_path / name}': mask image too large" in reason, reason
    assert "max_pixels 100000000" in reasons[rows[1]["image_uri"]]  # the images' own limit, one definition


def test_a_path_that_is_not_utf8_fails_its_row_and_the_fixed_row_runs_on_re_run(tmp_path):
    import pyarrow.csv as pacsv

    rows = _phantom_rows(tmp_path)
    latin1 = os.fsencode(tmp_path) + b"/caf\xe9.png"  # a Latin-1 file name
    Path(os.fsdecode(latin1)).write_bytes(Path(rows[0]["image_uri"]).read_bytes())
    rows[0]["image_uri"] = "PLACEHOLDER"
    buf = io.BytesIO()
    pacsv.write_csv(pa.Table.from_pylist(rows), buf)
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(buf.getvalue().replace(b'"PLACEHOLDER"', latin1))
    produced, errors = _outcome(str(manifest), tmp_path / "out")
    assert {r["source_uri"] for r in produced} == {r["image_uri"] for r in rows[1:]}  # every other row
    bad = [e for e in errors if "not UTF-8" in e["reason"]]
    assert len(bad) == 1 and bad[0]["reason"].startswith("row 0 (") and "column 'image_uri'" in bad[0]["reason"]
    assert not [e for e in errors if "b'" in e["reason"]]  # no row became a "file not found" of bytes
    # The user renames the file to UTF-8 and fixes the manifest: the row runs on the re-run.
    fixed = str(tmp_path / "café.png")
    os.rename(latin1, fixed)
    manifest.write_bytes(manifest.read_bytes().replace(latin1, fixed.encode()))
    produced, _ = _outcome(str(manifest), tmp_path / "out")
    assert fixed in {r["source_uri"] for r in produced}
