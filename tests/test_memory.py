"""Streaming: peak RSS stays flat as the number of tasks grows."""
import os
import subprocess
import sys

from tsvmerge.zoo import Arch, make_zoo

MEDIUM = Arch("medium", width=256, layers=12, patch=16, image=64, output_dim=128)

CHILD = """
import resource, sys, tsvmerge
base, *tasks = sys.argv[1:]
tsvmerge.merge(base, tasks, backend="torch", out=sys.argv[0] + ".out", batch_bytes=8 << 20, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(base, tasks, out):
    r = subprocess.run([sys.executable, "-c", CHILD.replace('sys.argv[0] + ".out"', repr(str(out))), base, *tasks],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def test_peak_rss_flat_in_task_count(tmp_path):
    zoo = make_zoo(str(tmp_path / "zoo"), arch=MEDIUM, tasks=10, seed=3, progress=False)
    model_bytes = os.path.getsize(zoo.base)
    small = peak_rss(zoo.base, zoo.finetuned[:2], tmp_path / "a")
    large = peak_rss(zoo.base, zoo.finetuned, tmp_path / "b")
    # Holding the checkpoints would add 8 models (~8 x 38 MB); streaming adds only the
    # larger batch buffers of 10 tasks (one layer each, ~10 MB).
    assert large - small < 0.25 * 8 * model_bytes, (small, large, model_bytes)
