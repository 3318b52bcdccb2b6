"""Manifest rows -> sources with captions; bad rows become error rows, not crashes."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from prism_ray.data.config import DataConfig
from prism_ray.data.manifest import (
    ROW_COLUMN,
    collapse_duplicates,
    normalise_labels,
    prepare_manifest,
    read_sources,
    select_rows,
)
from prism_ray.data.storage import read_table, write_table

LABELS = ["Cardiomegaly", "Pleural Effusion", "Support Devices"]


def _table():
    return pa.table(
        {
            "image_uri": ["a.png", "b.png", "", "s3://bucket/d.png"],
            "split": ["train", "train", "train", "valid"],
            "Cardiomegaly": [1.0, 0.0, 0.0, -1.0],
            "Pleural Effusion": [0.0, None, 1.0, 0.0],
            "Support Devices": [1.0, 0.0, 0.0, 1.0],
        }
    )


def test_captions_from_labels_and_uri_resolution(tmp_path):
    uri = str(tmp_path / "m.parquet")
    write_table(_table(), uri)
    sources, errors = read_sources(DataConfig(manifest=uri, image_root="/data/cxr", adapter_options={"labels": LABELS}))
    assert [s.image_uri for s in sources] == ["/data/cxr/a.png", "/data/cxr/b.png", "s3://bucket/d.png"]
    assert [s.caption for s in sources] == [
        "Chest X-ray showing Cardiomegaly, Support Devices",
        "Normal chest X-ray with no significant findings",
        "Chest X-ray showing Support Devices",  # uncertain cardiomegaly is absent by default
    ]
    assert [(e.stage, e.reason) for e in errors] == [("read", "row 2: empty 'image_uri'")]


def test_policies_and_split(tmp_path):
    uri = str(tmp_path / "m.csv")
    write_table(_table(), uri)
    cfg = DataConfig(manifest=uri, adapter_options={"uncertain": "drop", "labels": LABELS})
    sources, errors = read_sources(cfg)
    assert len(sources) == 2 and any(e.stage == "caption" and "Cardiomegaly" in e.reason for e in errors)
    train, _ = read_sources(DataConfig(manifest=uri, split="train", limit=2, adapter_options={"labels": LABELS}))
    assert [s.index for s in train] == [0, 1]


def test_caption_column_is_used_and_empty_captions_are_errors(tmp_path):
    table = pa.table({"image_uri": ["a.png", "b.png"], "caption": ["a chest x-ray", "  "]})
    uri = str(tmp_path / "c.parquet")
    write_table(table, uri)
    sources, errors = read_sources(DataConfig(manifest=uri))
    assert [s.caption for s in sources] == ["a chest x-ray"]
    # Reasons now name the image too (they used to give the row number alone).
    assert errors[0].reason == "row 1 ('b.png'): empty caption"


def test_missing_label_columns_fail_once_naming_them(tmp_path):
    uri = str(tmp_path / "m.parquet")
    write_table(_table(), uri)
    with pytest.raises(ValueError, match="No Finding"):
        read_sources(DataConfig(manifest=uri))  # the full 14 CheXpert labels are expected


# ---------------------------------------------------------------- label schema


def _csv(tmp_path, text: str) -> str:
    uri = str(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text(text)
    return uri


def _selects(table: pa.Table, column: str, value) -> list[int]:
    """Input rows a subgroup selector {column: value} picks, the way the augment job matches."""
    col = table.column(column)
    mask = pc.fill_null(pc.is_in(col, value_set=pa.array([value]).cast(col.type)), False)
    return table.filter(mask).column(ROW_COLUMN).to_pylist()


CSV_WITH_YES = """image_uri,patient_name,Cardiomegaly,Support Devices
a.png,Ann Smith,1,1
b.png,Bob Jones,0,yes
c.png,Cy Brown,1,0
d.png,Di White,,1
"""


def test_one_bad_cell_drops_its_row_and_the_other_rows_still_match(tmp_path):
    uri = _csv(tmp_path, CSV_WITH_YES)
    assert read_table(uri).schema.field("Support Devices").type == pa.string()  # the CSV inference trap
    config = DataConfig(manifest=uri, adapter_options={"labels": ["Cardiomegaly", "Support Devices"]})
    manifest = prepare_manifest(config)
    assert [(e.source_uri, e.stage, e.reason) for e in manifest.errors] == [
        ("b.png", "read", "row 1 ('b.png'): column 'Support Devices': value 'yes' not in {1, 0, -1, blank}")
    ]
    table = manifest.table
    assert table.schema.field("Support Devices").type == pa.float64()
    assert _selects(table, "Support Devices", 1) == [0, 3]
    assert _selects(table, "Cardiomegaly", 1) == [0, 2]
    assert table.column("Cardiomegaly").to_pylist() == [1.0, 1.0, None]  # blank stays blank (null)
    sources, errors = read_sources(config)
    assert [s.index for s in sources] == [0, 2, 3] and len(errors) == 1
    assert ROW_COLUMN not in sources[0].row
    # Reasons carry the image URI and label values only, never other columns (patient names).
    assert not any(name in e.reason for e in errors for name in ("Bob", "Jones"))


@pytest.mark.parametrize(
    "cell, error",
    [
        # pyarrow alone reads the column 1/True/0 as booleans (row 0 would become True too).
        ("True", "value 'True' not in {1, 0, -1, blank}"),
        ("2", "value '2' not in {1, 0, -1, blank}"),
        ("yes", "value 'yes' not in {1, 0, -1, blank}"),
        ("1.0", None),
        ("-1", None),
        ("", None),
        ("NA", None),
    ],
)
def test_finding_cells(tmp_path, cell, error):
    uri = _csv(tmp_path, f"image_uri,Edema\na.png,1\nb.png,{cell}\nc.png,0\n")
    config = DataConfig(manifest=uri, adapter_options={"labels": ["Edema"]})
    manifest = prepare_manifest(config)
    assert manifest.table.schema.field("Edema").type == pa.float64()
    assert _selects(manifest.table, "Edema", 1) == ([0] if cell != "1.0" else [0, 1])
    assert _selects(manifest.table, "Edema", 0) == [2]
    if error is None:
        assert manifest.errors == [] and manifest.table.num_rows == 3
    else:
        assert [e.reason for e in manifest.errors] == [f"row 1 ('b.png'): column 'Edema': {error}"]


def test_row_numbers_are_input_rows_after_split_filtering(tmp_path):
    uri = _csv(
        tmp_path,
        "image_uri,split,Edema\na.png,train,1\nb.png,valid,1\nc.png,valid,maybe\nd.png,train,0\ne.png,valid,0\n",
    )
    config = DataConfig(manifest=uri, split="valid", adapter_options={"labels": ["Edema"]})
    assert select_rows(read_table(uri), config).column(ROW_COLUMN).to_pylist() == [1, 2, 4]
    sources, errors = read_sources(config)
    assert [s.index for s in sources] == [1, 4]
    assert [e.reason for e in errors] == ["row 2 ('c.png'): column 'Edema': value 'maybe' not in {1, 0, -1, blank}"]
    # Selecting on the prepared table first (as the augment job does) keeps the input row numbers.
    manifest = prepare_manifest(config)
    subset = manifest.table.filter(pc.equal(manifest.table.column("Edema"), 0.0))
    assert [s.index for s in read_sources(config, subset)[0]] == [4]


def test_caption_policy_errors_name_the_input_row(tmp_path):
    uri = str(tmp_path / "m.parquet")
    write_table(_table(), uri)
    config = DataConfig(manifest=uri, split="valid", adapter_options={"uncertain": "drop", "labels": LABELS})
    sources, errors = read_sources(config)
    assert sources == [] and [e.reason for e in errors] == [
        "row 3 ('s3://bucket/d.png'): column 'Cardiomegaly': uncertain (-1) label and uncertain='drop'"
    ]


def test_duplicates_collapse_and_conflicting_rows_are_errors(tmp_path):
    uri = _csv(
        tmp_path,
        "image_uri,Edema,Fracture\n"
        "a.png,1,0\n"  # 0
        "b.png,0,0\n"  # 1
        "a.png,1,0\n"  # 2: exact copy of 0
        "c.png,1,0\n"  # 3
        "c.png,0,0\n"  # 4: c.png again with another Edema label
        "/data/a.png,1.0,0\n"  # 5: the same file as 0 once resolved; 1.0 reads as 1
        "copy_of_b.png,0,0\n",  # 6: same labels (and maybe bytes) as 1 under another path: kept
    )
    config = DataConfig(manifest=uri, image_root="/data", adapter_options={"labels": ["Edema", "Fracture"]})
    manifest = prepare_manifest(config)
    assert manifest.duplicate_rows_collapsed == 2
    assert manifest.table.column(ROW_COLUMN).to_pylist() == [0, 1, 6]
    assert [(e.source_uri, e.reason) for e in manifest.errors] == [
        ("/data/c.png", "rows 3 and 4 give 'c.png' different labels (Edema)"),
        ("/data/c.png", "rows 3 and 4 give 'c.png' different labels (Edema)"),
    ]
    sources, errors = read_sources(config)
    assert [s.index for s in sources] == [0, 1, 6] and len(errors) == 2


def test_same_image_with_different_other_columns_names_the_columns_not_values(tmp_path):
    table = pa.table(
        {"image_uri": ["x.png", "x.png", "x.png"], "patient_id": ["P17", "P17", "P99"], "Edema": [1.0, 1.0, 1.0]}
    )
    config = DataConfig(manifest="m.parquet", adapter_options={"labels": ["Edema"]})
    kept, errors, collapsed = collapse_duplicates(table, config)
    assert kept.num_rows == 0 and collapsed == 0
    assert [e.reason for e in errors] == ["rows 0, 1 and 2 give 'x.png' different values in column(s) 'patient_id'"] * 3


def test_parquet_typed_columns_pass_through(tmp_path):
    edema = pa.chunked_array([pa.array([1.0, 0.0, None, -1.0])])
    table = pa.table(
        {
            "image_uri": ["a.png", "b.png", "c.png", "d.png"],
            "Edema": edema,
            "Fracture": pa.array([1, 0, 0, -1], pa.int8()),
        }
    )
    uri = str(tmp_path / "m.parquet")
    write_table(table, uri)
    config = DataConfig(manifest=uri, adapter_options={"labels": ["Edema", "Fracture"]})
    manifest = prepare_manifest(config)
    assert manifest.errors == [] and manifest.duplicate_rows_collapsed == 0
    assert manifest.table.column("Edema").equals(read_table(uri).column("Edema"))
    assert manifest.table.column("Fracture").to_pylist() == [1.0, 0.0, 0.0, -1.0]
    assert manifest.table.schema.field("Fracture").type == pa.float64()
    # Preparing a prepared table changes nothing (callers may select on it, then read sources).
    again = prepare_manifest(config, manifest.table)
    assert again.table.equals(manifest.table) and again.errors == []


def test_typed_column_with_an_out_of_range_value_is_a_row_error():
    table = pa.table({"image_uri": ["a.png", "b.png"], "Edema": [1.0, 2.0]})
    config = DataConfig(manifest="m.parquet", adapter_options={"labels": ["Edema"]})
    kept, errors = normalise_labels(table, config)
    assert kept.column(ROW_COLUMN).to_pylist() == [0]
    assert [e.reason for e in errors] == ["row 1 ('b.png'): column 'Edema': value '2.0' not in {1, 0, -1, blank}"]


def test_mimic_and_isic_label_schemas(tmp_path):
    uri = _csv(
        tmp_path,
        "image_uri,age,race,sex,Edema\n"
        "a.png,67,white,F,1\n"
        "b.png,63.5,white,M,0\n"
        "c.png,70,Black,X,0\n"
        "d.png,45,asian,M,0\n",
    )
    config = DataConfig(manifest=uri, adapter="mimic", adapter_options={"labels": ["Edema"]})
    sources, errors = read_sources(config)
    assert [s.caption for s in sources] == [
        "Chest X-ray of 67-years old white female subject with Edema",
        "Chest X-ray of 45-years old asian male subject with no findings",
    ]
    assert [e.reason for e in errors] == [
        "row 1 ('b.png'): column 'age': value '63.5' not in {0, 1, 2, ..., blank}",
        "row 2 ('c.png'): column 'sex': value 'X' not in {'M', 'F', 'male', 'female', blank}",
    ]
    uri = _csv(
        tmp_path,
        "image_uri,diagnosis,hair,gel_bubble,ruler,ink\n"
        "a.png,MEL,true,0,1,\n"
        "b.png,BCC,0,0,0,0\n"
        "c.png,NV,maybe,0,0,0\n",
    )
    sources, errors = read_sources(DataConfig(manifest=uri, adapter="isic"))
    assert [s.caption for s in sources] == ["a dermoscopic image with melanoma showing hair, ruler"]
    assert [e.reason for e in errors] == [
        "row 1 ('b.png'): column 'diagnosis': value 'BCC' not in {'MEL', 'NV', 'melanoma', 'nevus', blank}",
        "row 2 ('c.png'): column 'hair': value 'maybe' not in {true, false, 1, 0, blank}",
    ]


def test_a_path_that_is_not_utf8_fails_its_own_row_only(tmp_path):
    # One Latin-1 byte makes pyarrow read the whole CSV column as bytes.
    (tmp_path / "m.csv").write_bytes(b"image_uri,Edema\na.png,1\ncaf\xe9.png,0\nb.png,0\n")
    config = DataConfig(manifest=str(tmp_path / "m.csv"), image_root="/data", adapter_options={"labels": ["Edema"]})
    assert pa.types.is_binary(read_table(config.manifest).schema.field("image_uri").type)
    sources, errors = read_sources(config)
    assert [(s.index, s.image_uri) for s in sources] == [(0, "/data/a.png"), (2, "/data/b.png")]
    assert [(e.source_uri, e.stage) for e in errors] == [(None, "read")]  # no URI: the renamed row is a new source
    assert errors[0].reason.startswith("row 1 ('caf\\udce9.png'): column 'image_uri' is not UTF-8 (byte 0xe9 at 3)")
    manifest = prepare_manifest(config)
    assert manifest.input_rows == 3 and manifest.table.schema.field("image_uri").type == pa.string()
    assert prepare_manifest(config, manifest.table).table.equals(manifest.table)  # idempotent


def test_an_empty_manifest_file_is_named(tmp_path):
    uri = _csv(tmp_path, "")
    with pytest.raises(ValueError, match=rf"manifest '{uri}': Empty CSV file"):
        read_sources(DataConfig(manifest=uri))
