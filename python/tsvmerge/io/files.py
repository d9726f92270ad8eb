"""Opening input files safely and parsing their JSON strictly.

Inputs come from people's disks and downloads: a FIFO would block a reader forever, a
device never ends, and JSON may repeat keys or nest deeply enough to crash Python's parser.
"""
from __future__ import annotations

import json
import os
import re
import stat

from .errors import InputError

MAX_JSON_BYTES = 100_000_000        # the safetensors package's header limit; index files too
MAX_JSON_DEPTH = 16                 # the formats need 3; Python's parser recurses per level

_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
_NOT_QUOTE_OR_BRACKET = bytes(b for b in range(256) if b not in b'"[]{}')
_MINUS_ZERO = re.compile(rb"-0(?![0-9.eE])")            # may also match inside strings: then only slower
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS.items() if test(mode)), "not a plain file")
        raise InputError(path, None, f"is {kind}, not a regular file")


def open_regular(path: str):
    """Open a regular file for reading (a buffered binary file); anything else is an InputError.

    Checked with stat before the open, and again on the descriptor: O_NONBLOCK keeps the open
    itself from blocking if a FIFO is swapped in between (on a regular file it changes nothing).
    """
    try:
        _check_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(path, None, "no such file") from None
    except OSError as e:
        raise InputError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def nesting_depth_ok(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when JSON text nests at most about `limit` levels (at most 2*limit), without parsing it.

    Escaped backslashes, then escaped quotes, are dropped (left to right, as JSON reads them),
    then every byte but quotes and brackets; what lies between quote pairs was inside strings.
    Each round then removes every innermost bracket pair: depth d is empty after d rounds.
    Unbalanced brackets also answer False.
    """
    kept = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_QUOTE_OR_BRACKET)
    brackets = b"".join(kept.split(b'"')[::2])
    for _ in range(limit):
        if not brackets:
            return True
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return not brackets


class _Refused(Exception):
    pass


def _strict_object(pairs: list) -> dict:
    """A JSON object whose keys are all different."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"repeats the key '{key}': duplicate keys are ambiguous")
            seen.add(key)
    return out


def _int(text: str):
    """JSON integers, but "-0" is the float -0.0 as in serde_json (the safetensors package)."""
    return -0.0 if text == "-0" else int(text)


def parse_json(raw: bytes, source: str, what: str):
    """Parse UTF-8 JSON as the safetensors package does: no duplicate keys at any level, no
    lone surrogate escapes (\\ud800), bounded nesting (checked first: Python's parser recurses).

    NaN, Infinity and -0 parse to floats, which no field of ours accepts, so the caller's type
    checks refuse them with the tensor's name. The costly checks run only where a cheap scan
    of the bytes says they can matter.
    """
    if not nesting_depth_ok(raw):
        raise InputError(source, None, f"{what} is not valid JSON: it nests deeper than {MAX_JSON_DEPTH} levels "
                                       "or its brackets do not balance")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_strict_object,
                         parse_int=_int if _MINUS_ZERO.search(raw) else None)
        if _SURROGATE.search(raw):
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj
    except _Refused as e:
        raise InputError(source, None, f"{what} JSON {e}") from None
    except UnicodeEncodeError:
        raise InputError(source, None, f"{what} JSON has a string with a lone surrogate escape: not valid "
                                       "Unicode") from None
    except UnicodeDecodeError:
        raise InputError(source, None, f"{what} is not valid UTF-8: corrupted file") from None
    except ValueError as e:
        raise InputError(source, None, f"{what} is not valid JSON ({e}): corrupted file") from None
