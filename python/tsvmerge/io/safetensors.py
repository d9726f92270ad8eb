"""The safetensors format, read with plain file reads and written in a stream.

Why our own and not the `safetensors` package: its reader memory-maps the file, and the
pages a merge touches stay in the process's RSS (file-backed) until unmapped, so peak RSS
grows with the zoo; and its writer needs every tensor of a file in memory at once. The
format is simple: an 8-byte little-endian header length, a JSON header, then raw data.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from .errors import InputError
from .files import MAX_JSON_BYTES, open_regular, parse_json
from .publish import naming

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Dtypes the format knows that tsvmerge does not merge (see `dtype_refusal`).
OTHER_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3", "F6_E3M2", "F4",
                "U16", "U32", "U64", "C64")
_MAX_DIM = 2**64 - 1                # the safetensors package reads dims and offsets as u64
_FIELDS = {"dtype", "shape", "data_offsets"}
_INT = {int}


def dtype_refusal(name: str) -> str:
    """Why tensors of this dtype (a safetensors or torch name) cannot be merged."""
    if name.startswith(("F8", "F6", "F4", "float8", "float6", "float4")):
        return (f"has dtype {name}, which tsvmerge does not merge: fp8/fp6/fp4 checkpoints keep scales in other "
                "tensors, so the stored values are not the weights; dequantize to bf16 or fp32 first")
    return f"has dtype {name}, which tsvmerge does not merge (it reads {', '.join(DTYPES)})"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(path: str) -> tuple[dict, dict, int]:
    """Read and validate a header in one read: (name -> (info, byte offset), metadata, data start).

    The format's rules, as the safetensors package applies them, and stricter where it is
    lenient: no duplicate keys, entries with exactly its three fields, `__metadata__` an object.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(path, None, f"is {size} bytes, too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_JSON_BYTES:
            raise InputError(path, None, f"header length {n} is over the format's limit of {MAX_JSON_BYTES} bytes: "
                                         "corrupted or not safetensors")
        if n > size - 8:
            raise InputError(path, None, f"header length {n} exceeds the file ({size} bytes): corrupted or truncated")
        raw = f.read(n)
    if len(raw) != n:
        raise InputError(path, None, "file shrank while being read")
    header = parse_json(raw, path, "header")
    if not isinstance(header, dict):
        raise InputError(path, None, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(path, None, "header's __metadata__ is not a map of strings to strings")
    start, room = 8 + n, size - 8 - n
    spans = {name: _entry(path, name, h, room) for name, h in header.items()}
    _check_tiling(path, spans, room)
    return {name: (info, start + begin) for name, (info, begin, _) in spans.items()}, metadata, start


def _entry(path: str, name: str, h, room: int) -> tuple[TensorInfo, int, int]:
    """One header entry as (info, begin, end) in the data buffer of `room` bytes."""
    if type(h) is not dict or h.keys() != _FIELDS:
        got = sorted(h) if isinstance(h, dict) else type(h).__name__
        raise InputError(path, name, f"header entry must have exactly the fields dtype, shape, data_offsets (got {got})")
    dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPES:
        if dtype in OTHER_DTYPES:
            raise InputError(path, name, dtype_refusal(dtype))
        raise InputError(path, name, f"unknown dtype {str(dtype)[:40]!r}")
    if not _counts(shape):
        raise InputError(path, name, f"shape {str(shape)[:80]} is not a list of integers from 0 to 2^64-1")
    if not _counts(offsets) or len(offsets) != 2:
        raise InputError(path, name, f"data_offsets {str(offsets)[:80]} is not a pair of integers from 0 to 2^64-1")
    info = TensorInfo(tuple(shape), DTYPES[dtype])
    begin, end = offsets
    need = _nbytes_within(info, room)
    if need is None:
        raise InputError(path, name, f"{dtype} shape {str(shape)[:80]} needs more bytes than the file's {room} bytes "
                                     "of data")
    if end - begin != need:
        raise InputError(path, name, f"byte range {begin}..{end} does not hold {dtype} shape {shape} ({need} bytes)")
    return info, begin, end


def _counts(x) -> bool:
    """A list of integers in 0..2^64-1 (not bools, not floats), checked in C-speed builtins."""
    return type(x) is list and set(map(type, x)) <= _INT and (not x or (min(x) >= 0 and max(x) <= _MAX_DIM))


def _nbytes_within(info: TensorInfo, room: int) -> int | None:
    """The tensor's byte size, or None when it exceeds `room` (huge dims never multiply out)."""
    if 0 in info.shape:
        return 0
    n = info.dtype.itemsize
    for d in info.shape:
        n *= d
        if n > room:
            return None
    return n


def _check_tiling(path: str, spans: dict, room: int) -> None:
    """The data buffer must be covered exactly: sorted by offset, each tensor starts where
    the previous one ended (no gap, no overlap), and the last ends at the end of the file."""
    pos, prev = 0, None
    for name, (_, begin, end) in sorted(spans.items(), key=lambda kv: kv[1][1:]):
        if begin < pos:
            raise InputError(path, name, f"bytes {begin}..{end} overlap tensor '{prev}' (which ends at {pos})")
        if begin > pos:
            raise InputError(path, name, f"bytes {begin}..{end} leave a gap of {begin - pos} bytes before them")
        pos, prev = end, name
    if pos > room:
        raise InputError(path, prev, f"data ends at byte {pos} of the data buffer but the file holds {room}: truncated")
    if pos < room:
        raise InputError(path, None, f"{room - pos} bytes after the last tensor are not described by the header: "
                                     "corrupted file")


def read_tensor(path: str, info: TensorInfo, offset: int) -> torch.Tensor:
    """Read one tensor into fresh memory (no mmap)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open_regular(path) as f:
        f.seek(offset)
        got = f.readinto(buf.numpy()) if info.nbytes else 0
    if got != info.nbytes:
        raise InputError(path, None, f"short read at byte {offset}: file changed or truncated")
    return buf.view(info.dtype).reshape(info.shape)


def _header_bytes(layout: dict, metadata: dict | None) -> bytes:
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header.update(layout)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned


class SafetensorsWriter:
    """Writes a file whose tensor list is known up front, one tensor at a time, in any order.

    Several processes may write one file: one creates it, the others open it with
    `create=False` (after it is created); each names the tensors it `writes` (default all),
    and each writes its own tensors at their offsets."""

    def __init__(self, path: str, infos: dict[str, TensorInfo], metadata: dict | None = None, *,
                 create: bool = True, writes=None):
        self.path = path
        layout, self._offsets, pos = {}, {}, 0
        for name, info in infos.items():
            if info.dtype not in DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {info.dtype} cannot be stored in safetensors")
            layout[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [pos, pos + info.nbytes]}
            self._offsets[name] = (pos, info)
            pos += info.nbytes
        header = _header_bytes(layout, metadata)
        self._start = 8 + len(header)
        self._pending = set(infos if writes is None else writes)
        if not create:
            with naming(path):
                self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            return
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            with naming(path):
                os.pwrite(self._fd, struct.pack("<Q", len(header)) + header, 0)
                os.ftruncate(self._fd, self._start + pos)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        pos, info = self._offsets[name]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {info.shape} {info.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view, at = memoryview(data), self._start + pos
        with naming(self.path):
            while view:
                done = os.pwrite(self._fd, view, at)
                view, at = view[done:], at + done
        self._pending.discard(name)

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with naming(self.path):
            os.close(fd)
        if self._pending:
            raise RuntimeError(f"{self.path}: {len(self._pending)} tensors were never written, e.g. {sorted(self._pending)[0]}")

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Write a whole dict of tensors to one safetensors file."""
    writer = SafetensorsWriter(path, {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in tensors.items()}, metadata)
    try:
        for name, t in tensors.items():
            writer.write(name, t)
    except BaseException:
        writer.abort()
        os.unlink(path)
        raise
    writer.close()


def load_file(path: str) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file (small files: compressed tasks, tests)."""
    entries, _, _ = read_header(path)
    return {name: read_tensor(path, info, off) for name, (info, off) in entries.items()}
