"""Options, declared once where they belong (a method, a backend) and derived everywhere else.

A method or backend lists its `Option`s; `merge()` checks what it is given against them
(unknown names raise, values are parsed and checked), and the command line builds its flags
from the same list, so a new option needs one line.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]     # raises ValueError or TypeError on a bad value
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, given: Any) -> Any:
        try:
            value = self.parse(given)
        except (TypeError, ValueError) as e:
            raise ValueError(f"option {self.name}={given!r}: {e}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"option {self.name}={given!r}: choose one of {', '.join(map(str, self.choices))}")
        return value


# -- value parsers: each takes what Python callers and the command line pass -------------------
def positive_int(x) -> int:
    if isinstance(x, bool) or float(x) != int(float(x)) or int(float(x)) < 1:
        raise ValueError("expected a whole number >= 1")
    return int(float(x))


def non_negative_int(x) -> int:
    if isinstance(x, bool) or float(x) != int(float(x)) or int(float(x)) < 0:
        raise ValueError("expected a whole number >= 0")
    return int(float(x))


def fraction(x) -> float:
    """A number in (0, 1]."""
    value = float(x)
    if not 0.0 < value <= 1.0:
        raise ValueError("expected a number in (0, 1]")
    return value


def finite_float(x) -> float:
    value = float(x)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def boolean(x) -> bool:
    if isinstance(x, bool):
        return x
    text = str(x).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def text(x) -> str:
    if not isinstance(x, str):
        raise TypeError(f"expected a string, got {type(x).__name__}")
    return x


def optional(parse: Callable) -> Callable:
    """None (or 'none' on the command line) stands for 'not set'."""
    def parse_optional(x):
        return None if x is None or (isinstance(x, str) and x.strip().lower() == "none") else parse(x)
    return parse_optional


def checked(name: str, parse: Callable, value):
    """`value` parsed by `parse`, or a ValueError that names the argument (for arguments that
    are not a method's or a backend's option: alpha, shard_size)."""
    return Option(name, parse, None, "").value(value)


def resolve(declared: tuple[Option, ...], given: dict, owner: str) -> dict:
    """Every declared option's value: given ones parsed and checked, the rest at their defaults."""
    names = {o.name for o in declared}
    unknown = sorted(set(given) - names)
    if unknown:
        takes = ", ".join(sorted(names)) or "none"
        raise TypeError(f"{owner} got unknown option(s) {', '.join(unknown)}; it takes: {takes}")
    return {o.name: o.value(given[o.name]) if o.name in given else o.default for o in declared}


def split(given: dict, *groups: tuple[Option, ...]) -> list[dict]:
    """Share `given` out between groups of declared options (the first group that declares a
    name takes it); what none declares is left in a last dict."""
    rest = dict(given)
    out = []
    for group in groups:
        names = {o.name for o in group}
        out.append({k: rest.pop(k) for k in list(rest) if k in names})
    return out + [rest]


def add_flags(parser: argparse.ArgumentParser, options, owners: dict[str, str]) -> None:
    """One flag per option; the value stays None unless given, so the declaration's default
    (or an error for an option the chosen method or backend does not take) applies."""
    for o in options:
        text = f"{owners[o.name]}: {o.help}" + ("" if o.default is None else f" (default {o.default})")
        if o.parse is boolean:
            parser.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(o.flag, default=None, choices=o.choices, help=text,
                                metavar=None if o.choices else o.name.upper())


def given_flags(args: argparse.Namespace, options) -> dict:
    return {o.name: getattr(args, o.name) for o in options if getattr(args, o.name, None) is not None}
