"""Warnings: things a user should know about a run that still runs. The command line prints
each as one line on stderr; a merge's report lists them too."""
from __future__ import annotations

import warnings


class TsvmergeWarning(UserWarning):
    pass


def warn(message: str) -> None:
    warnings.warn(message, TsvmergeWarning, stacklevel=3)
