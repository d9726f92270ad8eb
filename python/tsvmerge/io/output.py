"""Output: sharded safetensors with an index json, written atomically.

Everything goes to a temporary folder beside the target and is renamed into place at
the end, so a failed or interrupted run leaves no partial model behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from .safetensors import SafetensorsWriter, TensorInfo

INDEX_NAME = "model.safetensors.index.json"


def plan_shards(infos: dict[str, TensorInfo], shard_size: int) -> list[list[str]]:
    """Split names, in order, into shards of at most `shard_size` bytes (a big tensor gets its own)."""
    shards, current, used = [], [], 0
    for name, info in infos.items():
        if current and used + info.nbytes > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += info.nbytes
    if current or not shards:
        shards.append(current)
    return shards


class ShardedWriter:
    """Writes planned tensors into shards in any order; `close` writes the index."""

    def __init__(self, folder: str, infos: dict[str, TensorInfo], shard_size: int, metadata: dict):
        groups = plan_shards(infos, shard_size)
        n = len(groups)
        self.folder = folder
        self._writers, self._where, self._files = [], {}, {}
        for i, names in enumerate(groups):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            writer = SafetensorsWriter(os.path.join(folder, fname), {k: infos[k] for k in names}, metadata)
            self._writers.append(writer)
            for name in names:
                self._where[name] = writer
                self._files[name] = fname
        self._index = {"metadata": {"total_size": sum(i.nbytes for i in infos.values()), **metadata},
                       "weight_map": self._files}

    def write(self, name, tensor):
        self._where[name].write(name, tensor)

    def close(self):
        for w in self._writers:
            w.close()
        with open(os.path.join(self.folder, INDEX_NAME), "w") as f:
            json.dump(self._index, f, indent=1)

    def abort(self):
        for w in self._writers:
            w.abort()


@contextlib.contextmanager
def atomic_folder(target: str, overwrite: bool = False):
    """Yield a temporary folder beside `target`; rename it to `target` only on success."""
    target = os.path.abspath(target)
    if os.path.exists(target) and not overwrite and (not os.path.isdir(target) or os.listdir(target)):
        raise FileExistsError(f"{target}: output already exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rename(target, os.path.join(old, "x"))
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str):
    """Yield a temporary path beside `target`; rename it into place only on success."""
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, target)


@contextlib.contextmanager
def _completed(writer):
    """Close `writer` when the block succeeds; abort it (no half-written file kept) when not."""
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()


@contextlib.contextmanager
def model_writer(target: str, infos: dict[str, TensorInfo], metadata: dict, *, shard_size: int,
                 overwrite: bool = False):
    """A model folder (sharded safetensors + index json) written into a temporary folder and
    published at `target` only when the block succeeds. Other files of the model (the report)
    go into `writer.folder` inside the block."""
    with atomic_folder(target, overwrite=overwrite) as tmp, _completed(ShardedWriter(tmp, infos, shard_size, metadata)) as w:
        yield w


@contextlib.contextmanager
def file_writer(target: str, infos: dict[str, TensorInfo], metadata: dict):
    """One safetensors file, published at `target` only when the block succeeds."""
    with atomic_file(target) as tmp, _completed(SafetensorsWriter(tmp, infos, metadata)) as w:
        yield w
