"""Publishing outputs (io/publish.py): a rename that cannot replace, an overwrite that replaces
only what was seen, all outputs of a run or none, the umask, and debris of killed runs. Each
case runs with Linux renameat2 and with the fallback used where it is missing."""
import os
import signal
import stat
import subprocess
import sys

import pytest

from tsvmerge.io import OutputError, claim, publishing
from tsvmerge.io import publish
from tsvmerge.warn import TsvmergeWarning
from tsvmerge.signals import Interrupted, handled


@pytest.fixture(params=["renameat2", "fallback"])
def route(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(publish, "_renameat2", None)
    elif publish._renameat2 is None:
        pytest.skip("this libc has no renameat2")
    return request.param


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


def listing(folder):
    return sorted(os.listdir(folder))


def test_rename_noreplace_never_replaces(route, tmp_path):
    write(tmp_path / "a", "new")
    write(tmp_path / "b", "theirs")
    with pytest.raises(FileExistsError):
        publish.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    os.mkdir(tmp_path / "d")
    (tmp_path / "d" / "x").write_text("new")
    os.mkdir(tmp_path / "e")
    for target in ("b", "e"):
        with pytest.raises(FileExistsError):
            publish.rename_noreplace(str(tmp_path / "d"), str(tmp_path / target))
    assert read(tmp_path / "b") == "theirs" and listing(tmp_path / "e") == []
    publish.rename_noreplace(str(tmp_path / "d"), str(tmp_path / "f"))
    publish.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "g"))
    assert listing(tmp_path) == ["b", "e", "f", "g"] and read(tmp_path / "f" / "x") == read(tmp_path / "g") == "new"


def test_exchange_swaps(route, tmp_path):
    write(tmp_path / "a", "A")
    os.mkdir(tmp_path / "b")
    publish.exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.path.isdir(tmp_path / "a") and read(tmp_path / "b") == "A" and listing(tmp_path) == ["a", "b"]


@pytest.mark.parametrize("folder", [True, False])
def test_new_output_published_whole(route, tmp_path, folder):
    target = claim(tmp_path / "out", folder=folder)
    with publishing(target) as (tmp,):
        assert os.path.basename(tmp).startswith(f".out.tmp-{os.getpid()}-")
        assert not os.path.exists(tmp_path / "out")
        if folder:
            write(os.path.join(tmp, "x"), "ours")
        else:
            write(tmp, "ours")
    assert read(tmp_path / "out" / "x" if folder else tmp_path / "out") == "ours"
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_something_that_appears_during_the_run_is_kept(route, tmp_path, overwrite):
    """Another run publishes first: it wins, this one fails and leaves it as it is."""
    target = claim(tmp_path / "out", folder=True, overwrite=overwrite)
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        with publishing(target) as (tmp,):
            write(os.path.join(tmp, "x"), "ours")
            os.mkdir(tmp_path / "out")
            write(tmp_path / "out" / "x", "theirs")
    assert read(tmp_path / "out" / "x") == "theirs" and listing(tmp_path) == ["out"]


@pytest.mark.parametrize("change", ["replaced", "modified"])
def test_overwrite_replaces_only_what_it_saw(route, tmp_path, change):
    os.mkdir(tmp_path / "out")
    write(tmp_path / "out" / "x", "old")
    target = claim(tmp_path / "out", folder=True, overwrite=True)
    with pytest.raises(OutputError, match="changed while this run was writing"):
        with publishing(target) as (tmp,):
            write(os.path.join(tmp, "x"), "ours")
            if change == "replaced":
                os.rename(tmp_path / "out", tmp_path / "gone")
                os.mkdir(tmp_path / "out")
            write(tmp_path / "out" / "y", "theirs")
    assert read(tmp_path / "out" / "y") == "theirs"
    assert listing(tmp_path) == (["gone", "out"] if change == "replaced" else ["out"])


def test_overwrite_replaces_what_it_saw(route, tmp_path):
    os.mkdir(tmp_path / "out")
    write(tmp_path / "out" / "x", "old")
    target = claim(tmp_path / "out", folder=True, overwrite=True)
    with publishing(target) as (tmp,):
        write(os.path.join(tmp, "y"), "ours")
    assert listing(tmp_path / "out") == ["y"] and listing(tmp_path) == ["out"]


def test_all_outputs_or_none(route, tmp_path):
    """The report cannot be published: the model folder published just before is taken back,
    and the old one it replaced is back in place, the very same folder."""
    os.mkdir(tmp_path / "model")
    write(tmp_path / "model" / "old", "old")
    before = os.stat(tmp_path / "model").st_ino
    model = claim(tmp_path / "model", folder=True, overwrite=True)
    fresh = claim(tmp_path / "fresh", folder=True)
    report = claim(tmp_path / "r.json", folder=False)
    with pytest.raises(OutputError, match="appeared"):
        with publishing(model, fresh, report) as (m, f, r):
            write(os.path.join(m, "new"), "new")
            write(r, "{}")
            write(tmp_path / "r.json", "theirs")
    assert listing(tmp_path) == ["model", "r.json"] and listing(tmp_path / "model") == ["old"]
    assert os.stat(tmp_path / "model").st_ino == before and read(tmp_path / "r.json") == "theirs"


def test_failure_inside_leaves_nothing_and_made_folders_go(route, tmp_path):
    target = claim(tmp_path / "a" / "b" / "out.json", folder=False)
    with pytest.raises(KeyboardInterrupt):
        with publishing(target) as (tmp,):
            write(tmp, "half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_a_signal_during_the_renames_undoes_them(route, tmp_path, monkeypatch):
    """SIGTERM arrives while the outputs are being published: it is held until the renames are
    done, then the run stops as for Ctrl-C and what was published is taken back."""
    real, renamed = publish.rename_noreplace, []

    def rename_and_signal(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)
        renamed.append(os.path.basename(dst))
        return real(src, dst)

    monkeypatch.setattr(publish, "rename_noreplace", rename_and_signal)
    with handled("test"), pytest.raises(Interrupted):
        with publishing(claim(tmp_path / "a", folder=True), claim(tmp_path / "b", folder=False)) as (a, b):
            write(b, "ours")
    assert renamed[:2] == ["a", "b"]      # both published before the signal was acted on, then taken back
    assert listing(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(route, tmp_path, umask):
    old = os.umask(umask)
    try:
        folder, file = claim(tmp_path / "f", folder=True), claim(tmp_path / "r.json", folder=False)
        with publishing(folder, file) as (f, r):
            write(os.path.join(f, "x"), "x")
            write(r, "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o666 & ~umask


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_debris_of_killed_runs_and_only_that_is_removed(tmp_path):
    dead, here = dead_pid(), publish.host_tag()
    debris = [f".out.tmp-{dead}-{here}-0123abcd", f".out.tmp-{dead}-{here}-89abcdef"]
    kept = [f".out.old-{dead}-{here}-0123abcd",       # may hold the replaced output, not checked yet
            f".other.tmp-{dead}-{here}-0123abcd",     # another target's
            f".out.tmp-{dead}-{here}-0123abcX",       # not our name pattern
            f".out.tmp-{dead}-0123abcd",              # nor this (no host)
            "out.tmp-1-{here}-0123abcd", "keep"]
    os.mkdir(tmp_path / debris[0])
    write(tmp_path / debris[0] / "model.safetensors", "half")
    for name in debris[1:] + kept:
        write(tmp_path / name, "x")
    an_input = tmp_path / f".out.tmp-{dead}-{here}-feedbeef"   # the name is ours, but it is an input of the run
    write(an_input, "x")
    with pytest.warns(TsvmergeWarning, match="left by a run that was killed") as warned:
        claim(tmp_path / "out", folder=True, inputs=publish.input_paths([str(an_input)]))
    assert len(warned) == 2
    assert listing(tmp_path) == sorted(kept + [an_input.name])


@pytest.mark.parametrize("host", ["here", "elsewhere"])
def test_a_target_another_run_writes_now_is_refused(tmp_path, host):
    """A temporary of a live process here, or of any process on another host (a shared file
    system: its PID cannot be checked), is a run writing that output: the target is refused,
    with or without overwrite, and the temporary kept."""
    alive, here = os.getppid(), publish.host_tag()
    name = f".out.tmp-{alive}-{here}-0123abcd" if host == "here" else f".out.tmp-{dead_pid()}-node7.x-0123abcd"
    os.mkdir(tmp_path / name)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="another run is writing it now") as e:
            claim(tmp_path / "out", folder=True, overwrite=overwrite)
        assert ("on host node7.x" in str(e.value) and name in str(e.value)) == (host == "elsewhere")
    assert listing(tmp_path) == [name]
    claim(tmp_path / "other", folder=True)          # other targets beside it are free


def test_inputs_are_refused_however_named(tmp_path):
    os.mkdir(tmp_path / "in")
    write(tmp_path / "in" / "m.safetensors", "x")
    os.symlink(tmp_path / "in", tmp_path / "link")
    os.link(tmp_path / "in" / "m.safetensors", tmp_path / "hard")
    inputs = publish.input_paths([str(tmp_path / "link")])
    for path, why in ((tmp_path / "in", "is an input"), (tmp_path / "link" / "m.safetensors", "is an input"),
                      (tmp_path / "hard", "is an input"), (tmp_path, "contains the input"),
                      (tmp_path / "in" / "sub" / "out", "lies inside the input folder")):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=why):
                claim(path, folder=True, overwrite=overwrite, inputs=inputs)
