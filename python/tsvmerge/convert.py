"""`convert`: a checkpoint written once as one safetensors file, so that later runs read it
without unpickling (the TSV paper's checkpoints are whole pickled modules)."""
from __future__ import annotations

from .io import CompressedTask, InputError, claim, file_writer, input_paths, open_checkpoint


def convert(src, out, *, trust_pickle: bool = False, overwrite: bool = False) -> dict:
    """Write every tensor of `src` (any input `merge` reads) to the safetensors file `out`,
    names and dtypes as they are; an existing `out` is replaced only with `overwrite=True`,
    never the input. Returns {"source", "out", "tensors", "notes"}."""
    target = claim(out, folder=False, overwrite=overwrite, inputs=input_paths([src]))
    ckpt = open_checkpoint(src, trust_pickle)
    if isinstance(ckpt, CompressedTask):
        raise InputError(ckpt.source, None, "is a TSV-C file: rebuild the model with tsvmerge decompress")
    infos = ckpt.infos()
    with file_writer(target, infos, {"format": "pt"}) as writer:
        for name in infos:
            writer.write(name, ckpt.read(name))
    ckpt.release()
    return {"source": ckpt.source, "out": target.path, "tensors": len(infos), "notes": list(ckpt.notes)}
