"""Manifest rows -> sources with captions; bad rows become error rows, not crashes."""

import pyarrow as pa

from prism_ray.data.config import DataConfig
from prism_ray.data.manifest import read_sources
from prism_ray.data.storage import write_table

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
    assert errors[0].reason == "row 1: empty caption"


def test_missing_label_columns_fail_once_naming_them(tmp_path):
    uri = str(tmp_path / "m.parquet")
    write_table(_table(), uri)
    import pytest

    with pytest.raises(ValueError, match="No Finding"):
        read_sources(DataConfig(manifest=uri))  # the full 14 CheXpert labels are expected
