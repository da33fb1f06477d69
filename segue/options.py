"""One definition per option: a component's frozen config dataclass generates its CLI flags,
reads them back, and renders the argv that `segue serve` passes to the process it starts.

Fields are declared with `option(...)`; a field whose type is itself a config dataclass is a
group whose flags carry its `prefix` (`--mocker-step-ms` for `MockerConfig.step_ms`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    hidden: bool = False,
    required: bool = False,
    prefix: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A config field that is also a command-line flag."""
    md = {
        "help": help,
        "choices": choices,
        "flag": flag,
        "hidden": hidden,
        "required": required,
        "prefix": prefix,
        "aliases": aliases,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


@dataclasses.dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]  # attribute path from the top config (nested groups)
    dest: str  # argparse dest, unique across groups
    flag: str
    type: Any  # the scalar type (int, float, str or a StrEnum)
    default: Any
    help: str
    choices: tuple[str, ...] | None
    hidden: bool
    required: bool
    aliases: tuple[str, ...] = ()


def _scalar(tp: Any) -> Any:
    """`int | None` -> int; other types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flags(cls: type, prefix: str = "", path: tuple[str, ...] = ()) -> Iterator[Flag]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md:
            continue  # not an option
        tp = _scalar(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub = md["prefix"] if md["prefix"] is not None else f.name
            yield from flags(
                typing.cast(type, tp), f"{prefix}{sub}_" if sub else prefix, (*path, f.name)
            )
            continue
        dest = prefix + f.name
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = md["choices"]
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            choices = tuple(m.value for m in tp)
        yield Flag(
            (*path, f.name),
            dest,
            md["flag"] or "--" + dest.replace("_", "-"),
            tp,
            default,
            md["help"],
            choices,
            md["hidden"],
            md["required"],
            md["aliases"],
        )


def _bool(text: str) -> bool:
    """A boolean flag's value: `--flag true` / `--flag false` (so to_argv can write both)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    try:
        return value[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}") from None


def add_flags(
    parser: argparse.ArgumentParser, cls: type, skip: frozenset[str] = frozenset()
) -> None:
    """Adds a flag per option of `cls`, except the dests in `skip` or already present."""
    have = {a.dest for a in parser._actions}
    for fl in flags(cls):
        if fl.dest in skip or fl.dest in have:
            continue
        parser.add_argument(
            fl.flag,
            *fl.aliases,
            dest=fl.dest,
            type=str if fl.choices else _bool if fl.type is bool else fl.type,
            default=None if fl.required else fl.default,
            choices=fl.choices,
            required=fl.required,
            help=argparse.SUPPRESS if fl.hidden else fl.help or None,
        )


def from_args(
    cls: type[T], args: argparse.Namespace, skip: frozenset[str] = frozenset(), **overrides: Any
) -> T:
    """Builds `cls` from parsed flags (a flag the parser did not define, or a dest in `skip`,
    keeps its default); `overrides` replace top-level fields."""
    return _build(
        cls,
        argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in skip}),
        "",
        overrides,
    )


def _build(cls: Any, args: argparse.Namespace, prefix: str, overrides: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
            continue
        if "help" not in f.metadata:
            continue
        tp = _scalar(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub = f.metadata["prefix"] if f.metadata["prefix"] is not None else f.name
            kwargs[f.name] = _build(tp, args, f"{prefix}{sub}_" if sub else prefix, {})
            continue
        value = getattr(args, prefix + f.name, None)
        if value is None:
            continue  # keep the default
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            value = tp(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def to_argv(cfg: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    """The flags that reproduce `cfg` (only values that differ from their defaults)."""
    argv: list[str] = []
    for fl in flags(type(cfg)):
        if fl.dest in skip:
            continue
        value: Any = cfg
        for name in fl.path:
            value = getattr(value, name)
        if value is None or (value == fl.default and not fl.required):
            continue
        argv += [fl.flag, str(value.value if isinstance(value, enum.Enum) else value)]
    return argv
