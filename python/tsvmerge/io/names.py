"""Tensor names that differ only by a wrapper's prefix: the one place where names are matched.

Saving a model through a wrapper prefixes every name: DDP and DataParallel add `module.`,
torch.compile `_orig_mod.`, the task-vectors `ImageEncoder` (the format of the TSV paper's
checkpoints) `model.`, and transformers 4 saves a `CLIPVisionModel` under `vision_model.`
where transformers 5 does not. A task whose names equal the base's once the prefixes that
all of its names share are set aside is read under the base's names; the output keeps the
base's names, so it loads wherever the base loads.
"""
from __future__ import annotations

from .checkpoint import Checkpoint

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "vision_model.")


def shared_prefix(names) -> str:
    """The wrapper prefixes that every name starts with, outermost first ('' if none)."""
    names = list(names)
    prefix = ""
    while names:
        step = next((p for p in WRAPPER_PREFIXES if all(n.startswith(prefix + p) for n in names)), None)
        if step is None:
            break
        prefix += step
    return prefix


class Renamed(Checkpoint):
    """`inner` read under other names: `names` maps each new name to the inner one."""

    def __init__(self, inner: Checkpoint, names: dict[str, str], note: str):
        self.inner, self.names, self.source = inner, names, inner.source
        self.notes = [*inner.notes, note]

    @property
    def is_delta(self):
        return self.inner.is_delta

    @property
    def reads_files(self):
        return self.inner.reads_files

    def infos(self):
        inner = self.inner.infos()
        return {new: inner[old] for new, old in self.names.items()}

    def read(self, name):
        return self.inner.read(self.names[name])

    def head(self, name):
        return self.inner.head(self.names[name])

    def factors(self, name):
        return self.inner.factors(self.names[name])

    def release(self):
        self.inner.release()


def prefix_renaming(theirs, ours) -> tuple[dict[str, str], str] | None:
    """({our name: their name}, a note) when `theirs` differ from `ours` by wrapper prefixes,
    else None (no prefix explains a difference)."""
    tp, bp = shared_prefix(theirs), shared_prefix(ours)
    core = {n[len(tp):]: n for n in theirs}
    if tp == bp or not set(core) & {n[len(bp):] for n in ours}:
        return None
    return {bp + c: n for c, n in core.items()}, f"prefix {tp!r} taken as {bp!r}"


def align_names(task: Checkpoint, base: Checkpoint) -> Checkpoint:
    """`task` under the base's names where the two differ by wrapper prefixes; else `task` as
    it is. Validation then names any tensor that still differs, in the base's terms."""
    theirs, ours = list(task.infos()), list(base.infos())
    if set(theirs) == set(ours) or task.is_delta:  # a TSV-C file is written under its base's names
        return task
    renaming = prefix_renaming(theirs, ours)
    if renaming is None:
        return task
    names, how = renaming
    return Renamed(task, names, f"names read under the base's: {how}")
