"""Command-line options generated from the library's dataclass configs, so flags, help and defaults have one source.

`add_dataclass_args(parser, SALRConfig)` adds one flag per field (its `metadata["help"]`, its default) and
`dataclass_from_args(args, SALRConfig)` builds the config back; a flag left unset keeps the library's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, TypeVar

from salr.config import DTYPES, PRESETS, SALRConfig

T = TypeVar("T")
# Field names whose flag differs from the field name (PEFT's `r` is the LoRA rank on the command line).
FLAG_NAMES = {"r": "lora-rank"}


def at_least(minimum: int) -> Any:
    """argparse type: an integer >= `minimum` (a bad value is a one-line usage error before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


non_negative_float.__name__ = "number >= 0"


def flag(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name.replace("_", "-"))


def _modules(value: str) -> list[str] | str:
    """'all-linear', a regex (kept as a string), or comma-separated names."""
    if value == "all-linear" or any(c in value for c in "*()[]|^$\\+?"):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def _json_object(value: str) -> dict[str, Any]:
    """A JSON object such as '{"(gate|up|down)_proj": 83, "self_attn\\..*": 32}' (SALRConfig checks the contents)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({err})") from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {value!r}")
    return parsed


def _parser_for(annotation: Any) -> tuple[Any, bool]:
    """(argparse type, is_bool) for a field annotation such as 'int', 'float | None', 'list[str] | str | None'."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if bool in args:
        return None, True
    if any(typing.get_origin(a) is list for a in args):
        return _modules, False
    if any(typing.get_origin(a) is dict for a in args):
        return _json_object, False
    if str in args:  # a number or a keyword ('lr*0.1', 'theorem4'): the dataclass parses the string
        return str, False
    for kind in (int, float):
        if kind in args:
            return (float if float in args and kind is int else kind), False
    return str, False


def add_dataclass_args(
    parser: argparse._ActionsContainer,
    cls: type,
    only: list[str] | None = None,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field of dataclass `cls` (in `only`, or all but `skip`); `defaults` overrides a shown default."""
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        # argparse %-formats help strings: a literal "3% of" would read as a %o conversion and crash --help
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        kind, is_bool = _parser_for(hints[f.name])
        if is_bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                dest=f.name, help=help_text)  # fmt: skip
            continue
        choices = f.metadata.get("choices")
        # dest is the field name: `--lora-rank` must fill `r` (without it the flag was silently ignored)
        parser.add_argument(flag(f.name), type=kind, choices=choices, default=argparse.SUPPRESS, dest=f.name,
                            metavar=None if choices else f.name.upper(),
                            help=help_text)  # fmt: skip


def dataclass_from_args(args: argparse.Namespace, cls: type[T], **overrides: Any) -> T:
    """An instance of `cls` from the flags that were given; unset flags keep the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**given, **overrides})


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct), a Hugging Face model dir or hub id, a llama2.c *.bin, "
        "or a SALR checkpoint dir",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model weights")


def add_salr_args(
    parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> None:
    """Every SALRConfig field as a flag (--sparsity, --pattern, --residual-rank, --lora-rank, ...) and --preset;
    `defaults` shows a command's own defaults in --help where they differ from SALRConfig's."""
    group = parser.add_argument_group("SALR")
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from a named recipe: 'paper' = the SALR paper exactly (magnitude mask, plain SVD, no data); "
        "'salr+' = the default (the best measured, docs/quality.md); flags given beside it still apply",
    )
    add_dataclass_args(group, SALRConfig, skip=skip, defaults=defaults)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> SALRConfig:
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    names = {f.name for f in dataclasses.fields(SALRConfig)}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return SALRConfig(**{**preset, **given, **overrides})
