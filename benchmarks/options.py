"""How a benchmark declares itself to the command line (``benchmarks/cli.py``).

A benchmark module defines an options dataclass whose fields are its function's settings; a field
made with :func:`option` is also a flag of the benchmark's sub-command (its help text, parser,
repeatability), a plain field is for library callers only. The module then exports one
:class:`Benchmark`: name, one-line help, the function ``run(cfg, options) -> dict``, its options
class and the flags of its ``all --smoke`` size. The CLI is generated from those, so a flag is
declared once, next to what it sets.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from must_ray.config import Config
from must_ray.typed_config import ConfigError


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def checked_by(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse type: the text itself, once ``parse`` accepts it (its ConfigError is the message)."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


def option(default: Any, flag: str, help: str, *, type: Optional[Callable[[str], Any]] = None,
           repeat: bool = False, metavar: Optional[str] = None, switch: bool = False) -> Any:
    """A dataclass field that is also the flag ``flag`` of its benchmark's sub-command.
    ``repeat``: the flag may be given several times (a list; ``default`` must then be None);
    ``switch``: a flag without a value that sets True."""
    return field(default=default, metadata={"flag": flag, "help": help, "type": type, "repeat": repeat,
                                            "metavar": metavar, "switch": switch})


def workdir_option() -> Any:
    """The ``--workdir`` flag every benchmark that writes files has."""
    return option(None, "--workdir", "keep inputs and outputs here (default: a temp dir, removed)")


def add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """One flag per :func:`option` field of dataclass ``options`` (defaults left to the dataclass)."""
    for f in dataclasses.fields(options):
        meta = f.metadata
        if "flag" not in meta:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"]}
        if meta["switch"]:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = meta["metavar"] or meta["flag"].lstrip("-").replace("-", "_").upper()
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            if meta["repeat"]:
                kwargs["action"] = "append"
        parser.add_argument(meta["flag"], **kwargs)


def options_from(args: argparse.Namespace, options: type) -> Any:
    """The ``options`` dataclass from parsed flags (fields whose flag was not given keep their default)."""
    return options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options) if hasattr(args, f.name)})


@dataclass(frozen=True)
class Benchmark:
    """One benchmark as the CLI sees it."""

    name: str
    help: str
    run: Callable[[Config, Any], dict[str, Any]]
    options: type
    smoke: tuple[str, ...] = ()  # its flags in ``all --smoke`` (a correctness run, not a measurement)
    description: Optional[str] = None  # the sub-command's --help text
    needs_ray: bool = True


__all__ = ["Benchmark", "option", "workdir_option", "add_options", "options_from", "at_least", "positive_float",
           "checked_by"]
