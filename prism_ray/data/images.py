"""One decoding policy for input images: any PNG/JPEG/TIFF/... mode or DICOM -> uint8 (H, W, 3), checked."""

from __future__ import annotations

import io
import logging
import struct
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from prism_ray.config import BaseConfig

log = logging.getLogger("prism_ray.images")

# The U-Net needs a few latent pixels per side to denoise anything: the shorter side must be at least
# this many latent pixels, i.e. 8 x the VAE's stride (64 px for SD v1.5, 32 px for the tiny family).
LATENT_SIDE_MIN = 8

# Formats Pillow may open (JPEG includes MPO). A closed list keeps out EPS (Pillow runs Ghostscript on it)
# and exotic plugins.
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "JPEG2000", "PPM")

DICOM_EXTRA = "pip install 'prism-ray[dicom]'"

# How a user stretches integer pixels that do not fill their declared range (`DecodeConfig.integer_range`).
INTEGER_RANGE_HINT = "set data.decode.integer_range=range to stretch the image's own min..max"

# What a broken file makes Pillow or pydicom raise while parsing bytes in memory (Pillow's own `Image.open`
# treats SyntaxError, IndexError, TypeError and struct.error as "not this format"; its TIFF reader also
# raises KeyError). MemoryError is not here: a resource error propagates so that the runtime retries.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)


class ImageReadError(ValueError):
    """One image could not be read; carries the URI and a one-line reason for the errors table."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"image '{uri}': {reason}")
        self.uri = uri
        self.reason = reason


class DecodeConfig(BaseConfig):
    """How input files become the model's uint8 RGB pixels (`data.decode`)."""

    alpha_background: int = Field(
        0,
        ge=0,
        le=255,
        description="gray level that LA/RGBA/PA images are composited on, and that `square=pad` pads with",
    )
    integer_range: Literal["bit_depth", "range"] = Field(
        "bit_depth",
        description="integer pixels: 'bit_depth' divides by the declared (TIFF BitsPerSample, DICOM BitsStored) or "
        "container depth's max, values outside it are an error; 'range' stretches the image's min..max",
    )
    float_range: Literal["range", "unit", "error"] = Field(
        "error",
        description="float pixels (TIFF 'F', float DICOM): 'range' stretches min..max, 'unit' clips to [0, 1], "
        "'error' rejects them (floats carry no declared scale)",
    )
    max_pixels: int = Field(
        100_000_000,
        ge=1,
        description="width x height above which a file is rejected before its pixels are decoded",
    )
    min_side: int | None = Field(
        None,
        ge=1,
        description="shorter side below which an image is rejected; None: the job's (8 x the VAE stride)",
    )
    square: Literal["center_crop", "pad"] = Field(
        "center_crop",
        description="how a non-square image becomes square: crop its centre, or pad with alpha_background",
    )


def default_min_side(vae_scale_factor: int) -> int:
    """The smallest shorter side the model can take: LATENT_SIDE_MIN latent pixels (64 for SD's stride 8)."""
    return LATENT_SIDE_MIN * vae_scale_factor


def is_dicom(data: bytes, uri: str = "") -> bool:
    """DICOM Part 10 files have 'DICM' after a 128-byte preamble; bare datasets (no preamble, often no file
    meta) by their first data element (`_is_bare_dicom`) or the suffix."""
    return data[128:132] == b"DICM" or _is_bare_dicom(data) or uri.lower().endswith((".dcm", ".dicom"))


# Groups a dataset without the Part 10 header opens with: the file meta (0002,xxxx), or the identifying
# group (0008,xxxx) that every image has (SOP Class UID) and that sorts first when the meta is missing.
_BARE_DICOM_GROUPS = (0x0002, 0x0008)


def _is_bare_dicom(data: bytes) -> bool:
    """True when `data` opens with a little-endian DICOM data element of group 0002 or 0008 whose length fits:
    explicit VR (two capital letters after the tag) or implicit VR (a 4-byte length after the tag)."""
    if len(data) < 8:
        return False
    group, _ = struct.unpack_from("<HH", data)
    if group not in _BARE_DICOM_GROUPS:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR; OB, SQ, UN... keep 2 reserved bytes (a 0 here) and 4 more
        length = struct.unpack_from("<H", data, 6)[0]
    else:
        length = struct.unpack_from("<I", data, 4)[0]
    return length == 0xFFFFFFFF or 8 + length <= len(data)  # undefined length (a sequence) or the value fits


def decode_image(
    data: bytes, uri: str = "<bytes>", config: DecodeConfig | None = None, *, min_side: int = 64
) -> np.ndarray:
    """Image or DICOM bytes -> uint8 (H, W, 3) as displayed (EXIF orientation, VOI window, MONOCHROME1 inverted).

    Gray images are replicated to three channels (the model is RGB). Raises ImageReadError (an item
    error) for anything that is not one readable, non-bomb image of at least `min_side` pixels a side;
    `config.min_side`, when set, overrides `min_side`; no config is `DecodeConfig()`.
    """
    config = config or DecodeConfig()
    floor = config.min_side if config.min_side is not None else min_side
    if is_dicom(data, uri):
        image = _decode_dicom(data, uri, config, floor)
    else:
        image = _decode_pil(data, uri, config, floor)
    return np.ascontiguousarray(image)


def make_square(image: np.ndarray, policy: str = "center_crop", background: int = 0) -> np.ndarray:
    """(H, W[, C]) -> (S, S[, C]): the centred square (S = min side) or the image centred on a padded square.

    Padding puts the odd pixel at the bottom/right, as the crop does; already-square images are returned as is.
    """
    h, w = image.shape[:2]
    if h == w:
        return image
    if policy == "center_crop":
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        return image[y0 : y0 + side, x0 : x0 + side]
    if policy == "pad":
        side = max(h, w)
        y0, x0 = (side - h) // 2, (side - w) // 2
        out = np.full((side, side) + image.shape[2:], background, dtype=image.dtype)
        out[y0 : y0 + h, x0 : x0 + w] = image
        return out
    raise ValueError(f"square: unknown policy '{policy}' (expected 'center_crop' or 'pad')")


# --- size checks (before any pixel is decoded) -------------------------------------------------


def _check_size(
    uri: str, width: int, height: int, config: DecodeConfig, min_side: int, what: str = "image"
) -> None:
    if width * height > config.max_pixels:
        raise ImageReadError(
            uri,
            f"{what} too large: {width}x{height} = {width * height} pixels > max_pixels {config.max_pixels}",
        )
    if min(width, height) < min_side:
        raise ImageReadError(
            uri, f"{what} too small: {width}x{height} (shorter side {min(width, height)} < {min_side})"
        )


# --- pixel values -> [0, 1] -------------------------------------------------------------------


def _integer_to_unit(
    arr: np.ndarray, uri: str, config: DecodeConfig, bits: int, lo: float = 0.0
) -> np.ndarray:
    """Integer (or rescaled) values -> float64 [0, 1] by the declared range [lo, lo + 2**bits - 1] or min..max."""
    if config.integer_range == "range":
        return _stretch(arr, uri)
    hi = lo + 2.0**bits - 1
    vmin, vmax = float(arr.min()), float(arr.max())
    if vmin < lo or vmax > hi:
        raise ImageReadError(
            uri,
            f"pixel values {vmin:g}..{vmax:g} outside the declared {bits}-bit range {lo:g}..{hi:g} "
            f"({INTEGER_RANGE_HINT})",
        )
    if bits > 8 and vmax - lo < (hi - lo) / 8:
        # An 8-bit image this dark is dark; a deeper container this empty usually holds fewer bits than
        # it declares (12-bit data in a 16-bit PNG), which the declared range decodes nearly black.
        log.warning(
            "image '%s': pixel values %g..%g use under 1/8 of the declared %d-bit range %g..%g and decode "
            "nearly black (%s)", uri, vmin, vmax, bits, lo, hi, INTEGER_RANGE_HINT,
        )
    return (arr.astype(np.float64) - lo) / (hi - lo)


def _float_to_unit(arr: np.ndarray, uri: str, config: DecodeConfig) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise ImageReadError(uri, "non-finite (NaN or inf) float pixels")
    if config.float_range == "error":
        raise ImageReadError(
            uri,
            f"float pixels ({arr.dtype}) have no declared scale (set data.decode.float_range to 'range' or 'unit')",
        )
    if config.float_range == "unit":
        return np.clip(arr.astype(np.float64), 0.0, 1.0)
    return _stretch(arr, uri)


def _stretch(arr: np.ndarray, uri: str) -> np.ndarray:
    vmin, vmax = float(arr.min()), float(arr.max())
    if vmax <= vmin:
        raise ImageReadError(uri, f"constant image (every pixel {vmin:g}): nothing to stretch")
    return (arr.astype(np.float64) - vmin) / (vmax - vmin)


def _to_uint8_rgb(unit: np.ndarray, alpha: np.ndarray | None, background: int) -> np.ndarray:
    """float [0, 1] (H, W[, 3]), optional alpha in [0, 1] (H, W) -> uint8 (H, W, 3) composited on `background`."""
    if unit.ndim == 2:
        unit = unit[:, :, None]
    if alpha is not None:
        unit = unit * alpha[:, :, None] + (background / 255.0) * (1.0 - alpha[:, :, None])
    out = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


# --- Pillow formats ---------------------------------------------------------------------------


def open_raster(
    data: bytes, uri: str, config: DecodeConfig, min_side: int, what: str = "image"
) -> Image.Image:
    """Bytes -> an opened Pillow image, its pixels not yet decoded: one of PIL_FORMATS, one frame, at most
    `config.max_pixels` and at least `min_side` pixels a side. The checks every raster input passes
    (images here, edit/keep masks in `data.masks`); `what` names the input in the ImageReadError.
    """
    # Our own max_pixels check follows; Pillow's warning band (MAX_IMAGE_PIXELS..2x) would only add noise.
    # Above 2x Pillow raises before we see the size: the same item error, with Pillow's pixel count.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        except Image.DecompressionBombError as err:
            raise ImageReadError(uri, f"{what} too large (decompression-bomb check): {err}") from None
        except UnidentifiedImageError:
            accepted = ", ".join(PIL_FORMATS) + (" or DICOM" if what == "image" else "")  # masks: rasters only
            raise ImageReadError(uri, f"corrupt or unsupported {what} (not one of {accepted})") from None
        except DECODE_ERRORS as err:
            raise ImageReadError(uri, f"corrupt {what} header ({type(err).__name__}: {err})") from None
    try:
        # MPO's extra frames are previews of its primary image; elsewhere more than one frame is a stack.
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format != "MPO":
            raise ImageReadError(uri, f"{frames} frames ({img.format}); expected a single {what}")
        _check_size(uri, img.width, img.height, config, min_side, what)
    except ImageReadError:
        img.close()
        raise
    except DECODE_ERRORS as err:
        img.close()
        raise ImageReadError(uri, f"corrupt or unsupported {what} ({type(err).__name__}: {err})") from None
    return img


def _declared_bits(img: Image.Image) -> int | None:
    """TIFF's BitsPerSample (it may declare 12 bits in a 16-bit container); None for other formats."""
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if not bits:
        return None
    declared = max(bits) if isinstance(bits, tuple) else int(bits)
    return declared if declared > 0 else None


def _decode_pil(data: bytes, uri: str, config: DecodeConfig, min_side: int) -> np.ndarray:
    with open_raster(data, uri, config, min_side) as img:
        try:
            img.load()
            bits = _declared_bits(img)
            img = ImageOps.exif_transpose(img)
            img, alpha, container = _normalise_mode(img, uri)
            arr = np.asarray(img)
        except ImageReadError:
            raise
        except DECODE_ERRORS as err:
            raise ImageReadError(uri, f"corrupt or unsupported image ({type(err).__name__}: {err})") from None
    if alpha is not None:
        arr = arr[..., :-1].squeeze(-1) if arr.shape[-1] == 2 else arr[..., :-1]
    if arr.dtype == np.uint8 and alpha is None and config.integer_range == "bit_depth":
        # The common case (8-bit gray or RGB) is exact: no float round trip.
        return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr
    if arr.dtype.kind == "f":
        unit = _float_to_unit(arr, uri, config)
    else:
        unit = _integer_to_unit(arr, uri, config, min(bits or container, container))
    return _to_uint8_rgb(unit, alpha, config.alpha_background)


def _normalise_mode(img: Image.Image, uri: str) -> tuple[Image.Image, np.ndarray | None, int]:
    """Any Pillow mode -> one of L, LA, RGB, RGBA, I;16*, I, F; the alpha in [0, 1]; the container's bits."""
    mode = img.mode
    if mode in ("P", "PA"):  # palette -> its colours (with alpha when the palette or the mode has it)
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode in ("CMYK", "YCbCr", "RGBX", "HSV"):
        # Pillow reads Adobe (inverted) CMYK/YCCK JPEGs as plain CMYK; its CMYK -> RGB is the naive one.
        img = img.convert("RGB")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode == "La":
        img = img.convert("LA")
    mode = img.mode
    if mode in ("L", "RGB"):
        return img, None, 8
    if mode in ("LA", "RGBA"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float64) / 255.0
        return img, alpha, 8
    if mode.startswith("I;16"):
        return img, None, 16
    if mode == "I":
        # 32-bit signed container; a 16-bit PNG that an older Pillow opens as I still declares 16 bits.
        return img, None, 16 if img.format == "PNG" else 31
    if mode == "F":
        return img, None, 32
    raise ImageReadError(uri, f"unsupported image mode {mode}")


# --- DICOM ------------------------------------------------------------------------------------


def _decode_dicom(data: bytes, uri: str, config: DecodeConfig, min_side: int) -> np.ndarray:
    """DICOM -> uint8 RGB as a viewer shows it: Modality LUT/rescale, VOI LUT or window, MONOCHROME1 inverted.

    Multi-frame files are rejected (a series or cine, not one radiograph); colour (RGB, YBR_*) is taken as RGB.
    """
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.errors import BytesLengthException, InvalidDicomError
    except ImportError:
        raise ImageReadError(uri, f"DICOM file but pydicom is not installed ({DICOM_EXTRA})") from None
    # pydicom also raises NotImplementedError (an unknown VR) and AttributeError (a required element missing).
    errors = (*DECODE_ERRORS, NotImplementedError, AttributeError, InvalidDicomError, BytesLengthException)
    # Without the preamble pydicom must be forced to read a dataset, which it then does from any bytes:
    # `is_dicom` let in only data that opens with a DICOM element or that the user named .dcm.
    bare = data[128:132] != b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=bare)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        has_pixels = "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        bits = int(ds.get("BitsStored", 0) or 0)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax is None and bare:
            # A bare dataset (no file meta): the encoding pydicom read its elements with is its transfer
            # syntax (implicit VR little endian, as PS3.5 A.1 makes the default, or an explicit VR one).
            ds.file_meta = meta if meta is not None else FileMetaDataset()
            syntax = ds.file_meta.TransferSyntaxUID = _uncompressed_syntax(*ds.original_encoding)
    except errors as err:
        raise ImageReadError(uri, f"corrupt DICOM ({type(err).__name__}: {err})") from None
    if not has_pixels or not rows or not cols:
        raise ImageReadError(uri, "DICOM without pixel data")
    if frames > 1:
        raise ImageReadError(uri, f"multi-frame DICOM ({frames} frames); expected a single image")
    _check_size(uri, cols, rows, config, min_side)
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as err:
        # pydicom says "no decoders"/"all plugins failed": a decoder (pylibjpeg-*) is missing or the data is bad.
        name = getattr(syntax, "name", syntax) or "unknown"
        known = syntax is not None and syntax.is_transfer_syntax
        hint = "" if known and not syntax.is_compressed else f" (decoders come with {DICOM_EXTRA})"
        raise ImageReadError(
            uri,
            f"cannot decode DICOM transfer syntax {name} ({syntax}): {(str(err).splitlines() or [''])[0]}{hint}",
        ) from None
    except errors as err:
        raise ImageReadError(uri, f"corrupt DICOM pixel data ({type(err).__name__}: {err})") from None
    except BaseException as err:
        # Rust decoders (pylibjpeg-rle, via pyo3) panic on some corrupt frames, and a pyo3 PanicException
        # is a BaseException: that one is the file's fault; anything else (KeyboardInterrupt...) is not.
        if type(err).__name__ != "PanicException":
            raise
        raise ImageReadError(uri, f"corrupt DICOM pixel data (decoder panic: {err})") from None

    if arr.dtype.kind == "f":
        unit = _float_to_unit(arr, uri, config)
        return _to_uint8_rgb(unit, None, config.alpha_background)
    bits = bits or arr.dtype.itemsize * 8
    if photometric in ("RGB",) or photometric.startswith("YBR"):  # pydicom has converted YBR to RGB
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ImageReadError(uri, f"colour DICOM with pixel shape {arr.shape}")
        return _to_uint8_rgb(_integer_to_unit(arr, uri, config, bits), None, config.alpha_background)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(uri, f"unsupported DICOM photometric interpretation '{photometric}'")
    if arr.ndim != 2:
        raise ImageReadError(uri, f"monochrome DICOM with pixel shape {arr.shape}")
    try:
        unit = _dicom_gray_to_unit(arr, ds, uri, config, bits, signed)
    except ImageReadError:
        raise
    except errors as err:
        raise ImageReadError(uri, f"bad DICOM LUT or window ({type(err).__name__}: {err})") from None
    if photometric == "MONOCHROME1":  # minimum value is white (PS3.3 C.7.6.3.1.2): invert after the VOI
        unit = 1.0 - unit
    return _to_uint8_rgb(unit, None, config.alpha_background)


def _uncompressed_syntax(implicit_vr: bool, little_endian: bool):
    """The uncompressed transfer syntax UID of an encoding (pydicom's `Dataset.original_encoding`)."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if implicit_vr:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian


def _dicom_gray_to_unit(
    arr: np.ndarray, ds, uri: str, config: DecodeConfig, bits: int, signed: bool
) -> np.ndarray:
    """Stored values -> [0, 1]: Modality LUT (or rescale), then VOI LUT, else window, else the stored range."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence"):  # preferred over a window when both are present, as pydicom does
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(apply_voi_lut(values, ds, index=0, prefer_lut=True) / (2.0**lut_bits - 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return _window(values.astype(np.float64), center, width, function, uri)
    if config.integer_range == "range":
        return _stretch(values, uri)
    # No VOI: the full stored range, through the same modality transform as the pixels.
    lo = -(2.0 ** (bits - 1)) if signed else 0.0
    _integer_to_unit(arr, uri, config, bits, lo)  # rejects stored values outside BitsStored
    ends = np.sort(apply_modality_lut(np.array([lo, lo + 2.0**bits - 1]), ds).astype(np.float64))
    if ends[1] <= ends[0]:
        raise ImageReadError(uri, "the DICOM modality transform maps the stored range to one value")
    return np.clip((values.astype(np.float64) - ends[0]) / (ends[1] - ends[0]), 0.0, 1.0)


def _first(value) -> float:
    """The first of a multi-valued DICOM number (WindowCenter may list several windows)."""
    return float(np.ravel(np.asarray(value, dtype=np.float64))[0])


def _window(x: np.ndarray, center: float, width: float, function: str, uri: str) -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID), mapped to [0, 1]."""
    if function == "LINEAR":
        if width < 1:
            raise ImageReadError(uri, f"DICOM WindowWidth {width:g} < 1 for a LINEAR window")
        return (
            np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
            if width > 1
            else (x > center - 0.5).astype(np.float64)
        )
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ImageReadError(uri, f"DICOM WindowWidth {width:g} <= 0")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        if width <= 0:
            raise ImageReadError(uri, f"DICOM WindowWidth {width:g} <= 0")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise ImageReadError(uri, f"unsupported DICOM VOILUTFunction '{function}'")
