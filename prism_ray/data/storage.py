"""Manifests, images and tables on any fsspec URI (local paths, memory://, s3://, gs://...)."""

from __future__ import annotations

import errno
import io
import posixpath
import re
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from prism_ray.data.images import DecodeConfig, ImageReadError
from prism_ray.data.images import decode_image as _decode_image


def join_uri(root: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI without mangling the protocol."""
    if "://" in root:
        protocol, rest = root.split("://", 1)
        return f"{protocol}://" + posixpath.join(rest, *parts)
    return str(Path(root).joinpath(*parts))


def resolve_uri(uri: str, root: str | None) -> str:
    """Prefix relative URIs with `root`; absolute paths and URIs with a protocol stay as they are."""
    if root is None or "://" in uri or uri.startswith("/"):
        return uri
    return join_uri(root, uri)


def makedirs(uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)


def exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


# --- manifests and tables --------------------------------------------------------------------


def read_table(uri: str, columns: list[str] | None = None, column_types: dict | None = None) -> pa.Table:
    """Read a Parquet or CSV table (chosen by extension) from any fsspec URI.

    `column_types` (CSV only) fixes some columns' types instead of pyarrow's inference. A file
    pyarrow cannot read (an empty CSV, a broken Parquet footer) is a ValueError naming it.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest '{uri}': no such file")
    lower = path.lower()
    with fs.open(path, "rb") as f:
        try:
            if lower.endswith((".csv", ".csv.gz")):
                compression = "gzip" if lower.endswith(".gz") else None
                stream = pa.CompressedInputStream(f, compression) if compression else f
                # Label columns are often blank in CheXpert: keep them nullable, not inferred as str.
                options = pacsv.ConvertOptions(column_types=column_types or {}, strings_can_be_null=True)
                table = pacsv.read_csv(stream, convert_options=options)
            elif lower.endswith((".parquet", ".pq")):
                table = pq.read_table(f)
            else:
                raise ValueError(f"manifest '{uri}': unknown format (expected .parquet or .csv)")
        except pa.ArrowInvalid as err:  # "Empty CSV file", "Parquet magic bytes not found", ...
            raise ValueError(f"manifest '{uri}': {err}") from None
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"manifest '{uri}': missing column(s) {missing}")
        table = table.select(columns)
    return table


def _open_for_writing(uri: str):
    """(binary file object, path) for `uri` on its fsspec filesystem, parent folders created."""
    fs, path = fsspec.core.url_to_fs(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    return fs.open(path, "wb"), path


def write_table(table: pa.Table, uri: str) -> None:
    """Write a Parquet (or .csv) table to any fsspec URI, creating parent folders."""
    handle, path = _open_for_writing(uri)
    with handle as f:
        if path.lower().endswith(".csv"):
            pacsv.write_csv(table, f)
        else:
            pq.write_table(table, f)


# --- storage errors: the input's fault or the storage's --------------------------------------

# Connections that failed or dropped: the server or the network may be back on the next try.
CONNECTION_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
})
# Errors that can go away: a lost connection, a busy or full device, exhausted descriptors. EIO is the
# usual answer of a network filesystem (NFS, FUSE mounts of buckets) that lost its server; a failing
# local disk gives it too, and then the retries run out loudly instead of writing the image off.
# Every other errno (ENOENT, ELOOP, ENAMETOOLONG, EACCES, EPERM, EISDIR, ENOTDIR, ENXIO, EROFS...)
# says the path itself is wrong: retrying cannot help.
TRANSIENT_ERRNOS = CONNECTION_ERRNOS | frozenset({
    errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ESTALE, errno.ENOSPC, errno.EDQUOT,
    errno.ENOMEM, errno.ENOBUFS, errno.ENFILE, errno.EMFILE,
})
# Without an errno (fsspec's own errors) the class says it: these are the path's fault.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _storage_cause(err: OSError) -> OSError:
    """The OSError that says what happened: fsspec's HTTP filesystem raises FileNotFoundError *from* the
    connection error when a server refuses the connection."""
    while isinstance(err.__cause__, OSError):
        err = err.__cause__
    return err


def is_transient_storage_error(err: BaseException) -> bool:
    """True for a storage error worth retrying (`TRANSIENT_ERRNOS`), False for one of the path (a missing
    file, a symlink loop, no permission) and for anything that is not an OSError.

    The one classification of OSErrors: `read_image_bytes` turns the others into item errors, and the
    batch boundary (`pipelines.counterfactuals.is_transient`) retries these.
    """
    if not isinstance(err, OSError):
        return False
    err = _storage_cause(err)
    if err.errno is not None:
        return err.errno in TRANSIENT_ERRNOS
    # No errno: storage clients (s3fs, gcsfs, aiohttp) raise bare OSErrors, timeouts and connection errors
    # for server trouble.
    return not isinstance(err, _PATH_ERRORS)


def _describe(err: OSError) -> str:
    """'ELOOP: Too many levels of symbolic links' (the errno's name, or the class without one)."""
    return f"{errno.errorcode.get(err.errno, type(err).__name__)}: {err.strerror or err}"


def _storage_error(uri: str, err: OSError) -> OSError:
    """A transient read error again, naming the image: what a batch that runs out of retries reports."""
    connection = isinstance(err, ConnectionError) or err.errno in CONNECTION_ERRNOS
    text = f"image '{uri}': {'connection error' if connection else 'storage error'} ({_describe(err)})"
    if err.errno is not None:
        return OSError(err.errno, text)  # the subclass by errno: ConnectionRefusedError for ECONNREFUSED
    return ConnectionError(text) if connection else OSError(text)


# --- images ----------------------------------------------------------------------------------


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _open_image(uri: str):
    """A binary file object for a local path (opened as is: '#', '%', '::', spaces and unicode are
    file-name characters, not URL syntax) or an fsspec URI with a known scheme."""
    match = _SCHEME.match(uri)
    if match is None or match.group(1) == "file":
        return open(uri.removeprefix("file://"), "rb")
    scheme = match.group(1)
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise ImageReadError(uri, f"unknown URI scheme '{scheme}://' (known: s3, gs, az, http(s), file, memory, ...)")
    try:
        return fsspec.open(uri, "rb").open()
    except ImportError as err:  # e.g. s3fs not installed
        raise ImageReadError(uri, f"no filesystem for '{scheme}://' installed ({err})") from None


def read_image_bytes(uri: str) -> bytes:
    """The raw bytes of one image file (for hashing and decoding).

    Raises ImageReadError (an item error) for an empty URI, an unknown scheme, an empty file, and any
    OSError of the path itself (missing, a folder, a symlink loop, no permission: see
    `is_transient_storage_error`); a transient storage error (a refused connection, a timeout, EIO)
    is raised as an OSError naming the URI, so that the caller retries the batch.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ImageReadError(str(uri), "empty image URI")
    try:
        with _open_image(uri) as f:
            data = f.read()
    except OSError as err:
        cause = _storage_cause(err)
        if is_transient_storage_error(cause):
            raise _storage_error(uri, cause) from err
        if isinstance(cause, FileNotFoundError):
            raise ImageReadError(uri, "file not found") from None
        raise ImageReadError(uri, f"cannot open ({_describe(cause)})") from None
    if not data:
        raise ImageReadError(uri, "empty file")
    return data


def read_image(uri: str, config: DecodeConfig | None = None, *, min_side: int = 8) -> np.ndarray:
    """Read one image (or DICOM) from any fsspec URI as uint8 (H, W, 3) by `config`; raises ImageReadError.

    The 8-pixel floor suits reading outputs back; jobs pass their model's (`images.default_min_side`).
    """
    return _decode_image(read_image_bytes(uri), uri, config, min_side=min_side)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> lossless PNG bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_png(image: np.ndarray, uri: str) -> None:
    """Write a lossless PNG to any fsspec URI (parent folders are created)."""
    data = encode_png(image)
    handle, _ = _open_for_writing(uri)
    with handle as f:
        f.write(data)
