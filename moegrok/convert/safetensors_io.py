"""Minimal, streaming safetensors reader and writer.

Format: 8-byte little-endian header length N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the raw little-endian
tensor bytes, offsets relative to the end of the header. We read it ourselves (rather than through `safetensors`) so
that (a) one tensor at a time goes through a plain buffer, never a long-lived mmap, keeping RSS near one copy of the
weights, and (b) every defect gets an error that names the file and the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from moegrok.errors import MoegrokError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range [start, end) in `file`."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def dtype_code(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in CODES:
        raise MoegrokError(f"safetensors: dtype {dt} cannot be stored (supported: {sorted(DTYPES)})")
    return CODES[dt]


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a file's header. Returns ({name: TensorInfo}, metadata). Reads no tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoegrokError(f"{path}: truncated safetensors file ({size} bytes, shorter than the 8-byte "
                                   f"header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise MoegrokError(f"{path}: corrupt or truncated safetensors file (header length field says {n} "
                                   f"bytes, the file has {size - 8} after it)")
            raw = f.read(n)
    except OSError as e:
        raise MoegrokError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoegrokError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise MoegrokError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise MoegrokError(f"{path}: corrupt safetensors header ('__metadata__' is not an object)")
    data_start, data_size = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry, data_start, data_size)
    _check_layout(path, infos, data_start, data_size)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    def bad(msg):
        raise MoegrokError(f"{path}: corrupt safetensors header, tensor '{name}': {msg}")

    if not isinstance(entry, dict):
        bad("entry is not an object")
    dt, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dt not in DTYPES:
        bad(f"unsupported dtype {dt!r} (supported: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        bad(f"data_offsets {offs!r} are not [begin, end] with 0 <= begin <= end")
    want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
    if offs[1] - offs[0] != want:
        bad(f"data_offsets span {offs[1] - offs[0]} bytes but {dt} {tuple(shape)} needs {want}")
    if offs[1] > data_size:
        raise MoegrokError(f"{path}: truncated safetensors file: tensor '{name}' needs data bytes up to "
                           f"{offs[1]}, the file holds only {data_size}")
    return TensorInfo(name, path, dt, tuple(shape), data_start + offs[0], data_start + offs[1])


def _check_layout(path: Path, infos: Mapping[str, TensorInfo], data_start: int, data_size: int) -> None:
    """The format requires the tensors to tile the data region exactly: no overlap, no gap, no trailing bytes."""
    pos = data_start
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != pos:
            what = "overlaps the previous tensor" if info.start < pos else "leaves a gap before it"
            raise MoegrokError(f"{path}: corrupt safetensors file: tensor '{info.name}' {what}")
        pos = info.end
    if pos != data_start + data_size:
        raise MoegrokError(f"{path}: corrupt safetensors file: {data_start + data_size - pos} bytes after the last "
                           f"tensor (a file that was appended to or not fully overwritten?)")


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is `align`-byte aligned: XLA's CPU client adopts such a
    buffer without copying (`jax.device_put(a, may_alias=True)`); numpy's own allocations are only 16-aligned.

    Large buffers are anonymous mmaps with MAP_POPULATE (page-aligned): the kernel maps every page in one call,
    which on this VM is ~10x faster than taking one page fault per 4 KiB while the buffer is filled."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    n = count * dtype.itemsize
    if n >= 1 << 20 and hasattr(mmap, "MAP_POPULATE") and align <= mmap.PAGESIZE:
        buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        return np.frombuffer(buf, dtype, count=count).reshape(shape)
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def read_tensor(info: TensorInfo, f=None, aligned: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Read one tensor into `out` (C-contiguous, matching shape and dtype) or a fresh array (64-byte aligned if
    `aligned`). `f` is an open binary handle on `info.file` (opened here if None)."""
    dt = DTYPES[info.dtype]
    if out is None:
        out = aligned_empty(info.shape, dt) if aligned else np.empty(info.shape, dt)
    elif out.shape != info.shape or out.dtype != dt or not out.flags.c_contiguous:
        raise ValueError(f"read_tensor: out is {out.dtype} {out.shape}, tensor '{info.name}' is {dt} {info.shape}")
    own = f is None
    try:
        if own:
            f = open(info.file, "rb")
        f.seek(info.start)
        got = f.readinto(out.reshape(-1).view(np.uint8)) if out.size else 0
    except OSError as e:
        raise MoegrokError(f"{info.file}: cannot read tensor '{info.name}' ({e.strerror or e})") from None
    finally:
        if own and f is not None:
            f.close()
    if got != info.nbytes:
        raise MoegrokError(f"{info.file}: truncated while reading tensor '{info.name}' (got {got} of "
                           f"{info.nbytes} bytes)")
    return out


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype and shape now, its values later (`produce()` is called once, in order)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_file(path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None,
               on_tensor: Callable[[str], None] | None = None) -> int:
    """Write a safetensors file, producing one tensor at a time. Returns the number of bytes written."""
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for s in specs:
        header[s.name] = {"dtype": dtype_code(s.dtype), "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data region 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            a = np.ascontiguousarray(s.produce())
            if a.shape != tuple(s.shape) or a.dtype != np.dtype(s.dtype):
                raise MoegrokError(f"safetensors writer: tensor '{s.name}' was declared {np.dtype(s.dtype)} "
                                   f"{tuple(s.shape)} but produced {a.dtype} {a.shape}")
            f.write(a.reshape(-1).view(np.uint8).data)
            if on_tensor is not None:
                on_tensor(s.name)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + pos
