"""Experiment configs as code: a study is a frozen dataclass, and its command line is generated.

A study's config module in `experiments/configs/` defines `get_config(arg: str = "")`, returning
one frozen dataclass instance: every setting of the run, in one place. `arg` picks a named
variant (comma-separated words, e.g. `"full,L2"`; each config module documents its words), in
the style of big_vision's and score_sde's `configs/`. `parse_config` builds the command line
from the dataclass's fields, so no flag list is kept by hand: `--config ARG` picks the variant,
and `--field-name VALUE` overrides one field (its `--help` shows the variant's value).

A field is part of the run's identity unless its metadata says `identity=False` (e.g. the
workdir, progress bars, the process layout): `identity(config)` is what is stored as the run's
`run_config.json` and hashed into its workdir name (`run_dir`), so a rerun with the same
identity resumes and one with another identity gets another directory.

Field metadata (see `field`): `help`, `choices`, `parse` (a str -> value function for the
command line), `identity` (default True), `cli` (default True; False for fields only a config
sets). A field holding a library dataclass (e.g. `ClassifierTraining`) is flattened: each of its
fields is a flag of its own name, so the library's settings are never restated here.
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import functools
import hashlib
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_ENV = "DIFFPURE_DEBUG"  # set to 1 for tracebacks instead of one-line refusals


class UsageError(Exception):
    """A bad setting or a missing input, found before any work: the CLI prints `error: ...`
    and exits with code 2 (`cli_main`)."""


def cli_main(main: Callable) -> Callable:
    """Wrap an entry point's `main(argv=None, ...)`: a `UsageError` becomes `error: ...` on
    stderr and exit code 2, without a traceback (unless DIFFPURE_DEBUG=1)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are two lines (the message and where the flags are)
    instead of the generated usage of every flag."""

    def error(self, message):
        self.exit(2, f"error: {message}\n(`{self.prog} --help` lists every flag)\n")


def field(
    default: Any,
    *,
    help: str | None = None,
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    identity: bool | str = True,
    cli: bool = True,
) -> Any:
    """A config dataclass field with its command-line metadata.

    identity: True (the field changes results: it is part of the run's identity), False (it
    does not: workdir, progress, ...), or "changed" (part of the identity only when it differs
    from its default: a field added later leaves the identity, and so the run directory, of
    the runs that do not use it unchanged).
    """
    metadata = {"help": help, "choices": choices, "parse": parse, "identity": identity, "cli": cli}
    return dataclasses.field(default=default, metadata=metadata)


def config_words(arg: str, allowed: Sequence[str]) -> list[str]:
    """The words of a `--config` argument ("full,L2" -> ["full", "L2"]), each one of `allowed`."""
    words = [w for w in arg.split(",") if w]
    unknown = [w for w in words if w not in allowed]
    if unknown:
        raise UsageError(f"unknown config word(s) {unknown}; use {list(allowed)}")
    return words


def parse_fraction(text: str) -> float:
    """'8/255' or '0.0314' -> float."""
    try:
        return float(fractions.Fraction(text))
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(
            f"expected a number or a fraction like 8/255, got {text!r}"
        ) from e


def identity(config: Any) -> dict:
    """The fields that change results, as JSON values: the run's stored config and hash. A
    field holding a dataclass (e.g. a library's training config) is stored as a dict of it."""
    out = {}
    for f in dataclasses.fields(config):
        mode = f.metadata.get("identity", True)
        if mode == "changed" and getattr(config, f.name) == f.default:
            continue
        if mode:
            value = getattr(config, f.name)
            if dataclasses.is_dataclass(value):
                value = identity(value)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def digest(description: dict) -> str:
    """10 hex digits of the SHA-256 of a JSON description (sorted keys)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:10]


def run_dir(root: str, name: str, config: Any) -> str:
    """`root/name-<hash of the config's identity>`: one directory per distinct run."""
    return os.path.join(root, f"{name}-{digest(identity(config))}")


def _base_type(annotation) -> tuple[type, bool, bool]:
    """(element type, optional, is a tuple) of a field annotation."""
    optional, sequence = False, False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        optional = type(None) in args
        (annotation,) = [a for a in args if a is not type(None)]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        sequence = True
        annotation = args[0]
    return annotation, optional, sequence


def _converter(base: type, optional: bool, parse: Callable | None) -> Callable[[str], Any]:
    convert = parse or base

    def to_value(text: str):
        if optional and text.lower() == "none":
            return None
        return convert(text)

    to_value.__name__ = getattr(convert, "__name__", "value")  # argparse names it in errors
    return to_value


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _leaves(config: Any, path: tuple[str, ...] = ()):
    """(path, field, type hint) of every command-line field; a field holding a dataclass is
    flattened into its own fields (their flags carry no prefix: names must not collide)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if not f.metadata.get("cli", True):
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, (*path, f.name))
        else:
            yield (*path, f.name), f, hints[f.name]


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _replace(config: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    """`config` with the leaves at the given paths replaced (nested dataclasses rebuilt)."""
    top = {p[0]: v for p, v in changes.items() if len(p) == 1}
    for name in {p[0] for p in changes if len(p) > 1}:
        inner = {p[1:]: v for p, v in changes.items() if len(p) > 1 and p[0] == name}
        top[name] = _replace(getattr(config, name), inner)
    return dataclasses.replace(config, **top)


def add_flags(parser: argparse.ArgumentParser, config: Any) -> None:
    """One flag per command-line field of the dataclass instance `config`, defaulting to it."""
    seen = set()
    for path, f, hint in _leaves(config):
        if f.name in seen:
            raise ValueError(f"two config fields are named {f.name!r}: flags must be unique")
        seen.add(f.name)
        base, optional, sequence = _base_type(hint)
        default = _get(config, path)
        flag = "--" + f.name.replace("_", "-")
        text = (f.metadata.get("help") or "") + f" (default: {_show(default)})"
        kwargs = {"default": default, "help": text.strip(), "dest": ".".join(path)}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = _converter(base, optional, f.metadata.get("parse"))
        kwargs["metavar"] = f.name.upper()  # not the dest: a nested field's is "outer.name"
        if f.metadata.get("choices") is not None:
            kwargs["choices"] = list(f.metadata["choices"]) + ([None] if optional else [])
            kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        if sequence:
            kwargs["nargs"] = "+"
        parser.add_argument(flag, **kwargs)


def parse_config(
    module: Any,
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    arg_flags: Sequence[str] = (),
) -> Any:
    """The config of a command line: `module.get_config(--config)`, then every field's flag.

    arg_flags: fields whose flag also selects the config variant (e.g. `norm`: `--norm L2`
    adds the word `L2` to `--config`, so eps and t* take the L2 variant's values).
    """
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default="")
    for name in arg_flags:
        pre.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    known, _ = pre.parse_known_args(argv)
    words = [w for w in known.config.split(",") if w]
    words += [getattr(known, name) for name in arg_flags if getattr(known, name) is not None]
    parser = _Parser(prog=prog, description=description)
    try:
        config = module.get_config(",".join(words))
    except UsageError as e:
        parser.error(str(e))
    parser.add_argument(
        "--config",
        default=known.config,
        help=f"the config variant, comma-separated words: {module.get_config.__doc__.strip()}",
    )
    add_flags(parser, config)
    args = vars(parser.parse_args(argv))
    changes = {}
    for path, _, _ in _leaves(config):
        value = args[".".join(path)]
        value = tuple(value) if isinstance(value, list) else value
        if value != _get(config, path):
            changes[path] = value
    try:
        return _replace(config, changes)
    except (ValueError, UsageError) as e:
        parser.error(str(e))
