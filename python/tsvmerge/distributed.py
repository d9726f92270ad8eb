"""One merge across processes and machines, on torch.distributed, launched with torchrun.

A merge is independent per tensor, so it splits by batches of tensors (`plan.split_by_cost`:
each tensor in the batch a single process computes it in, so the same bits come out). Every
rank checks the arguments and plans from headers; rank 0 alone claims the outputs; an error
on any rank stops every rank before compute (`World.agree`). Each rank reads, computes and
writes only its own tensors, into rank 0's staging folder on the file system they share;
rank 0 publishes once every rank has written (`World.staged`). A rank that fails exits, and
torchrun stops the others with SIGTERM (`signals`): each removes what it wrote, and nothing
is published.

Without torchrun's environment (or with one process) `World()` is a single process, and
every collective is the identity: the single-process path is the same code.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

# A rank waits this long for the others at a collective (the slowest rank's share of the
# merge); a rank that dies closes its connections, so the others learn of it at once.
TIMEOUT = datetime.timedelta(hours=24)
_PROGRESS_KEY = "tsvmerge/progress"


class Stopped(Exception):
    """Another rank failed first, and said why; this rank stops with the same exit code."""

    def __init__(self, rank: int, exit_code: int):
        super().__init__(f"stopped: rank {rank} failed")
        self.rank, self.exit_code = rank, exit_code


class PeerLost(Exception):
    """A collective failed: another rank stopped (its output says why) or cannot be reached."""

    def __init__(self, rank: int, why: str):
        super().__init__(f"rank {rank}: another rank of the job stopped or cannot be reached ({why}); "
                         "nothing was published")


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank under torchrun, 0 otherwise (a RANK left in the environment by
    something else does not count)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass
class World:
    """This process's place in the job: rank `rank` of `size` (a single process: 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: object = None            # torch.distributed's key-value store (progress counts)
    started: float = field(default_factory=time.perf_counter)
    bars: list = field(default_factory=list)
    _bars_made: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- collectives (the identity in a single process) --------------------------------
    def _collective(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:       # gloo and NCCL: a peer closed its connection, or the timeout
            raise PeerLost(self.rank, str(e).splitlines()[0][:200]) from None

    def broadcast(self, obj):
        """rank 0's `obj`, on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        self._collective(dist.broadcast_object_list, box, 0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        self._collective(dist.all_gather_object, out, obj)
        return out

    def sync(self) -> None:
        """Wait until every rank has got here."""
        self.gather(None)

    def barrier(self) -> None:
        """`sync`, after which the progress bars show the whole job done."""
        self.sync()
        while self.bars:
            self.bars.pop().finish()

    def agree(self, fn, *, main_only: bool = False):
        """fn() on every rank (with `main_only`, on rank 0, its result sent to all). An error
        on any rank stops every rank: the first rank that failed raises its error, the others
        `Stopped`, so that one line says why."""
        if self.size == 1:
            return fn()
        result, error = None, None
        if self.main or not main_only:
            try:
                result = fn()
            except Exception as e:      # noqa: BLE001 - every error must reach the other ranks
                error = e
        codes = self.gather(None if error is None else exit_code(error))
        failed = [r for r, c in enumerate(codes) if c is not None]
        if failed:
            if failed[0] == self.rank:
                raise error
            raise Stopped(failed[0], codes[failed[0]])
        return self.broadcast(result) if main_only else result

    # -- the job's parts ----------------------------------------------------------------
    def progress(self, total: int, desc: str, progress: bool | None):
        """A bar for the whole job on rank 0, fed by every rank's `update(n)` (none elsewhere):
        `progress` None shows it on a terminal only."""
        bar = tqdm(total=sum(self.gather(total)), unit="B", unit_scale=True, desc=desc, dynamic_ncols=True,
                   disable=(not self.main) or (None if progress is None else not progress))
        if self.size == 1:
            return bar
        shared = _SharedBar(bar, self, f"{_PROGRESS_KEY}/{self._bars_made}")
        self._bars_made += 1
        self.bars.append(shared)
        return shared

    @contextlib.contextmanager
    def staged(self, publishing, *outputs):
        """`publishing(*outputs)` for the whole job: rank 0 makes the temporaries and every rank
        gets their paths; rank 0 publishes once every rank has left the block, else nothing
        is published. A rank that fails removes the temporaries (rank 0 may be gone)."""
        if self.size == 1:
            with publishing(*outputs) as tmps:
                yield tmps
            return
        if not self.main:
            tmps = self.broadcast(None)
            with _removed_on_error(tmps):
                yield tmps
            self.barrier()                          # written: rank 0 may publish
            code = self.broadcast(None)
            if code:
                raise Stopped(0, code)
            return
        written = False
        try:
            with publishing(*outputs) as tmps:
                self.broadcast(tmps)
                with _removed_on_error(tmps):
                    yield tmps
                    self.barrier()
                written = True
        except BaseException as e:
            if written:                             # the others wait for the outcome
                self.broadcast(exit_code(e))
            raise
        self.broadcast(0)

    def report(self) -> dict:
        """This rank's part of the report: where it ran, its wall time and peak memory."""
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                "wall_s": round(time.perf_counter() - self.started, 3), "peak_rss_bytes": peak_rss_bytes()}


@contextlib.contextmanager
def _removed_on_error(paths):
    """Remove the job's temporaries when the block fails, retrying while other ranks still
    remove their own files in them."""
    try:
        yield
    except BaseException:
        for path in paths:
            for _ in range(20):
                if path is None or not os.path.lexists(path):
                    break
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
                time.sleep(0.05)
        raise


class _SharedBar:
    """Every rank adds its finished bytes to a counter in torch.distributed's store; rank 0's
    bar follows the counter from a thread of its own until `finish` (every rank is done)."""

    def __init__(self, bar, world: World, key: str):
        self.bar, self.world, self.key, self._stop = bar, world, key, threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if world.main and not bar.disable:
            self._thread = threading.Thread(target=self._follow, daemon=True, name="tsvmerge-progress")
            self._thread.start()

    def _count(self, n: int = 0) -> int:
        with self._lock:
            return self.world.store.add(self.key, n)

    def _follow(self):
        while not self._stop.wait(0.5):
            self.bar.update(self._count() - self.bar.n)

    def update(self, n: int) -> None:
        self._count(n)

    def close(self) -> None:
        """This rank's share is done; the bar goes on until `finish`."""

    def finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.bar.update(self._count() - self.bar.n)
        self.bar.close()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return 0


def exit_code(error: BaseException) -> int:
    from .cli import exit_code as code
    return code(error)


def join(device: str) -> tuple[World, str]:
    """This process's World and the device it computes on: under torchrun with several
    processes, the process group started (gloo on the CPU, NCCL on CUDA) and `cuda` meaning
    this rank's local GPU; else a single process and `device` as given."""
    if not launched():
        return World(), device
    import torch
    import torch.distributed as dist
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = str(device).startswith("cuda")
    if cuda and str(device) != "cuda":
        raise ValueError(f"--device {device}: under torchrun give --device cuda; each rank takes its local GPU "
                         "(LOCAL_RANK)")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size, timeout=TIMEOUT,
                                store=_store(rank, size))
        atexit.register(_leave)         # a process group left running at exit can abort the process
    return World(rank, size, local, _store(rank, size)), device


def _leave() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _store(rank: int, size: int):
    """A client of the job's store: torchrun's agent holds it (TORCHELASTIC_USE_AGENT_STORE),
    else rank 0 serves it at MASTER_ADDR:MASTER_PORT."""
    import torch.distributed as dist
    global _STORE
    if _STORE is None:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(host, port, size, is_master=(rank == 0 and not agent), timeout=TIMEOUT)
        _STORE = dist.PrefixStore("tsvmerge", store)
    return _STORE


_STORE = None
