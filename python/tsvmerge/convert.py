"""`convert`: a checkpoint written once as one safetensors file, so that later runs read it
without unpickling (the TSV paper's checkpoints are whole pickled modules)."""
from __future__ import annotations

import os

from .io import CompressedTask, InputError, file_writer, open_checkpoint


def convert(src, out, *, trust_pickle: bool = False, overwrite: bool = False) -> dict:
    """Write every tensor of `src` (any input `merge` reads) to the safetensors file `out`,
    names and dtypes as they are. Returns {"source", "out", "tensors", "notes"}."""
    ckpt = open_checkpoint(src, trust_pickle)
    if isinstance(ckpt, CompressedTask):
        raise InputError(ckpt.source, None, "is a TSV-C file: rebuild the model with tsvmerge decompress")
    out = os.path.abspath(out)
    if _inside(out, ckpt.source):
        raise InputError(out, None, f"is the input {ckpt.source} or lies inside it: choose another output")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out}: output already exists (pass overwrite=True / --overwrite to replace it)")
    infos = ckpt.infos()
    with file_writer(out, infos, {"format": "pt"}) as writer:
        for name in infos:
            writer.write(name, ckpt.read(name))
    ckpt.release()
    return {"source": ckpt.source, "out": out, "tensors": len(infos), "notes": list(ckpt.notes)}


def _inside(path: str, source: str) -> bool:
    if not os.path.exists(source):  # a state dict in memory
        return False
    path, source = os.path.realpath(path), os.path.realpath(source)
    return path == source or path.startswith(source.rstrip(os.sep) + os.sep)
