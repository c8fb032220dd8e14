"""Check a NIfTI header's claimed data size against the file before any voxel is allocated.

A truncated or corrupt header can claim far more data than the file holds (an 80-byte ``.nii.gz`` claiming
800³ float32 voxels); reading it would allocate gigabytes before failing. :func:`check_nifti_size` refuses
such files with a :class:`~macl.data.errors.DataError` naming the file:

- ``.nii``: the file must hold ``vox_offset + prod(shape) · itemsize`` bytes.
- ``.nii.gz``: deflate expands at most ~1032:1, so a claim beyond that of the compressed size is refused at
  once; a claim above ``STREAM_CHECK_BYTES`` is then stream-checked (decompressed in 1 MiB chunks and counted,
  nothing kept) before the real read allocates it. Smaller claims are left to the reader, whose allocation is
  bounded by that size.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

from macl.data.errors import DataError

#: deflate's maximal expansion ratio (about 1032:1), with slack
MAX_DEFLATE_RATIO = 1100
#: claims above this many bytes are verified by decompressing (streaming) before the array is allocated
STREAM_CHECK_BYTES = 256 * 2 ** 20


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{int(n)} bytes"


def claimed_bytes(img: Any) -> tuple[int, int, tuple[int, ...], str]:
    """(data offset, data bytes, shape, dtype name) a loaded nibabel image's header claims."""
    hdr = img.header
    shape = tuple(int(s) for s in img.shape)
    dtype = hdr.get_data_dtype()
    offset = int(hdr.get_data_offset()) if hasattr(hdr, "get_data_offset") else 0
    return offset, math.prod(shape) * int(dtype.itemsize), shape, str(dtype)


def _stream_length(path: Path, limit: int) -> int:
    """Decompressed bytes of a gzip file, counted in chunks up to ``limit`` (stops there)."""
    n = 0
    with gzip.open(path, "rb") as fh:
        while n < limit:
            chunk = fh.read(min(2 ** 20, limit - n))
            if not chunk:
                break
            n += len(chunk)
    return n


def check_nifti_size(path: str | Path, img: Any) -> None:
    """Raise DataError when ``path`` cannot hold the data its header (``img``, lazily loaded) claims.

    Raises:
        DataError: naming the file, the claimed shape / dtype / size and what the file holds.
    """
    path = Path(path)
    offset, nbytes, shape, dtype = claimed_bytes(img)
    need = offset + nbytes
    size = os.path.getsize(path)
    what = f"header claims {'x'.join(map(str, shape))} {dtype} voxels ({_gb(nbytes)})"
    if str(path).endswith(".gz"):
        if need > size * MAX_DEFLATE_RATIO + 2 ** 16:
            raise DataError(path, f"{what}, more than a {_gb(size)} compressed file can hold; the header is "
                                  "corrupt or the file truncated")
        if need > STREAM_CHECK_BYTES:
            try:
                got = _stream_length(path, need)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(path, f"{what}, but the compressed data end early ({type(e).__name__}: {e}); "
                                      "the file may be truncated or corrupt") from e
            if got < need:
                raise DataError(path, f"{what}, but the file decompresses to only {_gb(got)}; truncated")
    elif size < need:
        raise DataError(path, f"{what}, but the file holds only {_gb(size)}; truncated or corrupt")
