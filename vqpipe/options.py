"""The job's settings, stated once: the command line's `tokenize` options and docs/options.md are derived from
the config dataclasses (`vqpipe.config`), so adding a setting is one field with its help.

Every section field becomes a flag: `--name-with-dashes` taking a value; a boolean that defaults to false becomes
`--name` (set true), one that defaults to true `--no-name` (set false); `option(flag=...)` overrides the name.
A flag that is not given is None in `overrides`, which leaves the config file's value (or the default).

    python -m vqpipe.options > docs/options.md     # regenerate the table (a test checks it is current)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .config import SECTIONS, JobConfig


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting of one section, as the command line and the docs show it."""

    section: str
    name: str
    hint: Any
    default: Any
    help: str
    flag: str
    metavar: str | None

    @property
    def key(self) -> str:
        """Its name in a config file and in error messages: `section.name`."""
        return f"{self.section}.{self.name}"

    @property
    def choices(self) -> tuple[str, ...]:
        return get_args(self.hint) if get_origin(self.hint) is Literal else ()

    @property
    def is_flag(self) -> bool:
        """A boolean switch: takes no value."""
        return self.hint is bool

    def value_type(self) -> type:
        """What argparse converts the value to (str for choices: the config's validation names them)."""
        if self.choices or get_origin(self.hint) is tuple:  # a list: comma-separated, split by the config
            return str
        args = get_args(self.hint) if get_origin(self.hint) in (Union, types.UnionType) else (self.hint,)
        return next(t for t in args if t is not type(None))


def options() -> list[Option]:
    """Every section setting, in declaration order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help")
            if not help_text:
                raise TypeError(f"{section}.{f.name}: declare it with config.option(default, help)")
            flag = f.metadata.get("flag")
            if flag is None:
                dashed = f.name.replace("_", "-")
                flag = f"--no-{dashed}" if hints[f.name] is bool and f.default is True else f"--{dashed}"
            out.append(
                Option(section, f.name, hints[f.name], f.default, help_text, flag, f.metadata.get("metavar"))
            )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `tokenize` arguments: inputs, --output, --config, --log-level and one flag per setting."""
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="tar files, directories, globs or brace patterns (local or any fsspec URL)",
    )
    p.add_argument("--output", "-o", help="output directory or URL (OUT)")
    p.add_argument("--config", help="TOML or YAML file with settings; command-line options override it")
    groups: dict[str, Any] = {}
    for o in options():
        g = groups.get(o.section) or groups.setdefault(o.section, p.add_argument_group(o.section))
        if o.is_flag:
            action = "store_false" if o.flag.startswith("--no-") and o.default is True else "store_true"
            help_text = f"turn off (on by default): {o.help}" if action == "store_false" else o.help
            g.add_argument(o.flag, dest=o.key, action=action, default=None, help=help_text)
            continue
        metavar = o.metavar or ("{" + ",".join(o.choices) + "}" if o.choices else o.name.upper())
        default = "" if o.default is None else f" (default: {_shown(o.default)})"
        g.add_argument(o.flag, dest=o.key, type=o.value_type(), metavar=metavar, help=o.help + default)
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line values as a nested config dict; None means 'not given' and leaves the file's value."""
    out: dict[str, Any] = {"inputs": args.inputs or None, "output": args.output}
    for o in options():
        out.setdefault(o.section, {})[o.name] = getattr(args, o.key)
    return out


def markdown() -> str:
    """docs/options.md: every setting with its config key, flag, type, default and help."""
    lines = [
        "# Options",
        "",
        "<!-- Generated from vqpipe/config.py by `python -m vqpipe.options > docs/options.md`; do not edit. -->",
        "",
        "Every setting of `vqpipe tokenize` (and of its `ray job submit` entry point in jobs/) can be given in a",
        "TOML or YAML config file (`--config`, under its section) or on the command line; the command line wins",
        "over the file, the file over the defaults. Unknown keys and bad values are refused with the key named.",
        "",
        "| config key | flag | values | default | what it does |",
        "|---|---|---|---|---|",
        "| `inputs` | `INPUT ...` (positional) | list of str | — | tar files, directories, globs or brace "
        "patterns (local or any fsspec URL) |",
        "| `output` | `--output`, `-o` | str | — | output directory or URL (OUT) |",
    ]
    for o in options():
        values = " \\| ".join(f"`{c}`" for c in o.choices) if o.choices else _type_name(o.hint)
        default = "—" if o.default is None else f"`{_shown(o.default)}`"
        flag = o.flag + ("" if o.is_flag or o.choices else f" {o.metavar or o.name.upper()}")
        lines.append(f"| `{o.key}` | `{flag}` | {values} | {default} | {o.help} |")
    lines.append(
        "| `storage_options` | — (config file only) | table | `{}` | passed to fsspec for every URL "
        "(credentials normally come from the environment), except vqpipe's own `vqpipe_deadline_s` (default "
        "120): the most seconds one storage call may take (docs/object-storage.md) |"
    )
    undescribed = {f.name for f in dataclasses.fields(JobConfig)} - {
        "inputs",
        "output",
        "storage_options",
        *SECTIONS,
    }
    if undescribed:  # a new top-level field (not in a section) needs its row above
        raise TypeError(f"JobConfig fields missing from the options table: {', '.join(sorted(undescribed))}")
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    """A default as a config file or the command line would spell it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _type_name(hint: Any) -> str:
    if get_origin(hint) is tuple:
        return "list of " + get_args(hint)[0].__name__
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return " or ".join("none" if t is type(None) else t.__name__ for t in args)


if __name__ == "__main__":
    sys.stdout.write(markdown())
