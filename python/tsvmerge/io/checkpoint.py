"""Lazy checkpoint readers: names, shapes and dtypes first, one tensor's data on demand.

`open_checkpoint` accepts a state dict, a safetensors file, a PyTorch `.pt/.bin/.pth`
state dict, a Hugging Face folder (single file or sharded with an index json), or a
TSV-C compressed task written by `tsvmerge.compress` (read by `tsvc_file.CompressedTask`).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re

import torch

from .errors import InputError
from .files import MAX_JSON_BYTES, open_regular, parse_json
from .safetensors import DTYPE_NAMES, TensorInfo, dtype_refusal, read_header, read_tensor

HEAD_BYTES = 64


class Checkpoint:
    """A source of named tensors. `read` returns fresh memory; `release` drops any cache."""

    source: str = "<memory>"
    # A TSV-C task stores task vectors (deltas), some as low-rank factors.
    is_delta = False
    # Reading waits on files (the engine then reads ahead in a background thread).
    reads_files = True
    # How the input was read, where the report should say so (a pickle trusted, names mapped).
    notes = ()
    _fingerprint: str | None = None

    def infos(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def factors(self, name: str):
        """(u [m,k], s [k], v [n,k]) when the tensor is stored factored, else None."""
        return None

    def release(self) -> None:
        pass

    def head(self, name: str) -> bytes:
        """The first bytes of a tensor's data (at most `HEAD_BYTES`), for `fingerprint`."""
        t = self.read(name).reshape(-1)
        return t[: max(1, HEAD_BYTES // t.element_size())].view(torch.uint8).numpy().tobytes()

    def fingerprint(self) -> str:
        """Names, shapes, dtypes and the first bytes of every tensor: tells apart checkpoints
        of one architecture (a TSV-C task and the base it was made from), in one small read
        per tensor, and is the same for a file and the state dict loaded from it."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        for name, info in sorted(self.infos().items()):
            h.update(f"{name}:{info.shape}:{info.dtype};".encode())
            if info.numel:
                h.update(self.head(name))
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


class DictCheckpoint(Checkpoint):
    reads_files = False

    def __init__(self, tensors: dict, source: str = "<state dict>"):
        self.source = source
        check_tensors(source, tensors)
        self._tensors = tensors

    def infos(self):
        return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def read(self, name):
        return self._tensors[name].detach().to("cpu")


class SafetensorsFile(Checkpoint):
    def __init__(self, path: str):
        self.source = path
        self._entries, self.metadata, _ = read_header(path)

    def infos(self):
        return {k: info for k, (info, _) in self._entries.items()}

    def read(self, name):
        info, offset = self._entries[name]
        return read_tensor(self.source, info, offset)

    def head(self, name):
        info, offset = self._entries[name]
        size = min(info.nbytes, HEAD_BYTES)
        return read_tensor(self.source, TensorInfo((size,), torch.uint8), offset).numpy().tobytes()


class TorchFile(Checkpoint):
    """A pickled state dict, loaded with weights_only=True and memory-mapped.

    With `trust_pickle`, a file that holds other objects (a whole pickled module, as the
    task-vectors checkpoints are) is unpickled in full and its `state_dict()` taken.
    The mapping is dropped on `release`, so the pages a batch touched leave RSS with it.
    """

    def __init__(self, path: str, trust_pickle: bool = False):
        self.source, self.trust_pickle = path, trust_pickle
        self._sd = None
        self.notes = []
        self._infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._load().items()}
        self.release()

    def _load(self):
        if self._sd is None:
            with open_regular(self.source) as f:
                obj = _torch_load(self.source, _fd_path(f) or self.source, self.trust_pickle)
            if isinstance(obj, torch.nn.Module):
                if not self.notes:
                    self.notes.append(f"a pickled {type(obj).__name__} module, unpickled in full (trust_pickle); "
                                      "its state_dict() was used")
                obj = obj.state_dict()
            self._sd = _state_dict(self.source, obj)
        return self._sd

    def infos(self):
        return self._infos

    def read(self, name):
        return self._load()[name].clone()

    def release(self):
        self._sd = None


def _fd_path(f) -> str | None:
    """A path to the file already open as `f` (Linux), so torch opens that file and not
    whatever the name points to by then (a FIFO there would block)."""
    path = f"/proc/self/fd/{f.fileno()}"
    return path if os.path.exists(path) else None


def _torch_load(source: str, path: str, trust_pickle: bool):
    """torch.load of `path` (the file `source`, already checked) with weights_only=True; with
    `trust_pickle`, a file that needs more is unpickled in full. A refusal is one sentence,
    never torch's message."""
    try:
        return _mapped_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:
            raise InputError(source, None, "cannot load as a PyTorch state dict: not a pickle, or a corrupted "
                                           "one") from None
        if not trust_pickle:
            raise InputError(source, None, f"holds a pickled {found.group(1)}, not only tensors, and unpickling it "
                             "could run any code: if you trust the file, pass --trust-pickle (trust_pickle=True), "
                             "or convert it once with tsvmerge convert --trust-pickle") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(source, None, f"cannot load as a PyTorch state dict: {_first_line(e)}") from None
    try:
        return _mapped_load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling runs the file's own code, which may raise anything
        raise InputError(source, None, f"cannot unpickle (trust_pickle): {_first_line(e)}") from None


def _mapped_load(path: str, weights_only: bool):
    """Memory-mapped where the format allows (the zip format since torch 1.6)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)  # legacy format


def _first_line(e: Exception) -> str:
    """An exception's message without terminal escape codes, first line only."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0][:200]


def _state_dict(source: str, obj) -> dict:
    """The flat dict of tensors a loaded checkpoint holds (unwrapping {"state_dict": ...})."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise InputError(source, None, "does not hold a state dict (a dict of tensors)")
    check_tensors(source, obj)
    return obj


def check_tensors(source: str, tensors: dict) -> None:
    """Every entry a dense tensor with data, of a dtype tsvmerge merges; else name the entry."""
    for name, v in tensors.items():
        if not isinstance(name, str):
            raise InputError(source, repr(name), "tensor names must be strings")
        if isinstance(v, dict):
            raise InputError(source, name, "is a nested dict: tsvmerge reads flat state dicts (name -> tensor)")
        if not isinstance(v, torch.Tensor):
            raise InputError(source, name, f"is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.is_nested:
            layout = "nested" if v.is_nested else str(v.layout).replace("torch.", "")
            raise InputError(source, name, f"is a {layout} tensor: only dense tensors can be merged")
        if v.dtype not in DTYPE_NAMES:
            raise InputError(source, name, dtype_refusal(str(v.dtype).replace("torch.", "")))
        if v.is_meta:
            raise InputError(source, name, "is a meta tensor: it has a shape but no data")


class ShardedFolder(Checkpoint):
    """A Hugging Face folder: `*.index.json` mapping names to shard files in the folder.

    The index and the shards must agree exactly: every listed tensor is in its shard and
    every shard tensor is listed there (else a tensor would be silently dropped or doubled).
    """

    def __init__(self, folder: str, index_path: str, trust_pickle: bool = False):
        self.source = folder
        weight_map = _read_index(index_path)
        by_shard: dict[str, list] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        self._shards, self._where = {}, {}
        for shard, names in by_shard.items():
            path = os.path.join(folder, shard)
            if not os.path.lexists(path):
                raise InputError(index_path, names[0], f"its shard {shard} is missing")
            ckpt = _open_file(path, trust_pickle)
            if ckpt.is_delta:
                raise InputError(path, None, "is a TSV-C file, which cannot be a shard of a model folder")
            have = ckpt.infos()
            for name in names:
                if name not in have:
                    raise InputError(path, name, f"listed in {os.path.basename(index_path)} but not in this shard")
            for name in have:
                if weight_map.get(name) != shard:
                    raise InputError(path, name, f"in this shard but {os.path.basename(index_path)} does not list it "
                                                 "here: the index and its shards disagree")
            self._shards[shard] = ckpt
            self._where.update(dict.fromkeys(names, ckpt))

    def infos(self):
        return {name: ckpt.infos()[name] for name, ckpt in self._where.items()}

    def read(self, name):
        return self._where[name].read(name)

    def head(self, name):
        return self._where[name].head(name)

    def release(self):
        for ckpt in self._shards.values():
            ckpt.release()


def _read_index(path: str) -> dict[str, str]:
    """An index json's weight_map: tensor name -> plain file name in the index's folder."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise InputError(path, None, f"is {size} bytes, over the {MAX_JSON_BYTES} bytes an index json may have")
        raw = f.read(size)
    index = parse_json(raw, path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(path, None, "index is not a JSON object with a non-empty 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(path, name, f"weight_map gives a {type(shard).__name__}, not a file name")
        if not _plain_name(shard):
            raise InputError(path, name, f"weight_map gives '{shard}', which is not a plain file name in the "
                                         "folder (no paths, no '..')")
    return weight_map


def _plain_name(name: str) -> bool:
    """A file name in the folder itself: no separator, no '..', not empty, no NUL. Where the
    name leads (HF caches link shards to blobs elsewhere) is the folder owner's choice."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _open_file(path: str, trust_pickle: bool = False) -> Checkpoint:
    if path.endswith(".safetensors"):
        from .tsvc_file import FORMAT, CompressedTask  # it builds on Checkpoint, defined here
        ckpt = SafetensorsFile(path)
        return CompressedTask(ckpt, ckpt.metadata) if ckpt.metadata.get("format") == FORMAT else ckpt
    if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return TorchFile(path, trust_pickle)
    raise InputError(path, None, "unknown file type (expected .safetensors, .pt, .pth or .bin)")


def open_checkpoint(src, trust_pickle: bool = False) -> Checkpoint:
    """Open a state dict, file or model folder lazily; errors name the file. `trust_pickle`
    lets a `.pt/.bin` file that holds more than tensors be unpickled in full (it can run code)."""
    if isinstance(src, Checkpoint):
        return src
    if isinstance(src, dict):
        return DictCheckpoint(src)
    path = os.fspath(src)
    if not os.path.exists(path):
        raise InputError(path, None, "no such file or folder")
    if os.path.isdir(path):
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.exists(os.path.join(path, index)):
                return ShardedFolder(path, os.path.join(path, index), trust_pickle)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, single)):
                return _open_file(os.path.join(path, single), trust_pickle)
        try:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        except OSError as e:
            raise InputError(path, None, f"cannot list the folder: {e.strerror or e}") from None
        if len(files) == 1:
            return _open_file(os.path.join(path, files[0]))
        raise InputError(path, None, "folder has no model.safetensors, index json or single .safetensors file")
    return _open_file(path, trust_pickle)
