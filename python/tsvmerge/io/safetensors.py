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
from .publish import naming

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


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
    """Parse and validate a header: (infos with byte ranges, metadata, data start)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(path, None, "file is too short to be safetensors")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise InputError(path, None, f"header length {n} exceeds the file ({size} bytes): corrupted or truncated")
            header = json.loads(f.read(n))
    except OSError as e:
        raise InputError(path, None, f"cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, None, f"header is not valid JSON ({e}): corrupted file") from None
    if not isinstance(header, dict):
        raise InputError(path, None, "header is not a JSON object")
    start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(d) for d in h["shape"])
            begin, end = (int(o) for o in h["data_offsets"])
        except KeyError as e:
            raise InputError(path, name, f"unsupported or missing header field {e}") from None
        except (TypeError, ValueError):
            raise InputError(path, name, "malformed header entry") from None
        info = TensorInfo(shape, dtype)
        if end - begin != info.nbytes or begin < 0:
            raise InputError(path, name, f"byte range {begin}..{end} does not hold shape {list(shape)} {h['dtype']}")
        if start + end > size:
            raise InputError(path, name, f"data ends at byte {start + end} but the file has {size}: truncated")
        entries[name] = (info, start + begin)
    return entries, metadata, start


def read_tensor(path: str, info: TensorInfo, offset: int) -> torch.Tensor:
    """Read one tensor into fresh memory (no mmap)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(path, "rb") as f:
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
    """Writes a file whose tensor list is known up front, one tensor at a time, in any order."""

    def __init__(self, path: str, infos: dict[str, TensorInfo], metadata: dict | None = None):
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
        self._pending = set(infos)
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
