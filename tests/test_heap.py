"""tsvmerge.heap: freed work buffers stay in the process during a merge, and leave after."""
import pytest
import torch

from tsvmerge import heap

MB = 1 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(heap._glibc() is None, reason="needs glibc's mallopt")
def test_freed_memory_is_kept_inside_and_returned_after():
    start = rss()
    with heap.reuse_freed_memory():
        x = torch.ones(64 * MB)          # 256 MB, touched
        del x
        kept = rss() - start
        y = torch.ones(64 * MB)          # served from the kept pages
        del y
    after = rss() - start
    assert kept > 200 * MB, kept
    assert after < 50 * MB, after
