"""Output: sharded safetensors with an index json, written into a temporary and published
whole (`publish`), so a failed or interrupted run leaves no partial model behind.
"""
from __future__ import annotations

import contextlib
import json
import os

from ..distributed import World
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


def shard_groups(infos: dict[str, TensorInfo], shard_size: int, shares=None) -> tuple[list[list[str]], list[int]]:
    """The shards' tensor names and the rank that writes each: `plan_shards`, all rank 0's; or
    with `shares` (each rank's names), each rank's tensors in shards of their own, rank 0's
    first, so that no two processes write one file."""
    if shares is None:
        groups = plan_shards(infos, shard_size)
        return groups, [0] * len(groups)
    groups, owners = [], []
    for rank, names in enumerate(shares):
        if names:
            mine = plan_shards({n: infos[n] for n in names}, shard_size)
            groups += mine
            owners += [rank] * len(mine)
    return groups, owners


class ShardedWriter:
    """Writes planned tensors into shards in any order; `close` writes the index. In a
    distributed run each rank writes the shards in `files` (indices into `groups`), and
    rank 0 the index (`index`)."""

    def __init__(self, folder: str, infos: dict[str, TensorInfo], groups: list[list[str]], metadata: dict, *,
                 files=None, index: bool = True):
        n = len(groups)
        files = range(n) if files is None else files
        self.folder = folder
        self._writers, self._where, weight_map = [], {}, {}
        for i, names in enumerate(groups):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            weight_map.update(dict.fromkeys(names, fname))
            if i in files:
                writer = SafetensorsWriter(os.path.join(folder, fname), {k: infos[k] for k in names}, metadata)
                self._writers.append(writer)
                self._where.update(dict.fromkeys(names, writer))
        self._index = {"metadata": {"total_size": sum(i.nbytes for i in infos.values()), **metadata},
                       "weight_map": {name: weight_map[name] for name in infos}} if index else None

    def write(self, name, tensor):
        self._where[name].write(name, tensor)

    def close(self):
        for w in self._writers:
            w.close()
        if self._index is not None:
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
                  also: tuple[Output | None, ...] = (), world: World | None = None, shares=None):
    """`model_writer` for several models of the same tensors: one in the sub-folder NAME of
    `target` for each NAME: metadata of `metadata` ("" is `target` itself), all published in
    one rename, or none. In a distributed run (`world`, with `shares`: each rank's tensor
    names) every rank writes its own shards into rank 0's temporary folder, and rank 0 the
    index; rank 0 publishes once every rank is done (`World.staged`)."""
    world = world or World()
    groups, owners = shard_groups(infos, shard_size, shares)
    files = [i for i, owner in enumerate(owners) if owner == world.rank]
    with world.staged(publishing, target, *also) as (folder, *others), contextlib.ExitStack() as stack:
        writers = []
        for name, meta in metadata.items():
            sub = os.path.join(folder, name) if name else folder
            if name:
                os.makedirs(sub, 0o777, exist_ok=True)       # any rank may be first
            writer = stack.enter_context(_completed(ShardedWriter(sub, infos, groups, meta, files=files,
                                                                  index=world.main)))
            writer.also = others
            writers.append(writer)
        yield writers


@contextlib.contextmanager
def file_writer(target: Output, infos: dict[str, TensorInfo], metadata: dict, *, world: World | None = None,
                writes=None):
    """One safetensors file, published at `target` when the block succeeds. In a distributed
    run rank 0 creates the file and every rank writes its tensors (`writes`) into it."""
    world = world or World()
    with world.staged(publishing, target) as (tmp,):
        if world.main:
            writer = SafetensorsWriter(tmp, infos, metadata, writes=writes)
        world.sync()                    # created: the others may open it
        if not world.main:
            writer = SafetensorsWriter(tmp, infos, metadata, create=False, writes=writes)
        with _completed(writer):
            yield writer


def write_json(path: str, obj) -> None:
    with naming(path), open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_json(target: Output, obj) -> None:
    """A JSON file published at `target`."""
    with publishing(target) as (tmp,):
        write_json(tmp, obj)
