"""Publishing outputs so that nothing is clobbered (DESIGN.md section 7).

`claim` checks an output path when a run starts: refused if it is, contains or lies inside an
input; refused if something is there and overwrite was not asked (an empty folder excepted);
otherwise what is there is remembered (device, inode, mtime). `publishing` writes a run's
outputs under `.NAME.tmp-PID-HOST-RANDOM` beside their targets and publishes them at the end, all
or none:
- a new output by a rename that cannot replace: renameat2(RENAME_NOREPLACE) on Linux (glibc
  >= 2.28, through ctypes); where it is missing, `os.link` for a file and, for a folder, an
  `os.mkdir` that claims the name followed by a rename, which can replace only that empty
  folder;
- over an old output (overwrite): exchanged with it (RENAME_EXCHANGE, or three renames where
  that is missing), then what came back is checked against what was seen at the start and
  swapped back if it is anything else. Meanwhile it is named `.NAME.old-PID-HOST-RANDOM`, which no
  later run removes, since until checked it may be someone else's.
Umask applies (folders 0777, files 0666 before it). A temporary of this host whose PID is dead
is debris of a killed run; the next run on the same target removes it. A temporary of a live
process, or of another host (a shared file system), is a run writing that output now: `claim`
refuses the target while it is there.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass, field

from ..warn import warn
from ..signals import deferred

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_NAME_KEEP = 200        # of the target's name in a temporary's (a file name has 255 bytes at most)
_HOST_KEEP = 24


def host_tag() -> str:
    """This machine's name as temporaries carry it: letters, digits and dots, at most 24."""
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:_HOST_KEEP] or "host"


class OutputError(Exception):
    """An output that cannot be written as asked. Nothing was written."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):       # not glibc >= 2.28 (musl, macOS, older glibc)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def renameat2(src: str, dst: str, flags: int) -> None:
    """The Linux system call; OSError with ENOSYS where libc lacks it, EINVAL where the file
    system does not take the flag."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", src, None, dst)
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


def rename_noreplace(src: str, dst: str) -> None:
    """Move `src` to `dst`; FileExistsError if anything is at `dst`, which is never replaced."""
    try:
        return renameat2(src, dst, RENAME_NOREPLACE)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    if os.path.isdir(src) and not os.path.islink(src):
        os.mkdir(dst)                   # FileExistsError if taken; else the name is ours
        try:
            os.rename(src, dst)         # replaces our empty folder; one someone filled meanwhile stops it
        except OSError as e:
            raise FileExistsError(errno.EEXIST, f"filled by another process: {e.strerror}", dst) from None
    else:
        os.link(src, dst)               # FileExistsError if taken
        os.unlink(src)


def exchange(a: str, b: str) -> None:
    """Swap the objects at `a` and `b` (both must exist)."""
    try:
        return renameat2(a, b, RENAME_EXCHANGE)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    between = f"{a}-x"
    os.rename(b, between)               # a fresh name: replaces nothing
    try:
        rename_noreplace(a, b)
    except FileExistsError:
        raise OutputError(b, f"another process wrote here while this run replaced it: what was here is kept at "
                             f"{between}") from None
    os.rename(between, a)


def _identity(path: str) -> tuple:
    st = os.lstat(path)
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True                     # not a name we made: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True                     # EPERM: alive, someone else's
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both absolute and normalised)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def input_paths(sources) -> list[str]:
    """Real paths of the inputs given as paths (or checkpoints read from files), with the
    entries directly inside input folders: a Hugging Face folder's shards are often links
    to files elsewhere."""
    out = []
    for src in sources:
        src = getattr(src, "source", src)
        if not isinstance(src, (str, bytes, os.PathLike)) or not os.path.exists(src):
            continue
        real = os.path.realpath(src)
        out.append(real)
        if os.path.isdir(real):
            with contextlib.suppress(OSError), os.scandir(real) as entries:
                out += [os.path.realpath(e.path) for e in entries]
    return out


def _refuse_inputs(path: str, inputs: list[str]) -> None:
    real = os.path.realpath(path)
    why = None
    if real in inputs or _same_file(path, inputs):
        why = "is an input of this run"
    else:
        for p in inputs:
            if _within(p, real):
                why = f"contains the input {p}"
            elif _within(real, p):
                why = f"lies inside the input folder {p}"
            if why:
                break
    if why:
        raise OutputError(path, f"{why}: tsvmerge never writes over its inputs (choose another output path)")


def _same_file(path: str, inputs: list[str]) -> bool:
    """`path` is one of `inputs` by another name (a hard link)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    for p in inputs:
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.stat(p)):
                return True
    return False


@dataclass
class Output:
    """One output of a run, from `claim` to `publishing`'s end."""
    path: str                   # absolute; a link here is replaced itself, not what it points to
    folder: bool
    seen: tuple | None          # (device, inode, mtime) of what was here when the run started
    tmp: str | None = None
    aside: str | None = None    # what was replaced, until it is removed
    mine: tuple | None = None   # identity of what this run published
    made: list = field(default_factory=list)   # parent folders this run created

    def _sibling(self, kind: str) -> str:
        parent, name = os.path.split(self.path)
        return os.path.join(parent, f".{name[:_NAME_KEEP]}.{kind}-{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}")

    def remove_debris(self, inputs=()) -> list[tuple[str, str, str]]:
        """Remove temporaries of this target whose process is gone (killed runs); only ours:
        the name pattern, this host, a PID that is not alive, and not an input of this run.
        Returns the others, (path, process, host): runs writing this target now."""
        parent, name = os.path.split(self.path)
        ours = re.compile(rf"\.{re.escape(name[:_NAME_KEEP])}\.tmp-(\d+)-([A-Za-z0-9.]+)-[0-9a-f]{{8}}")
        try:
            entries = os.listdir(parent)
        except OSError:
            return []
        running = []
        for entry in entries:
            m = ours.fullmatch(entry)
            path = os.path.join(parent, entry)
            if not m or os.path.realpath(path) in inputs:
                continue
            if m.group(2) != host_tag() or _alive(int(m.group(1))):
                running.append((path, m.group(1), m.group(2)))
                continue
            with contextlib.suppress(FileNotFoundError):
                _remove(path)
            warn(f"removed {path}, left by a run that was killed (process {m.group(1)})")
        return running

    def begin(self) -> None:
        for parent in _missing_parents(os.path.dirname(self.path)):
            os.mkdir(parent, 0o777)
            self.made.append(parent)
        self.tmp = self._sibling("tmp")
        if self.folder:
            os.mkdir(self.tmp, 0o777)
        else:
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))

    def publish(self) -> None:
        if self.seen is None or not os.path.lexists(self.path):
            try:
                rename_noreplace(self.tmp, self.path)
            except FileExistsError:
                raise OutputError(self.path, "appeared while this run was writing (another tsvmerge run?): it was "
                                             "left as it is and nothing was written") from None
        else:
            self.aside = self._sibling("old")
            os.rename(self.tmp, self.aside)
            try:
                exchange(self.aside, self.path)
            except BaseException:
                os.rename(self.aside, self.tmp)
                self.aside = None
                raise
            if _identity(self.aside) != self.seen:
                exchange(self.aside, self.path)
                os.rename(self.aside, self.tmp)
                self.aside = None
                raise OutputError(self.path, "changed while this run was writing (another tsvmerge run?): it was "
                                             "left as it is and nothing was written")
        self.mine = _identity(self.path)

    def unpublish(self) -> None:
        """Undo `publish` (a later output of the run failed)."""
        if self.mine is None or _identity(self.path) != self.mine:
            return
        if self.aside:
            exchange(self.aside, self.path)
            os.rename(self.aside, self.tmp)
            self.aside = None
        else:
            rename_noreplace(self.path, self.tmp)
        self.mine = None

    def finish(self) -> None:
        """Remove what was replaced, under a temporary's name: if this run is killed meanwhile,
        the next one finishes the job."""
        if self.aside:
            doomed = self._sibling("tmp")
            os.rename(self.aside, doomed)
            self.aside = None
            _remove(doomed)

    def discard(self) -> None:
        if self.tmp and os.path.lexists(self.tmp):
            _remove(self.tmp)
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.made = []

    def owns(self, filename) -> bool:
        """`filename` (of an OSError) is this output's: a temporary of this run (or a file in
        one), or the path or a parent folder being made."""
        if filename is None:
            return False
        f = os.path.abspath(os.fsdecode(filename))
        parent, name = os.path.split(self.path)
        here = rf"{os.getpid()}-{re.escape(host_tag())}"
        ours = re.compile(rf"\.{re.escape(name[:_NAME_KEEP])}\.(tmp|old)-{here}-[0-9a-f]{{8}}")
        inside = os.path.relpath(f, parent).split(os.sep)[0] if _within(f, parent) else ""
        return bool(ours.fullmatch(inside)) or _within(self.path, f)


def _missing_parents(folder: str) -> list[str]:
    """`folder` and its parents that do not exist, outermost first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing[::-1]


def claim(path, *, folder: bool, overwrite: bool = False, inputs=()) -> Output:
    """Check an output path when a run starts (see the module's doc), remove debris of killed
    runs on it, and refuse it while another run writes it."""
    path = os.path.abspath(os.fspath(path))
    if path == os.path.dirname(path):
        raise OutputError(path, "is the root folder: choose an output path")
    inputs = list(inputs)
    _refuse_inputs(path, inputs)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(path, f"cannot use this path: {e.strerror}") from None
    seen = None
    if st is not None:
        is_folder = os.path.isdir(path)
        if os.path.exists(path) and is_folder != folder:     # a dangling link is neither
            have, want = ("a folder", "a file") if is_folder else ("a file", "a folder")
            raise OutputError(path, f"is {have}, and the output is {want}: choose another path")
        empty_folder = folder and not os.path.islink(path) and not os.listdir(path)
        if not (overwrite or empty_folder):
            raise OutputError(path, "already exists: pass --overwrite to replace it, or choose another path")
        seen = (st.st_dev, st.st_ino, st.st_mtime_ns)
    out = Output(path, folder, seen)
    for tmp, pid, host in out.remove_debris(inputs):
        here = host == host_tag()
        raise OutputError(path, f"another run is writing it now (process {pid}{'' if here else ' on host ' + host}): "
                          "wait for it to finish, or choose another path"
                          + ("" if here else f"; if no run is going on there, remove {tmp}"))
    return out


def _write_error(e: OSError, outputs: list[Output]) -> BaseException:
    """A failed write (disk full, read-only, permission, file size limit) as one line that
    names the output; any other error as it is."""
    where = next((o for o in outputs if o.owns(e.filename) or o.owns(e.filename2)), None)
    if where is None:
        return e
    hint = " (the file size limit, ulimit -f: a smaller --shard-size fits under it)" if e.errno == errno.EFBIG else ""
    return OutputError(where.path, f"cannot write: {e.strerror or e}{hint}; nothing was written")


def _cleanup(step, output: Output) -> None:
    """A cleanup step that must not hide the error that made it necessary."""
    try:
        step()
    except (OSError, OutputError) as e:
        warn(f"{output.path}: could not clean up after the failed run ({getattr(e, 'strerror', None) or e}): "
             f"check {output.tmp or output.path}")


@contextlib.contextmanager
def publishing(*outputs: Output | None):
    """Temporary paths for `outputs` (None stays None), to write into; when the block succeeds
    all are published, else none is and every temporary is removed."""
    outs = [o for o in outputs if o is not None]
    published = []
    try:
        for o in outs:
            o.begin()
        yield tuple(None if o is None else o.tmp for o in outputs)
        with deferred():
            for o in outs:
                o.publish()
                published.append(o)
    except BaseException as e:
        for o in reversed(published):
            _cleanup(o.unpublish, o)
        for o in outs:
            _cleanup(o.discard, o)
        if isinstance(e, OSError):
            raise _write_error(e, outs) from None
        raise
    try:
        with deferred():
            for o in outs:
                _finish(o)
    except KeyboardInterrupt as e:
        e.published = True
        raise


def _finish(output: Output) -> None:
    try:
        output.finish()
    except OSError as e:
        warn(f"{output.path} is published, but what it replaced could not be removed ({e.strerror or e}): "
             f"remove {e.filename} yourself")


@contextlib.contextmanager
def naming(path: str):
    """OSErrors raised inside carry `path` (a write through a descriptor names no file)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, path) from None
        raise
