"""Settings declared once: a setting is one dataclass field made with `setting(default, help)`, whose
metadata says everything the rest of the tool needs of it (its command-line flag and help, whether it
may change on --resume, whether it acts on CUDA only). A command's config is built from parts (frozen
dataclasses of settings); `flat_settings` and `compose` go between a config and the flat name -> value
settings that presets, state.json and the command line hold, and the command line's flags are derived
from the same fields (ccfs_fast.cli.args). No torch here: naming and checking settings stays light.

Adding a recipe setting is one field + one help line in its part, e.g. in TrainRecipe:

    label_noise: float = setting(0.0, "share of labels flipped at random")
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass, replace

from beton_builder.base.errors import ConfigError, UnknownNameError


def setting(default: object = MISSING, help: str = "", *, factory: object = MISSING,  # noqa: A002 - argparse's word
            flags: tuple[str, ...] = (), arg_type: object = None, choices: tuple | None = None, shown: object = MISSING,
            resume_free: bool = False, gpu_only: bool = False, cli: bool = True) -> Field:
    """A config field with its command-line facts: `flags` (default `--name-with-dashes`), `arg_type`
    (default: from the annotation), `choices`, `shown` (the default as the help says it, when the
    field's own default is a placeholder such as None for "on for CUDA"), `resume_free` (may change
    between a run and its --resume without changing results), `gpu_only` (does nothing on a CPU),
    `cli` (False: not a flag of its own)."""
    meta = {"help": help, "flags": flags, "arg_type": arg_type, "choices": choices, "shown": shown,
            "resume_free": resume_free, "gpu_only": gpu_only, "cli": cli}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_part(f: Field) -> bool:
    """Whether a config field holds a part (a dataclass of settings) rather than one setting."""
    return f.default_factory is not MISSING and is_dataclass(f.default_factory())


def default_of(f: Field) -> object:
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass(frozen=True)
class Leaf:
    """One setting of a config: its field, its type, the part it lives in (None: the config itself) and
    that part's default instance (where the default the help shows comes from)."""

    field: Field
    type: object
    part: str | None
    owner_default: object

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def default(self) -> object:
        if self.owner_default is not None:
            return getattr(self.owner_default, self.name)
        return default_of(self.field)

    def meta(self, key: str, fallback: object = None) -> object:
        return self.field.metadata.get(key, fallback)

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(self.meta("flags") or ()) or (flag_of(self.name),)


def leaves(config: type) -> list[Leaf]:
    """Every setting of a config class, parts unfolded, in declaration order."""
    hints = typing.get_type_hints(config)
    out = []
    for f in fields(config):
        if is_part(f):
            part = f.default_factory()
            part_hints = typing.get_type_hints(type(part))
            out += [Leaf(g, part_hints[g.name], f.name, part) for g in fields(part)]
        else:
            out.append(Leaf(f, hints[f.name], None, None))
    return out


def flat_settings(config: object, skip: tuple[str, ...] = ("notes",)) -> dict:
    """A config's settings as one flat name -> value dict (paths as str): what presets, state.json,
    exp_log.txt and --resume's comparison hold."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_part(f):
            out.update(flat_settings(value, skip))
        elif f.name not in skip:
            out[f.name] = str(value) if value is not None and f.type in ("Path", "Path | None") else value
    return out


def compose(config: type, values: dict, **parts: object) -> object:
    """A `config` from flat settings: each value goes to the part (or the config field) of its name;
    a part's base instance (e.g. a teacher's recipe), which the values then replace, may be given in
    `parts` or among the values under the part's name. A name no part holds is refused, naming it."""
    own: dict = {}
    taken = set()
    for f in fields(config):
        if is_part(f):
            base = values.get(f.name) or parts.get(f.name) or f.default_factory()
            taken.add(f.name)
            mine = {g.name: values[g.name] for g in fields(base) if g.name in values}
            own[f.name] = replace(base, **mine)
            taken |= set(mine)
        elif f.name in values:
            own[f.name] = values[f.name]
            taken.add(f.name)
    unknown = sorted(set(values) - taken)
    if unknown:
        raise UnknownNameError(f"{config.__name__} setting", unknown[0], [leaf.name for leaf in leaves(config)])
    return config(**own)


def names_where(config: type, key: str) -> frozenset[str]:
    """The settings of a config whose metadata sets `key` (resume_free, gpu_only)."""
    return frozenset(leaf.name for leaf in leaves(config) if leaf.meta(key))


FLAG_NAMES = {"temperature": "-T"}  # a setting's flag where it is not --<name with dashes>


def flag_of(name: str) -> str:
    """The command-line flag of setting `name`: --image-per-class, -T, ..."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def check_finite(values: dict) -> None:
    """Every number among `values` (settings by name) is finite: NaN or infinity in --lr, -T, --alpha,
    ... is refused before any work (a NaN passes every `> 0` check and would fail hours later)."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag_of(name)} {value}: must be a finite number")


def finite_fields(config: object) -> None:
    """check_finite over a config's own fields."""
    check_finite({f.name: getattr(config, f.name) for f in fields(config)})


def check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UnknownNameError(kind, value, list(valid))
