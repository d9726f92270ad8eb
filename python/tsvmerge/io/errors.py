"""Errors a user can act on: each names the file and, where known, the tensor."""
from __future__ import annotations


class InputError(ValueError):
    """A bad input found while planning, before any compute or output."""

    def __init__(self, source: str | None, tensor: str | None, problem: str):
        self.source, self.tensor, self.problem = source, tensor, problem
        where = " ".join(p for p in (f"{source}:" if source else "", f"tensor '{tensor}':" if tensor else "") if p)
        super().__init__(f"{where} {problem}".strip())
