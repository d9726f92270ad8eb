"""sha256 of merges of the tests' random zoos, one line per configuration: run before and after
a change that must not move full-rank merges, and diff the two outputs.

    python benchmarks/merge_sha256.py > before.txt   # ... change ..., then again > after.txt

The lines also go to benchmarks/results/merge_sha256-<device>-<commit>-<time>.{json,md}.
"""
import argparse
import hashlib
import itertools
import os
import sys

import torch

from recording import RESULTS, Record

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from conftest import ODD_SHAPES, random_zoo  # noqa: E402

import tsvmerge  # noqa: E402

ZOOS = {"odd": ODD_SHAPES, "two": {"a": (37, 23), "b": (64, 48)}, "wide": {"w": (48, 96), "b": (48,)}}


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def digests():
    """One line per merge: zoo, T, dtype, backend, orthogonalisation, [tsvc,] sha256."""
    for (zoo, shapes), T, dtype, backend, how in itertools.product(
            ZOOS.items(), (1, 2, 3, 5), (torch.float64, torch.float32, torch.bfloat16), ("reference", "torch"),
            ("procrustes", "whiten")):
        seed = 1000 * T + len(zoo)
        base, tasks = random_zoo(seed, T, shapes, dtype)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        out = tsvmerge.merge(base, tasks, backend=backend, compute_dtype=compute, orthogonalize=how,
                             preset="clip", progress=False)
        yield f"{zoo} T={T} {str(dtype)[6:]} {backend} {how} {digest(out)}"
        if dtype != torch.bfloat16 and T > 1:  # from TSV-C files that store rank >= the merge's k
            compressed = [tsvmerge.compress(base, t, rank=0.5, compute_dtype=compute, preset="clip") for t in tasks]
            out = tsvmerge.merge(base, compressed, backend=backend, compute_dtype=compute, orthogonalize=how,
                                 preset="clip", progress=False)
            yield f"{zoo} T={T} {str(dtype)[6:]} {backend} {how} tsvc {digest(out)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()
    record = Record("merge_sha256", "cpu", args.results)
    torch.set_num_threads(1)  # thread count may change BLAS rounding: fix it
    lines = []
    for line in digests():
        print(line, flush=True)
        lines.append(line)
    record.write({"digests": lines}, "sha256 of merges of the tests' random zoos", ["```", *lines, "```"])


if __name__ == "__main__":
    main()
