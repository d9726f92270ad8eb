"""Streaming: peak RSS stays flat as the number of tasks grows."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from tsvmerge.zoo import Arch, make_zoo

MEDIUM = Arch("medium", width=256, layers=12, patch=16, image=64, output_dim=128)

# VmHWM, not ru_maxrss: a child's ru_maxrss includes this (pytest) process's peak, folded in at
# exec, and would make both runs read the same
CHILD = """
import sys, tsvmerge
base, *tasks = sys.argv[1:]
tsvmerge.merge(base, tasks, backend="torch", out=sys.argv[0] + ".out", batch_bytes=8 << 20, progress=False)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024)
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


def test_read_ahead_passes_small_batches_within_one_budget(monkeypatch):
    """While batch i computes, the reader runs ahead past small batches to the next large
    one, but never holds more than one budget of batches read ahead (or the next batch)."""
    from tsvmerge import engine
    from tsvmerge.plan import Batch, batch_nbytes

    sizes = [100, 5, 5, 90, 5, 100, 100]                   # x 8 bytes: one task + base, fp32
    batches = [Batch("mean", (n,), [f"b{i}"]) for i, n in enumerate(sizes)]
    plan = SimpleNamespace(tasks=[None], batch_bytes=800)
    loaded = []
    monkeypatch.setattr(engine, "load_batch", lambda plan, batch, *args: loaded.append(batch) or batch)

    def settled(count):
        for _ in range(1000):                              # up to 5 s on a loaded machine
            if len(loaded) >= count:
                break
            time.sleep(0.005)
        time.sleep(0.02)                                   # nothing beyond it arrives
        return [batches.index(b) for b in loaded]

    ahead = {0: 4, 1: 5, 2: 5, 3: 5, 4: 6, 5: 7, 6: 7}       # batches read once batch i is yielded
    for i, batch in enumerate(engine._read_ahead(plan, batches, ())):
        assert batch is batches[i]
        seen = settled(ahead[i])
        assert seen == list(range(ahead[i])), (i, seen)
        extra = sum(batch_nbytes(b, 1) for b in batches[i + 1:ahead[i]])
        assert extra <= plan.batch_bytes or ahead[i] == i + 2
