"""Command-line options declared once, as dataclass fields: `option()` gives a field its help,
allowed values and flag, and `click_options` turns a dataclass into click options. Each command's
options live beside the code that uses them (TrainConfig and PretrainOptions in config,
SourceOptions in sources, ShardOptions in shards, ProbeOptions in downstream: beside the sets
it names, and free of probe.py's torch, so `--help` stays fast; SweepOptions in sweep,
PredictOptions in predict); cli.py only stacks them, with the few options several commands
share (progress_option, workers_option, json_option) declared here once.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import MISSING, field, fields

import click

# Comma-separated values, checked where click parses them (a bad one is a usage error).
LISTS = {"ints": int, "floats": float, "pairs": None}

# Options renamed since runs were first recorded, old name -> new: one name per cache (the
# pixel cache, the eval cache; issue 35). This is the one place that knows the old names: a
# record written under them (config.json, a checkpoint's config, --config, a sweep's
# pretrain.json and sweep.json, summary.json's "cache") reads as today's (`renamed`), and the
# old flags still work, hidden, each use saying the new one (`click_options`, `Renamed`).
RENAMED = {"cache": "pixel_cache", "cache_side": "pixel_cache_side", "cache_dir": "eval_cache"}


def renamed(record):
    """A recorded dict (a config, a summary) with its old names (RENAMED) as today's; a value
    under both names keeps today's. Anything else comes back as it is, for its reader to
    refuse."""
    if not isinstance(record, dict):
        return record
    return {RENAMED.get(k, k): v for k, v in record.items()
            if not (k in RENAMED and RENAMED[k] in record)}


def renamed_argv(argv):
    """Recorded command-line options (a sweep's) with the old flags as today's."""
    old = {_flag(k): _flag(v) for k, v in RENAMED.items()}
    return [old.get(a, a) for a in argv] if isinstance(argv, list) else argv


def old_flags(name: str) -> tuple[str, ...]:
    """The flags a field (or option) named `name` had before it was renamed."""
    return tuple(_flag(k) for k, v in RENAMED.items() if v == name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Renamed(click.Option):
    """An option whose `old` flags still work but are not shown: each use says the new flag
    on stderr, in one line, so that a user's scripts go on running; both at once is a usage
    error."""

    def __init__(self, *args, old: tuple = (), **kw):
        super().__init__(*args, **kw)
        self.old = old

    def add_to_parser(self, parser, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        parser.add_option(obj=self, opts=self.old, dest=self.name + _OLD,
                          action="append" if self.multiple else "store", nargs=self.nargs)

    def consume_value(self, ctx: click.Context, opts):
        if self.name + _OLD in opts:
            old, new = "/".join(self.old), self.opts[0]
            if self.name in opts:
                raise click.UsageError(f"{old} is the old name of {new}: give one of them", ctx)
            click.echo(f"note: {old} is now {new} (the old name still works)", err=True)
            opts = {**opts, self.name: opts[self.name + _OLD]}
        return super().consume_value(ctx, opts)


_OLD = "__old_flag"


def without_old_flags(e: click.NoSuchOption) -> click.NoSuchOption:
    """click's "Did you mean" for a mistyped option, offering today's flags only: the old
    ones (`Renamed`) still work, but are not to be learnt."""
    if e.ctx is not None and e.possibilities:
        shown = [o for p in e.ctx.command.params if isinstance(p, click.Option)
                 for o in p.opts + p.secondary_opts]
        e.possibilities = difflib.get_close_matches(e.option_name, shown) or None
    return e


def option(default, help: str, *, group: str = "", choices: tuple = (), path: str = "",
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, flag: str = "", aliases: tuple = (), kind: str = "",
           scale: int = 1, multiple: bool = False):
    """A field and what its option needs: help, allowed values (choices, a range), a `path`
    that must exist ("dir" or "file") or a folder to write ("out"), its own `flag` where the
    field's name would not do (and older `aliases`), a comma-separated `kind` of LISTS, a
    `scale` from what is typed to what is stored (MB -> bytes), and `multiple` for an option
    given once per item (a tuple). A field without a default is a required option."""
    return field(default=default, metadata={
        "help": help, "group": group, "choices": choices, "path": path, "flag": flag,
        "aliases": aliases, "range": (low, high, low_open, high_open), "kind": kind,
        "scale": scale, "multiple": multiple})


def flags(f) -> tuple[str, str]:
    """A field's option and, for a yes/no field, its opposite: --x/--no-x, and a "no_" field's
    opposite drops the "no-" (--no-bn-wd/--bn-wd)."""
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return flag, "--" + flag[5:] if f.name.startswith("no_") else "--no-" + flag[2:]


def progress_option(what: str = "A progress bar on stderr."):
    return click.option("--progress/--no-progress", default=True, show_default=True, help=what)


def workers_option(what: str = "Threads [this process's share of the cores it may run on]."):
    return click.option("--workers", type=click.IntRange(min=1), help=what)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def pick(cls, given: dict):
    """The dataclass `cls` made of its fields' values, taken out of a command's `given` options
    (the rest stay for the next dataclass)."""
    return cls(**{f.name: given.pop(f.name) for f in fields(cls) if f.name in given})


def as_argv(cls, values: dict) -> list[str]:
    """The command-line form of the values given (None: not given), in field order."""
    argv = []
    for f in fields(cls):
        value = values.get(f.name)
        if value is None or (f.metadata["multiple"] and not value):
            continue
        flag, off = flags(f)
        if isinstance(value, bool):
            argv.append(flag if value else off)
        else:
            for v in value if f.metadata["multiple"] else [value]:
                argv += [flag, str(v)]
    return argv


def click_options(cls, group: str | None = None, shown=None):
    """A decorator adding one click option per field of the dataclass `cls` (of `group`, or
    all). `shown(name)`: the default to show, for options whose default is None and means
    "the recipe's value" (TrainConfig's); without it each field's own default is the option's."""
    options = []
    for f in fields(cls):
        m = f.metadata
        if group and m["group"] != group:
            continue
        flag, off = flags(f)
        required = f.default is MISSING
        default = None if shown or required else f.default
        text = m["help"]
        if shown and shown(f.name) and not text.endswith("]"):
            text += f" [{shown(f.name)}]"
        if "bool" in f.type:  # a switch, or a flag that is off unless given
            options.append(click.option(f"{flag}/{off}", f.name, default=default, help=text,
                                        show_default=not shown) if shown or default else
                           click.option(flag, f.name, is_flag=True, help=text))
            continue
        kw = dict(type=_type(f), required=required, help=text,
                  default=default / m["scale"] if m["scale"] > 1 else default,
                  show_default=not shown and default is not None)
        if m["multiple"]:
            kw.update(multiple=True, default=(), show_default=False)
        elif m["kind"]:
            kw.update(type=str, callback=_parse_list(m["kind"]), default=None, show_default=False)
        elif m["scale"] > 1:
            kw["callback"] = lambda ctx, param, value, s=m["scale"]: int(value * s)
        old = old_flags(f.name)
        options.append(click.option(flag, *m["aliases"], f.name, **kw,
                                    **({"cls": Renamed, "old": old} if old else {})))
    return lambda fn: functools.reduce(lambda g, o: o(g), reversed(options), fn)


_DEFAULT_IN_WORDS = re.compile(r"\s*\[([^\[\]]+)\](\.?)$")


class _DefaultInWords(click.Option):
    """An option whose default the help says in words: shown as click shows a value's, without
    the parentheses click puts around a string `show_default`."""

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        extra["default"] = self.show_default
        return extra


class _RenamedInWords(_DefaultInWords, Renamed):
    pass


def one_default_style(group: click.Group) -> click.Group:
    """Every option's default shown one way, click's `[default: ...]`: a default the help
    says in words at its end ("[all]", "[the recipe's]", a recipe's values) moves there too,
    instead of a second bracket beside click's."""
    for command in group.commands.values():
        for p in command.params:
            m = _DEFAULT_IN_WORDS.search(p.help or "") if isinstance(p, click.Option) else None
            if m:
                text = p.help[:m.start()].rstrip()
                p.help = text + ("." if m[2] and not text.endswith(".") else "")
                p.show_default = m[1]
                p.__class__ = _RenamedInWords if isinstance(p, Renamed) else _DefaultInWords
    return group


def _type(f):
    m = f.metadata
    low, high, low_open, high_open = m["range"]
    if m["choices"]:
        return click.Choice(m["choices"])
    if m["path"]:
        return click.Path(exists=m["path"] != "out", file_okay=m["path"] == "file",
                          dir_okay=m["path"] != "file")
    if "int" in f.type and m["scale"] == 1:
        return click.IntRange(low, high) if low is not None or high is not None else int
    if "float" in f.type or m["scale"] > 1:
        return click.FloatRange(low, high, min_open=low_open, max_open=high_open)
    return str


def _parse_list(kind: str):
    def parse(ctx, param, value):
        if value is None:
            return []
        items = [v for v in value.split(",") if v.strip()]
        if kind == "pairs":
            try:
                out = [tuple(int(x) for x in v.split(":")) for v in items]
            except ValueError:
                out = [()]
            if any(len(p) != 2 or min(p) < 1 for p in out):
                raise click.BadParameter(f"{value!r}: expected K:n pairs of positive integers, "
                                         "e.g. 100:64,400:16")
            return out
        try:
            out = [LISTS[kind](v) for v in items]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of "
                                     f"{LISTS[kind].__name__}s") from None
        if any(v <= 0 for v in out):
            raise click.BadParameter("values must be positive")
        return out
    return parse
