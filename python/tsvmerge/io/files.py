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
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def _check_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS.items() if test(mode)), "not a plain file")
        raise InputError(path, None, f"is {kind}, not a regular file")


def open_regular(path: str):
    """Open a regular file for reading (a buffered binary file); anything else is an InputError.

    Checked with stat before the open, and again on the descriptor: O_NONBLOCK keeps the open
    itself from blocking if a FIFO is swapped in between.
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
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def nesting_depth_ok(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when JSON text nests at most about `limit` levels (at most 2*limit), without parsing it.

    Strings are dropped, then each round removes every innermost pair of brackets; text of
    depth d is empty after d rounds. Unbalanced brackets also answer False.
    """
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return True
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return not brackets


class _Refused(Exception):
    pass


def _strict_object(pairs: list) -> dict:
    """A JSON object with no repeated key and no string that is not valid Unicode (a lone
    surrogate escape like \\ud800, which Python accepts and the safetensors package refuses)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"repeats the key '{key}': duplicate keys are ambiguous")
            seen.add(key)
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Refused(f"has a string that is not valid Unicode ('{text}')") from None
    return out


def _int(text: str):
    """JSON integers, but "-0" is the float -0.0 as in serde_json (the safetensors package)."""
    return -0.0 if text == "-0" else int(text)


def parse_json(raw: bytes, source: str, what: str):
    """Parse UTF-8 JSON with no duplicate keys at any level and bounded nesting.

    NaN, Infinity and -0 parse to floats, which no field of ours accepts, so the caller's type
    checks refuse them with the tensor's name.
    """
    if not nesting_depth_ok(raw):
        raise InputError(source, None, f"{what} is not valid JSON: it nests deeper than {MAX_JSON_DEPTH} levels "
                                       "or its brackets do not balance")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_strict_object, parse_int=_int)
    except _Refused as e:
        raise InputError(source, None, f"{what} JSON {e}") from None
    except UnicodeDecodeError:
        raise InputError(source, None, f"{what} is not valid UTF-8: corrupted file") from None
    except ValueError as e:
        raise InputError(source, None, f"{what} is not valid JSON ({e}): corrupted file") from None
