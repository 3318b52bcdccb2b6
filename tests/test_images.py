"""Input decoding: every Pillow mode and DICOM against a plain reference decoding, and every bad file as an item error."""

import io
import struct
import sys
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prism_ray.config import ConfigError
from prism_ray.data.images import DecodeConfig, ImageReadError, decode_image, default_min_side, make_square

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (64, 80), dtype=np.uint8)
RGB = RNG.integers(0, 256, (64, 80, 3), dtype=np.uint8)


def _save(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _scaled(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The plain reference: linear map lo..hi -> 0..255, rounded."""
    return np.rint(np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


# --- Pillow modes ---------------------------------------------------------------------------


def test_8bit_gray_and_rgb_are_exact():
    out = decode_image(_save(Image.fromarray(GRAY)), "g.png")
    assert out.dtype == np.uint8 and out.shape == (64, 80, 3)
    assert np.array_equal(out, _gray3(GRAY))
    assert np.array_equal(decode_image(_save(Image.fromarray(RGB)), "c.png"), RGB)


def test_bilevel_becomes_black_and_white():
    bits = GRAY > 127
    out = decode_image(_save(Image.fromarray(bits)), "b.png")
    assert Image.open(io.BytesIO(_save(Image.fromarray(bits)))).mode == "1"
    assert np.array_equal(out, _gray3(bits.astype(np.uint8) * 255))


def test_palette_decodes_as_its_colours():
    # A gray palette image decodes as the same image saved as L.
    gray_p = Image.fromarray(GRAY).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    as_l = np.asarray(gray_p.convert("L"))
    assert np.array_equal(decode_image(_save(gray_p), "p.png"), _gray3(as_l))
    # A colour palette decodes as its RGB.
    colour_p = Image.fromarray(RGB).quantize(colors=32)
    assert np.array_equal(decode_image(_save(colour_p), "p.gif"), np.asarray(colour_p.convert("RGB")))
    assert np.array_equal(decode_image(_save(colour_p, "GIF"), "p.gif"), np.asarray(colour_p.convert("RGB")))


def _composite_reference(rgba: np.ndarray, background: int) -> np.ndarray:
    """Pillow's own alpha_composite over a solid background: an independent oracle (±1 rounding)."""
    under = Image.new("RGBA", rgba.shape[1::-1], (background, background, background, 255))
    return np.asarray(Image.alpha_composite(under, Image.fromarray(rgba, "RGBA")).convert("RGB")).astype(int)


@pytest.mark.parametrize("background", [0, 255, 90])
def test_alpha_is_composited_on_the_background(background):
    alpha = RNG.integers(0, 256, (64, 80), dtype=np.uint8)
    config = DecodeConfig(alpha_background=background)
    rgba = np.dstack([RGB, alpha])
    out = decode_image(_save(Image.fromarray(rgba, "RGBA")), "a.png", config)
    assert np.abs(out.astype(int) - _composite_reference(rgba, background)).max() <= 1
    la = np.dstack([GRAY, alpha])
    out = decode_image(_save(Image.fromarray(la, "LA")), "la.png", config)
    by_hand = np.rint(GRAY * (alpha / 255) + background * (1 - alpha / 255)).astype(int)
    assert np.abs(out[..., 0].astype(int) - by_hand).max() <= 1 and np.array_equal(out[..., 0], out[..., 2])
    # A palette with a transparent entry (tRNS) is composited too.
    p = Image.fromarray(GRAY).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    index = np.asarray(p)
    out = decode_image(_save(p, transparency=int(index[0, 0])), "t.png", config)
    assert np.array_equal(out[index == index[0, 0]], np.full(((index == index[0, 0]).sum(), 3), background))


def test_cmyk_jpeg_decodes_close_to_its_rgb():
    smooth = np.dstack([np.tile(np.linspace(20, 230, 80), (64, 1))] * 2 + [np.full((64, 80), 128.0)]).astype(
        np.uint8
    )
    data = _save(Image.fromarray(smooth).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"  # and libjpeg writes an Adobe (inverted) CMYK
    out = decode_image(data, "cmyk.jpg")
    assert np.abs(out.astype(int) - smooth).mean() < 2  # not inverted, not channel-swapped


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_is_divided_by_its_bit_depth(dtype, fmt):
    deep = (RNG.integers(0, 65536, (64, 80))).astype(dtype)
    data = _save(Image.fromarray(deep), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data, f"d.{fmt.lower()}")
    assert np.array_equal(out, _gray3(_scaled(deep, 0, 65535)))
    assert (
        np.abs(out[..., 0].astype(int) - (deep.astype(int) >> 8)).max() <= 1
    )  # the top byte, within rounding
    # `range` stretches this image's own min..max instead (a 12-bit scan in a 16-bit container).
    dim = (deep.astype(np.int64) // 16 + 100).astype(dtype)
    out = decode_image(_save(Image.fromarray(dim), fmt), "d", DecodeConfig(integer_range="range"))
    assert np.array_equal(out, _gray3(_scaled(dim, dim.min(), dim.max())))


def test_12bit_data_in_a_16bit_png_warns_once_naming_the_file_and_the_setting(caplog):
    twelve = RNG.integers(0, 4096, (64, 80)).astype(np.uint16)  # a 12-bit scan saved as a 16-bit PNG
    with caplog.at_level("WARNING", logger="prism_ray.images"):
        out = decode_image(_save(Image.fromarray(twelve)), "scan12.png")
    assert np.array_equal(out, _gray3(_scaled(twelve, 0, 65535))) and out.max() <= 16  # nearly black
    warned = [r.getMessage() for r in caplog.records if r.name == "prism_ray.images"]
    assert len(warned) == 1 and "image 'scan12.png'" in warned[0] and "16-bit" in warned[0]
    assert "data.decode.integer_range=range" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="prism_ray.images"):
        stretched = decode_image(_save(Image.fromarray(twelve)), "scan12.png", DecodeConfig(integer_range="range"))
        decode_image(_save(Image.fromarray(twelve * 16)), "full16.png")  # fills its 16 bits
        decode_image(_save(Image.fromarray(GRAY // 16)), "dark8.png")  # an 8-bit image this dark is dark
        decode_image(_dicom(MONO12), "twelve.dcm")  # declares BitsStored 12
    assert np.array_equal(stretched, _gray3(_scaled(twelve, twelve.min(), twelve.max())))
    assert not [r for r in caplog.records if r.name == "prism_ray.images"]


def test_32bit_integer_tiff():
    values = RNG.integers(0, 2**31 - 1, (64, 80)).astype(np.int32)
    data = _save(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.array_equal(decode_image(data, "i.tif"), _gray3(_scaled(values, 0, 2**31 - 1)))
    negative = values - 2**30
    with pytest.raises(ImageReadError, match="outside the declared.*integer_range=range"):
        decode_image(_save(Image.fromarray(negative), "TIFF"), "n.tif")
    out = decode_image(_save(Image.fromarray(negative), "TIFF"), "n.tif", DecodeConfig(integer_range="range"))
    assert np.array_equal(out, _gray3(_scaled(negative, negative.min(), negative.max())))


def test_float_tiff_under_each_float_range():
    values = (RNG.standard_normal((64, 80)) * 0.4 + 0.5).astype(np.float32)
    data = _save(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    with pytest.raises(ImageReadError, match="float_range"):
        decode_image(data, "f.tif")  # the default: floats carry no scale
    out = decode_image(data, "f.tif", DecodeConfig(float_range="unit"))
    assert np.array_equal(out, _gray3(_scaled(values, 0.0, 1.0)))
    out = decode_image(data, "f.tif", DecodeConfig(float_range="range"))
    assert np.array_equal(out, _gray3(_scaled(values, values.min(), values.max())))
    values[3, 3] = np.nan
    with pytest.raises(ImageReadError, match="non-finite"):
        decode_image(_save(Image.fromarray(values), "TIFF"), "nan.tif", DecodeConfig(float_range="unit"))
    with pytest.raises(ImageReadError, match="constant image"):
        decode_image(
            _save(Image.fromarray(np.ones((64, 64), np.float32)), "TIFF"),
            "c",
            DecodeConfig(float_range="range"),
        )


def test_exif_orientation_is_applied():
    upright = np.zeros((64, 96), np.uint8)
    upright[:, :48] = 255  # left half white: 64 tall, 96 wide as displayed
    # Orientation 6 means "rotate 90 CW to display": the file stores the image rotated 90 CCW.
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_save(stored, "JPEG", quality=95, exif=exif), "r.jpg")
    assert out.shape == (64, 96, 3)
    assert out[:, :40].mean() > 250 and out[:, 56:].mean() < 5


def test_multi_frame_files_are_rejected():
    frames = [Image.fromarray(GRAY), Image.fromarray(255 - GRAY)]
    for fmt in ("GIF", "TIFF"):
        data = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(ImageReadError, match="2 frames"):
            decode_image(data, f"stack.{fmt.lower()}")


# --- sizes and bombs ------------------------------------------------------------------------


def test_too_small_images_are_rejected_naming_the_size():
    data = _save(Image.fromarray(np.zeros((10, 10), np.uint8)))
    with pytest.raises(ImageReadError, match=r"too small: 10x10 \(shorter side 10 < 64\)"):
        decode_image(data, "tiny.png")
    assert decode_image(data, "tiny.png", min_side=8).shape == (10, 10, 3)  # the caller's floor
    with pytest.raises(ImageReadError, match="< 12"):
        decode_image(data, "tiny.png", DecodeConfig(min_side=12), min_side=8)  # the config's wins
    assert default_min_side(8) == 64 and default_min_side(4) == 32  # SD v1.5, the tiny family
    strip = _save(Image.fromarray(np.zeros((40, 400), np.uint8)))
    with pytest.raises(ImageReadError, match="400x40"):
        decode_image(strip, "strip.png")


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR of any size and an empty IDAT: the file is tiny, the image is not."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [20000, 12000])
def test_bombs_fail_fast_without_allocating(side):
    data = _png_header_only(side, side)
    assert len(data) < 100
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="too large") as info:
        decode_image(data, "bomb.png")
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 0.5 and peak < 5_000_000  # a decoded 12000^2 gray image would be 144 MB
    # 20000^2 trips Pillow's own bomb check (pixel count); 12000^2 trips max_pixels (size).
    assert str(side * side) in info.value.reason and info.value.uri == "bomb.png"
    if side == 12000:
        assert "12000x12000" in info.value.reason and "max_pixels 100000000" in info.value.reason


def test_max_pixels_is_configurable():
    data = _save(Image.fromarray(GRAY))
    with pytest.raises(ImageReadError, match="80x64 = 5120 pixels > max_pixels 5000"):
        decode_image(data, "g.png", DecodeConfig(max_pixels=5000))


# --- broken files ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP", "BMP"])
def test_truncated_files_are_item_errors(fmt):
    data = _save(Image.fromarray(RGB), fmt)
    for cut in (len(data) // 2, 40, 8):
        with pytest.raises(ImageReadError) as info:
            decode_image(data[:cut], f"cut.{fmt.lower()}")
        assert info.value.reason


@pytest.mark.parametrize(
    "data", [b"not an image at all" * 20, bytes(300), b"\x89PNG\r\n\x1a\n" + b"\x00" * 64]
)
def test_garbage_is_an_item_error(data):
    with pytest.raises(ImageReadError, match="corrupt"):
        decode_image(data, "junk.png")


def test_eps_is_not_opened():
    # Pillow can open EPS by running Ghostscript: not for input images.
    with pytest.raises(ImageReadError, match="unsupported"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n", "x.eps")


_SEED_FILES = [
    _save(Image.fromarray(GRAY)),
    _save(Image.fromarray(RGB), "JPEG"),
    _save(Image.fromarray(GRAY), "TIFF"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(_SEED_FILES))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
)
def test_corrupted_bytes_decode_or_raise_an_item_error(seed, flips):
    data = bytearray(_SEED_FILES[seed])
    for pos, value in flips:
        data[pos % len(data)] = value
    try:
        out = decode_image(bytes(data), "fuzz", min_side=8)
    except ImageReadError as err:
        assert err.reason
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


# --- squares --------------------------------------------------------------------------------


def test_make_square_crops_or_pads_around_the_centre():
    image = np.arange(5 * 8).reshape(5, 8).astype(np.uint8)
    assert np.array_equal(make_square(image, "center_crop"), image[:, 1:6])  # odd pixel at the right
    padded = make_square(image, "pad", background=7)
    assert padded.shape == (8, 8)
    assert np.array_equal(padded[1:6], image) and (padded[0] == 7).all() and (padded[6:] == 7).all()
    tall = np.ones((9, 4, 3), np.uint8)
    assert make_square(tall, "pad", 0).shape == (9, 9, 3) and make_square(tall, "pad", 0)[:, :2].max() == 0
    assert make_square(tall, "center_crop").shape == (4, 4, 3)
    square = np.zeros((6, 6), np.uint8)
    assert make_square(square, "pad") is square
    with pytest.raises(ValueError, match="square"):
        make_square(image, "stretch")


def test_decode_config_is_validated_by_field():
    with pytest.raises(ValueError, match="alpha_background"):
        DecodeConfig(alpha_background=256)
    with pytest.raises(ValueError, match="square"):
        DecodeConfig(square="stretch")
    with pytest.raises(ValueError, match="bogus"):
        DecodeConfig(bogus=1)
    assert not issubclass(ConfigError, ImageReadError)  # config errors stop the job, image errors one row


# --- DICOM ----------------------------------------------------------------------------------

pydicom = pytest.importorskip("pydicom")
# Below the importorskip (E402): without pydicom the module is skipped, not an import error.
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)


def _dicom(
    pixels: np.ndarray,
    photometric="MONOCHROME2",
    bits=12,
    signed=False,
    syntax=ExplicitVRLittleEndian,
    preamble=True,
    **elements,
) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    frames = pixels.shape[0] if elements.pop("frames", False) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if pixels.ndim - (frames > 1) == 3 else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


MONO12 = RNG.integers(0, 4096, (64, 72)).astype(np.uint16)


def test_dicom_monochrome2_uses_the_stored_bit_depth_and_is_found_by_its_magic():
    data = _dicom(MONO12)
    assert data[128:132] == b"DICM"
    out = decode_image(data, "s3://bucket/no_suffix")  # found by the magic, not the name
    assert np.array_equal(out, _gray3(_scaled(MONO12, 0, 4095)))
    out = decode_image(data, "x.dcm", DecodeConfig(integer_range="range"))
    assert np.array_equal(out, _gray3(_scaled(MONO12, MONO12.min(), MONO12.max())))


def test_dicom_without_preamble_is_found_by_suffix():
    data = _dicom(MONO12, preamble=False)
    assert data[128:132] != b"DICM"
    assert np.array_equal(decode_image(data, "bare.DCM"), _gray3(_scaled(MONO12, 0, 4095)))


def _bare_dicom(pixels: np.ndarray, implicit: bool = True) -> bytes:
    """A dataset as some archives export it: no 128-byte preamble, no file meta, implicit VR little endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, True
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("uri", ["bare.dcm", "s3://bucket/bare_no_suffix"])
def test_bare_dicom_without_preamble_or_file_meta_is_read(implicit, uri):
    data = _bare_dicom(MONO12, implicit)
    assert data[128:132] != b"DICM" and data[:4] == b"\x08\x00\x16\x00"  # (0008,0016) SOP Class UID first
    assert np.array_equal(decode_image(data, uri), _gray3(_scaled(MONO12, 0, 4095)))


def test_only_data_that_opens_with_a_dicom_element_or_is_named_dcm_is_forced_open_as_dicom():
    # (0010,0010) Patient's Name first: a dataset would not start there, and without a name it is not DICOM.
    with pytest.raises(ImageReadError, match="corrupt or unsupported image"):
        decode_image(b"\x10\x00\x10\x00" + bytes(200), "no_suffix")
    with pytest.raises(ImageReadError, match="corrupt or unsupported image"):  # a length past the end
        decode_image(b"\x08\x00\x16\x00" + b"\xff\x00\x00\x00" + bytes(200), "no_suffix")
    with pytest.raises(ImageReadError, match="without pixel data"):  # the user says DICOM: forced, found empty
        decode_image(b"definitely not dicom" * 10, "fake.dcm")


def test_dicom_monochrome1_is_the_inverted_monochrome2():
    eight = RNG.integers(0, 256, (64, 64)).astype(np.uint8)
    m1 = decode_image(_dicom(eight, "MONOCHROME1", bits=8), "m1.dcm")
    m2 = decode_image(_dicom(eight, "MONOCHROME2", bits=8), "m2.dcm")
    assert np.array_equal(m2, _gray3(eight)) and np.array_equal(m1, 255 - m2)
    windowed = {"WindowCenter": 2000, "WindowWidth": 1001}
    m1 = decode_image(_dicom(MONO12, "MONOCHROME1", **windowed), "m1.dcm").astype(int)
    m2 = decode_image(_dicom(MONO12, "MONOCHROME2", **windowed), "m2.dcm").astype(int)
    assert np.abs(m1 - (255 - m2)).max() <= 1  # rounding at exact halves only


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_dicom_rescale_then_window_matches_hand_computation(function):
    from pydicom.pixels import apply_voi_lut

    slope, intercept, center, width = 2.0, -1024.0, 40.0, 400.0
    data = _dicom(
        MONO12,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
        VOILUTFunction=function,
    )
    hu = MONO12 * slope + intercept
    if function == "LINEAR":  # PS3.3 C.11.2.1.2.1
        unit = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    elif function == "LINEAR_EXACT":
        unit = np.clip((hu - center) / width + 0.5, 0, 1)
    else:
        unit = 1 / (1 + np.exp(-4 * (hu - center) / width))
    out = decode_image(data, "ct.dcm")
    assert np.array_equal(out, _gray3(np.rint(unit * 255).astype(np.uint8)))
    # pydicom's windowing, mapped from its output range (the rescaled stored range) to 0..255, agrees.
    ds = pydicom.dcmread(io.BytesIO(data))
    lo, hi = intercept, 4095 * slope + intercept
    theirs = (apply_voi_lut(hu, ds) - lo) / (hi - lo)
    assert np.abs(out[..., 0] - theirs * 255).max() <= 0.5 + 1e-6


def test_dicom_voi_lut_sequence_is_applied():
    item = Dataset()
    item.LUTDescriptor = [256, 1000, 12]  # 256 entries, the first maps stored value 1000, 12-bit output
    lut = (4095 - 16 * np.arange(256)).astype(np.uint16)  # a decreasing LUT
    item.LUTData = lut.astype("<u2").tobytes()
    data = _dicom(MONO12, VOILUTSequence=[item], WindowCenter=2000, WindowWidth=10)  # the LUT wins
    out = decode_image(data, "lut.dcm")
    expected = lut[np.clip(MONO12.astype(int) - 1000, 0, 255)]  # values outside the LUT take its end entries
    assert np.array_equal(out, _gray3(_scaled(expected, 0, 4095)))


def test_dicom_signed_pixels_use_the_signed_range():
    signed = RNG.integers(-2048, 2048, (64, 64)).astype(np.int16)
    out = decode_image(_dicom(signed, bits=12, signed=True), "s.dcm")
    assert np.array_equal(out, _gray3(_scaled(signed, -2048, 2047)))


def test_dicom_rgb():
    out = decode_image(_dicom(RGB, "RGB", bits=8), "rgb.dcm")
    assert np.array_equal(out, RGB)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_dicom_lossless_compressed_decodes_exactly(syntax):
    assert np.array_equal(
        decode_image(_dicom(MONO12, syntax=syntax), "c.dcm"), _gray3(_scaled(MONO12, 0, 4095))
    )


def test_dicom_jpeg_baseline():
    eight = np.tile(np.linspace(0, 255, 64), (64, 1)).astype(np.uint8)
    jpeg = _save(Image.fromarray(eight), "JPEG", quality=95)
    data = _dicom(eight, bits=8, syntax=JPEGBaseline8Bit, PixelData=encapsulate([jpeg]))
    out = decode_image(data, "j.dcm")
    assert np.abs(out[..., 0].astype(int) - np.asarray(Image.open(io.BytesIO(jpeg))).astype(int)).max() <= 2


def test_dicom_without_a_decoder_names_the_transfer_syntax_and_the_extra():
    data = _dicom(
        MONO12, syntax="1.2.840.10008.1.2.4.100", PixelData=encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    )
    with pytest.raises(ImageReadError, match=r"1\.2\.840\.10008\.1\.2\.4\.100.*prism-ray\[dicom\]"):
        decode_image(data, "mpeg2.dcm")


def test_dicom_without_pydicom_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now raises ImportError
    with pytest.raises(ImageReadError, match=r"pip install 'prism-ray\[dicom\]'"):
        decode_image(_dicom(MONO12), "x.dcm")


def test_dicom_bad_files_are_item_errors():
    with pytest.raises(ImageReadError, match="multi-frame DICOM \\(3 frames\\)"):
        decode_image(_dicom(np.stack([MONO12] * 3), frames=True), "cine.dcm")
    with pytest.raises(ImageReadError, match="too small: 8x8"):
        decode_image(_dicom(MONO12[:8, :8]), "small.dcm")
    with pytest.raises(ImageReadError, match="too large"):
        decode_image(_dicom(MONO12), "x.dcm", DecodeConfig(max_pixels=1000))
    # Bits above BitsStored (old overlay planes) are masked off by pydicom, not read as pixel values.
    assert np.array_equal(
        decode_image(_dicom(MONO12 + 4096, bits=12), "high.dcm"), _gray3(_scaled(MONO12, 0, 4095))
    )
    with pytest.raises(ImageReadError, match="no pixel data|without pixel data"):
        decode_image(b"\x00" * 128 + b"DICM" + b"\x00" * 16, "empty.dcm")
    full = _dicom(MONO12)
    for cut in (len(full) // 2, 200, 140):
        with pytest.raises(ImageReadError):
            decode_image(full[:cut], "cut.dcm")
    with pytest.raises(ImageReadError):
        decode_image(b"definitely not dicom" * 10, "fake.dcm")
