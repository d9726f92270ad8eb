"""Errors a user can act on: each names the file and, where known, the tensor."""
from __future__ import annotations

_MAX_NAME = 200


def _printable(text: str, limit: int | None = None) -> str:
    """One line, no control characters (names come from untrusted headers), at most `limit` chars."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


class InputError(ValueError):
    """A bad input found while planning, before any compute or output."""

    def __init__(self, source: str | None, tensor: str | None, problem: str):
        self.source, self.tensor, self.problem = source, tensor, problem
        where = " ".join(p for p in (f"{_printable(source)}:" if source else "",
                                     f"tensor '{_printable(tensor, _MAX_NAME)}':" if tensor is not None else "") if p)
        super().__init__(f"{where} {_printable(problem, 4 * _MAX_NAME)}".strip())
