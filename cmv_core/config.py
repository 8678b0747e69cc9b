"""YAML recipes: one file per setting (tiny, demo, llama-3.2-1b, ...).

A recipe has a top-level ``model:`` and one section per stage (``clean:``,
``format:``, ``train:``, ``generate:``, ``judge:``). Each stage turns its
section into its own dataclass with :func:`section`, so a typo in a key is an
error that names the key and the file instead of a silently ignored setting.
An unknown top-level section is an error too (``trian:`` or ``--set trian.x=1``),
checked in :func:`load_recipe`; :func:`validate_recipe` builds every stage's
section up front, so ``cmv run`` fails on a typo in its last stage before its
first stage starts. The known sections are :data:`SECTIONS`: a new stage's
section is one line there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import typing
from typing import Any, TypeVar

import yaml

from cmv_core import stages
from cmv_core.errors import InputError

T = TypeVar("T")

# Every top-level key a recipe may have -> the dataclass ("module:Class") its section becomes,
# or None for a plain value (``model:``).
SECTIONS: dict[str, str | None] = {"model": None, **{st.name: st.config for st in stages.PIPELINE}}


class ConfigError(InputError):
    """A recipe is missing, malformed or has an unknown key."""


def _set_dotted(recipe: dict, dotted: str, value: Any) -> None:
    node = recipe
    keys = dotted.split(".")
    for key in keys[:-1]:
        if node.get(key) is None:  # an empty YAML section ("train:") reads as null
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_recipe(path_or_uri: str | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Load a YAML recipe (path or URI) and apply ``section.key=value`` overrides."""
    recipe: dict = {}
    if path_or_uri:
        from cmv_core import storage

        try:
            text = storage.read_text(path_or_uri)
        except FileNotFoundError:
            raise ConfigError(f"recipe {path_or_uri} does not exist") from None
        try:
            recipe = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path_or_uri} is not valid YAML: {exc}") from None
        if not isinstance(recipe, dict):
            raise ConfigError(f"recipe {path_or_uri}: top level must be a mapping, got {type(recipe).__name__}")
        recipe["_source"] = str(path_or_uri)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(recipe, key.strip(), yaml.safe_load(raw))
    check_sections(recipe)
    return recipe


def check_sections(recipe: dict) -> None:
    """Unknown top-level sections are errors listing the known ones."""
    unknown = sorted(k for k in recipe if k not in SECTIONS and k != "_source")
    if unknown:
        source = recipe.get("_source", "<overrides>")
        raise ConfigError(f"{source}: unknown section(s) {', '.join(map(str, unknown))}; known: {', '.join(SECTIONS)}")


def section_class(name: str) -> type:
    module, _, cls = str(SECTIONS[name]).partition(":")
    return getattr(importlib.import_module(module), cls)


def validate_recipe(recipe: dict, sections: list[str] | tuple[str, ...] | None = None) -> None:
    """Build every (or each named) stage section now: unknown keys, wrong types and invalid values are
    errors before any work starts."""
    check_sections(recipe)
    for name in sections if sections is not None else list(SECTIONS):
        if SECTIONS.get(name):
            section(recipe, name, section_class(name))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Light type checks for the common scalar cases, with a clear message."""
    origin = typing.get_origin(annotation)
    if annotation in (int, float, bool, str) and value is not None:
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if annotation is float and isinstance(value, str):
            # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if annotation is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if annotation is str and not isinstance(value, str):
            return str(value)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is not None and len(args) == 1:
            return _coerce(value, args[0], where)
    return value


def section(recipe: dict, name: str, cls: type[T]) -> T:
    """Build ``cls`` (a dataclass) from ``recipe[name]``; unknown keys are errors."""
    values = recipe.get(name) or {}
    source = recipe.get("_source", "<overrides>")
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} in section {name!r}; known: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints.get(k), f"{source}: {name}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def model_spec(recipe: dict, default: str | None = None) -> str:
    """The recipe's top-level ``model:`` (the embedded default when absent)."""
    from cmv_core.models import EMBEDDED_DEFAULT

    return str(recipe.get("model") or default or EMBEDDED_DEFAULT)


def parse_utc(value: str) -> float:
    """Seconds since the epoch of a date or ISO datetime; naive values are UTC."""
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"format.test_after: {value!r} is not a date (YYYY-MM-DD) or ISO datetime") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
