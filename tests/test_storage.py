"""Manifests and images through fsspec: local and memory:// round trips, per-row image errors."""

import errno
import io
import os
import socket

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from prism_ray.data import images, storage
from prism_ray.data.images import DecodeConfig
from prism_ray.data.schemas import COUNTERFACTUAL_SCHEMA, ERROR_SCHEMA, rows_to_table
from prism_ray.data.storage import ImageReadError, read_image, read_table, write_png, write_table


def _manifest():
    return pa.table(
        {
            "image_uri": ["a.png", "b.png", "c.png"],
            "Cardiomegaly": [1.0, 0.0, None],
            "Pleural Effusion": [-1.0, 1.0, 0.0],
        }
    )


@pytest.mark.parametrize("root", ["local", "memory://prism-test"])
@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_manifest_round_trip(tmp_path, root, ext):
    base = str(tmp_path) if root == "local" else root
    uri = f"{base}/sub/manifest.{ext}"
    write_table(_manifest(), uri)
    back = read_table(uri)
    assert back.column("image_uri").to_pylist() == ["a.png", "b.png", "c.png"]
    assert back.column("Cardiomegaly").to_pylist() == [1.0, 0.0, None]  # blank stays blank
    assert back.column("Pleural Effusion").to_pylist() == [-1.0, 1.0, 0.0]


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_table(str(tmp_path / "missing.parquet"))
    write_table(_manifest(), str(tmp_path / "m.parquet"))
    with pytest.raises(ValueError, match="Edema"):
        read_table(str(tmp_path / "m.parquet"), columns=["image_uri", "Edema"])
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"manifest '.*empty\.csv': Empty CSV file"):
        read_table(str(tmp_path / "empty.csv"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"manifest '.*broken\.parquet'"):
        read_table(str(tmp_path / "broken.parquet"))


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("root", ["local", "memory://prism-img"])
def test_png_round_trip_is_lossless(tmp_path, root):
    base = str(tmp_path) if root == "local" else root
    rgb = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    write_png(rgb, f"{base}/out/x.png")
    assert np.array_equal(read_image(f"{base}/out/x.png"), rgb)


def test_grayscale_and_16bit_become_three_channels(tmp_path):
    gray = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 256
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "g.png")
    img = read_image(str(tmp_path / "g.png"))
    assert img.shape == (64, 64, 3) and np.array_equal(img[..., 0], img[..., 2])
    assert np.array_equal(img[..., 1], gray.astype(np.uint8))

    deep = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d16.png")
    img16 = read_image(str(tmp_path / "d16.png"))
    assert img16.shape == (64, 64, 3) and img16.dtype == np.uint8
    assert img16[0, 0, 0] == 0 and img16[-1, -1, 0] == 255

    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "j.jpg", quality=95)
    assert abs(int(read_image(str(tmp_path / "j.jpg"))[8, 8, 0]) - 200) <= 2


def test_missing_and_corrupt_images_raise_per_row_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "empty.png").write_bytes(b"")
    good = np.zeros((16, 16, 3), np.uint8)
    (tmp_path / "ok.png").write_bytes(_png_bytes(good))
    rows = ["ok.png", "missing.png", "bad.png", "empty.png"]
    images, errors = [], []
    for name in rows:
        try:
            images.append(read_image(str(tmp_path / name)))
        except ImageReadError as err:
            errors.append({"source_uri": err.uri, "stage": "read", "reason": err.reason})
    assert len(images) == 1
    assert [e["source_uri"].rsplit("/", 1)[1] for e in errors] == ["missing.png", "bad.png", "empty.png"]
    assert "not found" in errors[0]["reason"] and "corrupt" in errors[1]["reason"]
    table = rows_to_table(errors, ERROR_SCHEMA)  # the errors table takes them as they are
    assert table.num_rows == 3


ITEM_ERRNOS = ["ELOOP", "ENAMETOOLONG", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "ENOENT", "ENXIO", "EROFS"]
TRANSIENT_ERRNOS = ["EIO", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "EAGAIN", "ENOSPC", "ESTALE", "EMFILE"]


@pytest.mark.parametrize("name", ITEM_ERRNOS + TRANSIENT_ERRNOS)
def test_storage_errors_are_classified_by_errno_in_one_place(name):
    from prism_ray.pipelines.counterfactuals import is_transient

    code = getattr(errno, name)
    err = OSError(code, os.strerror(code), "/data/x.png")  # the subclass Python raises for it
    assert storage.is_transient_storage_error(err) is is_transient(err) is (name in TRANSIENT_ERRNOS)
    wrapped = FileNotFoundError("http://host/x.png")  # how fsspec's HTTP filesystem reports a failed GET
    wrapped.__cause__ = err
    assert storage.is_transient_storage_error(wrapped) is (name in TRANSIENT_ERRNOS)


def test_errors_of_a_local_path_are_item_errors_naming_the_file_and_the_errno(tmp_path):
    from prism_ray.pipelines.counterfactuals import is_transient

    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")  # a symlink loop
    (tmp_path / "file.png").write_bytes(_png_bytes(np.zeros((16, 16), np.uint8)))
    (tmp_path / "folder").mkdir()
    cases = {
        "a.png": "ELOOP",
        "x" * 300 + ".png": "ENAMETOOLONG",
        "file.png/inside.png": "ENOTDIR",
        "folder": "EISDIR",
        "missing.png": "file not found",
    }
    for name, expected in cases.items():
        uri = str(tmp_path / name)
        with pytest.raises(OSError) as raw:  # what the read path is given
            open(uri, "rb").close()
        assert not is_transient(raw.value), name
        with pytest.raises(ImageReadError) as info:
            storage.read_image_bytes(uri)
        assert info.value.uri == uri and expected in info.value.reason, info.value.reason


def test_a_refused_http_connection_is_a_transient_connection_error_naming_the_uri():
    pytest.importorskip("aiohttp")  # fsspec's HTTP filesystem
    from prism_ray.pipelines.counterfactuals import is_transient

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}/images/x.png"
    with pytest.raises(ConnectionError) as info:
        storage.read_image_bytes(uri)
    assert info.value.errno == errno.ECONNREFUSED and is_transient(info.value)
    assert f"image '{uri}': connection error (ECONNREFUSED" in str(info.value)
    assert "not found" not in str(info.value)


def test_storage_reads_images_through_the_one_decoding_policy(tmp_path):
    # One definition: the errors storage raises are the images module's, and read_image takes its config.
    assert storage.ImageReadError is images.ImageReadError
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255
    (tmp_path / "w.png").write_bytes(_png_bytes(wide))
    assert read_image(str(tmp_path / "w.png")).shape == (20, 40, 3)  # the 8-pixel floor for reading back
    with pytest.raises(ImageReadError, match="20x40|40x20"):
        read_image(str(tmp_path / "w.png"), min_side=images.default_min_side(8))
    with pytest.raises(ImageReadError, match="max_pixels 100"):
        read_image(str(tmp_path / "w.png"), DecodeConfig(max_pixels=100))


def test_schema_rejects_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        rows_to_table([{"bogus": 1}], COUNTERFACTUAL_SCHEMA)
