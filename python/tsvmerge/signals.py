"""SIGINT, SIGTERM and SIGHUP end a run the same way: the temporary output is removed and the
command exits 128 + n. torchrun stops surviving ranks with SIGTERM, terminals send SIGHUP.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stopping signal arrived; every `except BaseException` cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handled(prog: str, ignore_after: tuple = ()):
    """The command line's handlers: the first stopping signal raises `Interrupted`; later ones
    only say that cleanup is under way (a second Ctrl-C must not break the cleanup itself).
    The signals `ignore_after` are ignored once the block is left, the others restored: a rank
    of a distributed run that has its exit code keeps it when torchrun stops the job."""
    if not _main_thread():
        yield
        return
    told = []

    def later(signum, frame):
        if not told:
            told.append(signum)
            print(f"{prog}: still cleaning up, one moment", file=sys.stderr)

    def first(signum, frame):
        for s in STOPPING:
            signal.signal(s, later)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, first) for s in STOPPING}
    try:
        yield
    finally:
        _restore({s: signal.SIG_IGN if s in ignore_after else h for s, h in previous.items()})


def _restore(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler set outside Python


@contextlib.contextmanager
def deferred():
    """Hold stopping signals for the block (a few renames must happen all or none) and
    deliver the first one to the handler in force when the block succeeds."""
    if not _main_thread():
        yield
        return
    got = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in STOPPING}
    try:
        yield
    finally:
        _restore(previous)
    if got:
        signal.raise_signal(got[0])
