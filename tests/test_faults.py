"""Faults while writing: disk errors injected at the system calls the writer uses (ENOSPC,
EROFS, EPERM, EACCES), a real EFBIG from a small RLIMIT_FSIZE, and real SIGTERM, SIGHUP,
SIGINT and SIGKILL delivered to a merge caught mid-write (tests/paused_cli.py); and two runs
racing for one output. Each time: one line naming the output, nothing written, no debris,
the inputs untouched; after a SIGKILL the next run removes the debris."""
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tsvmerge.cli import main
from tsvmerge.io import publish
from tsvmerge.zoo import Arch, make_zoo

TINY = Arch("tiny", width=48, layers=2, patch=8, image=32, output_dim=24)
PAUSED_CLI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paused_cli.py")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(str(tmp_path_factory.mktemp("zoo")), arch=TINY, tasks=2, seed=5, progress=False)


def digest(zoo) -> str:
    h = hashlib.sha256()
    for path in [zoo.base, *zoo.finetuned]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def merge_args(zoo, out, *more):
    return ["merge", zoo.base, *zoo.finetuned, "-o", str(out), "--backend", "reference", "--no-progress", *more]


def cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip()]


def failing(real, code, when):
    """`real`, raising OSError(code) for the calls where `when(args)` holds."""
    def call(*args, **kwargs):
        if when(args):
            named = isinstance(args[0], (str, bytes, os.PathLike))   # as the kernel's errors are; not a descriptor
            raise OSError(code, os.strerror(code), *([args[0]] if named else []))
        return real(*args, **kwargs)
    return call


def nth_call(n):
    count = [0]

    def when(args):
        count[0] += 1
        return count[0] == n
    return when


def temporary(args):
    return ".tmp-" in os.fsdecode(args[0])


INJECTED = {
    # the third data write of the model: mid-write, the shard already holds a tensor
    "ENOSPC-write": (os, "pwrite", errno.ENOSPC, lambda: nth_call(3)),
    "EROFS-mkdir": (os, "mkdir", errno.EROFS, lambda: temporary),
    "EACCES-create": (os, "open", errno.EACCES, lambda: (lambda args: temporary(args) and args[1] & os.O_CREAT)),
    "EPERM-rename": (publish, "renameat2", errno.EPERM, lambda: (lambda args: True)),
    "ENOSPC-report": (json, "dump", errno.ENOSPC, lambda: (lambda args: True)),
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("fault", list(INJECTED))
def test_disk_errors_are_one_line_and_write_nothing(zoo, tmp_path, capsys, monkeypatch, fault, overwrite):
    module, name, code, when = INJECTED[fault]
    out = tmp_path / "out"
    if overwrite:       # the old output must survive the failed run as it was
        out.mkdir()
        (out / "old.txt").write_text("old")
    before = digest(zoo)
    monkeypatch.setattr(module, name, failing(getattr(module, name), code, when()))
    got, lines = cli(merge_args(zoo, out, "--report", str(tmp_path / "r.json"), *(["--overwrite"] * overwrite)), capsys)
    monkeypatch.undo()
    assert got == 2 and len(lines) == 1, lines
    assert lines[0].startswith("tsvmerge merge: error: ") and os.strerror(code) in lines[0], lines
    assert "nothing was written" in lines[0] and (str(out) in lines[0] or str(tmp_path / "r.json") in lines[0])
    assert sorted(os.listdir(tmp_path)) == (["out"] if overwrite else [])
    assert not overwrite or os.listdir(out) == ["old.txt"]
    assert digest(zoo) == before


@pytest.mark.parametrize("command", ["compress", "decompress", "zoo", "interference"])
def test_disk_full_in_every_command(zoo, tmp_path, capsys, monkeypatch, command):
    compressed = str(tmp_path / "in" / "t.tsvc.safetensors")
    assert main(["compress", zoo.base, zoo.finetuned[0], "-o", compressed, "--no-progress"]) == 0
    target = str(tmp_path / "target")
    argv = {"compress": ["compress", zoo.base, zoo.finetuned[0], "-o", target, "--no-progress"],
            "decompress": ["decompress", zoo.base, compressed, "-o", target],
            "zoo": ["zoo", target, "--arch", "ViT-B-32", "--layers", "0", "--tasks", "1"],
            "interference": ["interference", zoo.base, *zoo.finetuned, "--report", target, "--no-progress"]}[command]
    capsys.readouterr()
    hook = (json, "dump") if command == "interference" else (os, "pwrite")
    monkeypatch.setattr(*hook, failing(getattr(*hook), errno.ENOSPC, lambda args: True))
    got, lines = cli(argv, capsys)
    monkeypatch.undo()
    assert got == 2 and len(lines) == 1 and f"{target}: cannot write: No space left on device" in lines[0], lines
    assert os.listdir(tmp_path) == ["in"]


def test_file_size_limit_for_real(zoo, tmp_path):
    """RLIMIT_FSIZE below the model's size: the kernel refuses the write (EFBIG)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    before = digest(zoo)
    r = subprocess.run([sys.executable, "-m", "tsvmerge.cli", *merge_args(zoo, tmp_path / "out")],
                       capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"{tmp_path / 'out'}: cannot write: File too large" in lines[0] and "ulimit" in lines[0], lines
    assert os.listdir(tmp_path) == [] and digest(zoo) == before


def start_paused(zoo, folder, *flags, go="-", slow_cleanup=False):
    """A merge into folder/out that pauses mid-write (after its first tensor)."""
    os.makedirs(folder, exist_ok=True)
    paused = os.path.join(folder, "..", f"{os.path.basename(folder)}.paused")
    argv = [PAUSED_CLI, paused, go, *(["--slow-cleanup"] * slow_cleanup), *merge_args(zoo, os.path.join(folder, "out"),
                                                                                        *flags)]
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), paused


def wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_signals_mid_write(zoo, tmp_path, capsys):
    """SIGTERM, SIGHUP and SIGINT stop a run like Ctrl-C: exit 128+n, nothing written, the
    temporary gone. SIGKILL leaves the temporary, named with the dead PID; the next run on the
    same output removes it."""
    before = digest(zoo)
    sigs = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL]
    runs = {s: start_paused(zoo, str(tmp_path / s.name)) for s in sigs}   # in parallel: each start takes seconds
    for s, (proc, paused) in runs.items():
        wait_for(paused, proc)
        assert [f for f in os.listdir(tmp_path / s.name) if f.startswith(f".out.tmp-{proc.pid}-")]
        proc.send_signal(s)
    for s, (proc, _) in runs.items():
        _, err = proc.communicate(timeout=120)
        folder = tmp_path / s.name
        if s == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            debris = os.listdir(folder)
            assert len(debris) == 1 and debris[0].startswith(f".out.tmp-{proc.pid}-"), debris
            continue
        lines = err.strip().splitlines()
        assert proc.returncode == 128 + s, err
        assert lines == [f"tsvmerge merge: interrupted ({s.name}); nothing was written"], err
        assert os.listdir(folder) == []
    folder = tmp_path / "SIGKILL"
    got, lines = cli(merge_args(zoo, folder / "out"), capsys)
    assert got == 0 and len(lines) == 1 and "left by a run that was killed" in lines[0], lines
    assert os.listdir(folder) == ["out"]
    assert digest(zoo) == before


def test_second_ctrl_c_during_cleanup(zoo, tmp_path):
    proc, paused = start_paused(zoo, str(tmp_path / "run"), slow_cleanup=True)
    wait_for(paused, proc)
    proc.send_signal(signal.SIGINT)
    wait_for(paused + ".cleanup", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["tsvmerge merge: still cleaning up, one moment",
                                        "tsvmerge merge: interrupted (SIGINT); nothing was written"], err
    assert os.listdir(tmp_path / "run") == []


def test_two_runs_one_output(zoo, tmp_path, capsys):
    """While a run writes an output, a second tsvmerge run on it is refused at its start (exit
    2, nothing touched). Another program that writes the output meanwhile wins: the first run
    exits 2 and says why, and what the other wrote stays. Without --overwrite the run finds the
    name taken; with it, finds there something other than what it saw at its start."""
    runs = {}
    for overwrite in (False, True):
        out = tmp_path / str(overwrite) / "out"
        if overwrite:
            assert main(merge_args(zoo, out, "--alpha", "0.5")) == 0
        go = str(tmp_path / f"{overwrite}.go")
        runs[overwrite] = (out, go, *start_paused(zoo, str(out.parent), *["--overwrite"] * overwrite, go=go))
    for overwrite, (out, go, proc, paused) in runs.items():
        wait_for(paused, proc)
        before = sorted(os.listdir(out.parent))
        got, lines = cli(merge_args(zoo, out, "--alpha", "0.25", *["--overwrite"] * overwrite), capsys)
        assert got == 2 and lines == [f"tsvmerge merge: error: {out}: another run is writing it now (process "
                                      f"{proc.pid}): wait for it to finish, or choose another path"], lines
        assert sorted(os.listdir(out.parent)) == before
        if overwrite:
            shutil.rmtree(out)
        os.mkdir(out)
        (out / "theirs.txt").write_text("another program's output")
        open(go, "w").close()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        why = "changed while this run was writing" if overwrite else "appeared while this run was writing"
        assert err.strip().splitlines() == [f"tsvmerge merge: error: {out}: {why} (another tsvmerge run?): it was "
                                            "left as it is and nothing was written"], err
        assert os.listdir(out) == ["theirs.txt"]
        assert os.listdir(out.parent) == ["out"]
