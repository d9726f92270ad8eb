"""Output: sharded safetensors with an index json, written into a temporary and published
whole (`publish`), so a failed or interrupted run leaves no partial model behind.
"""
from __future__ import annotations

import contextlib
import json
import os

from .publish import Output, naming, publishing
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
        write_json(os.path.join(self.folder, INDEX_NAME), self._index)

    def abort(self):
        for w in self._writers:
            w.abort()


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
def model_writer(target: Output, infos: dict[str, TensorInfo], metadata: dict, *, shard_size: int,
                 also: tuple[Output | None, ...] = ()):
    """A model folder (sharded safetensors + index json) written into a temporary folder and
    published at `target` when the block succeeds, together with the outputs `also` (a report
    file), all or none. Other files of the model (its report) go into `writer.folder` inside
    the block, the outputs `also` into the temporary paths `writer.also`."""
    with model_writers(target, infos, {"": metadata}, shard_size=shard_size, also=also) as (writer,):
        yield writer


@contextlib.contextmanager
def model_writers(target: Output, infos: dict[str, TensorInfo], metadata: dict[str, dict], *, shard_size: int,
                  also: tuple[Output | None, ...] = ()):
    """`model_writer` for several models of the same tensors: one in the sub-folder NAME of
    `target` for each NAME: metadata of `metadata` ("" is `target` itself), all published in
    one rename, or none."""
    with publishing(target, *also) as (folder, *others), contextlib.ExitStack() as stack:
        writers = []
        for name, meta in metadata.items():
            sub = os.path.join(folder, name) if name else folder
            if name:
                os.mkdir(sub, 0o777)
            writer = stack.enter_context(_completed(ShardedWriter(sub, infos, shard_size, meta)))
            writer.also = others
            writers.append(writer)
        yield writers


@contextlib.contextmanager
def file_writer(target: Output, infos: dict[str, TensorInfo], metadata: dict):
    """One safetensors file, published at `target` when the block succeeds."""
    with publishing(target) as (tmp,), _completed(SafetensorsWriter(tmp, infos, metadata)) as writer:
        yield writer


def write_json(path: str, obj) -> None:
    with naming(path), open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_json(target: Output, obj) -> None:
    """A JSON file published at `target`."""
    with publishing(target) as (tmp,):
        write_json(tmp, obj)
