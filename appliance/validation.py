"""Plain data (TOML tables, JSON bodies, environment text) checked against annotated types, in one place.

Types are real annotations, read with :func:`typing.get_type_hints`: ``bool``, ``int``, ``float``, ``str``,
``Literal[...]``, ``list``, ``tuple``, ``dict``, unions and dataclasses, limits written as
``Annotated[int, msgspec.Meta(ge=0, le=65535)]`` (a ``description=`` says in words what the value is). msgspec checks
each leaf, strictly: a bool is not an integer, an integer is accepted as a number, text is not parsed. This module walks
dataclasses, lists of them and unions itself, so that an error (:class:`Invalid`) carries the path of the field and
the value it got, and :func:`describe` says what is allowed; :func:`json_schema` writes the same rules as JSON Schema.

A dataclass refuses keys it does not declare, unless it sets ``extra_keys: ClassVar[str] = "ignore"``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Collection
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import msgspec
import msgspec.inspect as mi

Loc = tuple[str | int, ...]  # where a value sits: keys and list positions from the top of the document
T = TypeVar("T")
IGNORE = "ignore"  # the value of a dataclass's ``extra_keys`` that lets it ignore keys it does not declare
_CONTAINERS = (list, tuple, set, frozenset)
_NONE = type(None)


class ConfigError(ValueError):
    """The configuration (server config, model.toml, upstream tables) cannot be used; the message says which field
    and what to change. Re-exported by :mod:`appliance.config`."""


class Invalid(ValueError):
    """A value that does not fit its type.

    ``kind`` is ``"value"`` (``value`` is not allowed by ``hint``), ``"unknown"`` (a key the table does not declare;
    ``known`` lists those it does) or ``"missing"`` (a required field is absent).
    """

    def __init__(self, kind: str, loc: Loc, value: Any = None, hint: Any = None, known: tuple[str, ...] = ()) -> None:
        super().__init__(kind, loc)
        self.kind, self.loc, self.value, self.hint, self.known = kind, loc, value, hint, known

    @property
    def path(self) -> str:
        """The dotted path of the field, list positions in brackets: ``inputs[0].dims``."""
        return path_of(self.loc)

    @property
    def expected(self) -> str:
        """What is allowed, in words (for ``"unknown"``: the keys that are)."""
        return ", ".join(self.known) if self.kind == "unknown" else describe(self.hint)

    def message(self, origin: str = "") -> str:
        """The sentence for an operator: the field, the value, ``origin`` (a file, a variable) and what is allowed."""
        source = f" (from {origin})" if origin else ""
        if self.kind == "unknown":
            return f"unknown setting {self.path}{source}; [{path_of(self.loc[:-1])}] has: {self.expected}"
        if self.kind == "missing":
            return f"{self.path} is missing{source}: expected {self.expected}"
        return f"{self.path} = {self.value!r}{source} is not allowed: expected {self.expected}"

    def __str__(self) -> str:
        return self.message()


def path_of(loc: Loc) -> str:
    """``("inputs", 0, "dims")`` as ``inputs[0].dims``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def convert(value: Any, hint: Any, loc: Loc = ()) -> Any:
    """``value`` checked against ``hint`` and converted (an integer for a float becomes a float, tables for
    dataclasses become instances); raises :class:`Invalid`."""
    return _checker(hint)(value, loc)


def values_for(cls: type, table: Any, loc: Loc = (), *, skip: Collection[str] = (),
               partial: bool = False) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that ``table`` sets, checked in the order ``cls`` declares them.

    Raises :class:`Invalid` for a key ``cls`` does not declare and, unless ``partial``, for a required field that
    ``table`` lacks; the fields in ``skip`` are neither read nor required.
    """
    if not isinstance(table, dict):
        raise Invalid("value", loc, table, cls)
    specs = fields(cls)
    if getattr(cls, "extra_keys", None) != IGNORE:
        for key in table:
            if key not in specs or key in skip:
                raise Invalid("unknown", (*loc, key), table[key], known=tuple(n for n in specs if n not in skip))
    values = {}
    for name, spec in specs.items():
        if name in skip:
            continue
        if name in table:
            values[name] = spec.check(table[name], (*loc, name))
        elif spec.required and not partial:
            raise Invalid("missing", (*loc, name), hint=spec.hint)
    return values


def build(cls: type[T], table: Any, loc: Loc = (), **given: Any) -> T:
    """A ``cls`` from ``table`` (checked) and the fields in ``given`` (taken as they are)."""
    return cls(**given, **values_for(cls, table, loc, skip=given))


def assign(target: Any, table: Any, loc: Loc = ()) -> None:
    """Check ``table`` against the dataclass of ``target`` and set, in place, the fields it names."""
    for name, value in values_for(type(target), table, loc, partial=True).items():
        setattr(target, name, value)


Checker = Callable[[Any, Loc], Any]


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One init field of a dataclass: its resolved annotation, whether it is required, and how to check a value."""

    field: dataclasses.Field
    hint: Any
    required: bool
    default: Any  # the default value; dataclasses.MISSING when required or made by a default factory
    check: Checker


@functools.cache
def fields(cls: type) -> dict[str, FieldSpec]:
    """The init fields of dataclass ``cls``, in declared order, annotations resolved once."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: FieldSpec(f, hints[f.name], f.default is f.default_factory is dataclasses.MISSING, f.default,
                              _checker(hints[f.name]))
            for f in dataclasses.fields(cls) if f.init}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def from_text(text: str, hint: Any) -> Any:
    """Text (an environment variable) as a value of ``hint``'s type, to be checked with :func:`convert`.

    Booleans read 1/true/yes/on and 0/false/no/off, lists are comma separated, numbers are parsed; text that does not
    parse comes back as it is (a list as its parts), so that :func:`convert` reports it.
    """
    bare = _bare(hint)  # limits are checked later, on the parsed value, so that the message shows the number
    text = text.strip()
    if bare is bool:
        lowered = text.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    if get_origin(bare) in _CONTAINERS:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            return msgspec.convert(parts, bare, strict=False)
        except (msgspec.ValidationError, TypeError):
            return parts
    try:
        return msgspec.convert(text, bare, strict=False)
    except (msgspec.ValidationError, TypeError):
        return text


def _bare(hint: Any) -> Any:
    """``hint`` without its ``Annotated`` limits, at every level."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _bare(args[0])
    if origin in (Union, types.UnionType):
        return Union[tuple(_bare(arg) for arg in args)]
    if origin in (*_CONTAINERS, dict) and args:
        return origin[tuple(arg if arg is Ellipsis else _bare(arg) for arg in args)]
    return hint


# -- checking ------------------------------------------------------------------------------------------------------

@functools.cache
def _checker(hint: Any) -> Checker:
    """How to check ``hint``, worked out once per annotation."""
    walk = _walker(hint)
    if not _native(hint):
        return walk or functools.partial(_unsupported, hint)
    # msgspec keeps what it learns of a Struct type, not of a bare annotation: a one-field Struct checks in a third
    # of the time.
    box = msgspec.defstruct("Box", [("value", hint)])
    return functools.partial(_boxed, box, hint, walk)


def _unwrapped(hint: Any) -> tuple[Any, tuple[Any, ...], Any, tuple[Any, ...]]:
    """``(type, Annotated metadata, origin, args)`` of a hint, with ``Annotated`` taken off."""
    origin, args = get_origin(hint), get_args(hint)
    limits: tuple[Any, ...] = ()
    if origin is Annotated:
        hint, limits = args[0], args[1:]
        origin, args = get_origin(hint), get_args(hint)
    return hint, limits, origin, args


def _walker(hint: Any) -> Checker | None:
    """A check that walks ``hint`` to the value that does not fit (``None`` for a leaf, which msgspec checks)."""
    if _is_dataclass(hint):
        return lambda value, loc: build(hint, value, loc)
    whole = hint
    hint, limits, origin, args = _unwrapped(hint)
    if origin in (Union, types.UnionType):
        return functools.partial(_union, whole, tuple((_kinds(arg), _checker(arg)) for arg in args))
    if not _holds_dataclass(hint) and _native(whole):
        return None
    if origin in _CONTAINERS and args and (origin is not tuple or args[-1] is Ellipsis):
        shape = tuple[Any, ...] if origin is tuple else origin[Any]
        return functools.partial(_items, whole, _checker(_limited(shape, limits)), _checker(args[0]), origin)
    if origin is dict and args:
        return functools.partial(_items, whole, _checker(_limited(dict[args[0], Any], limits)), _checker(args[1]),
                                 dict)
    return None


def _boxed(box: type, hint: Any, walk: Checker | None, value: Any, loc: Loc) -> Any:
    try:
        return msgspec.convert({"value": value}, box).value
    except msgspec.ValidationError:
        if walk is not None:
            walk(value, loc)  # finds, and reports, the value inside that does not fit
        raise Invalid("value", loc, value, hint) from None


def _unsupported(hint: Any, value: Any, loc: Loc) -> Any:
    raise TypeError(f"appliance.validation cannot check values of type {hint!r} (at {path_of(loc)})")


def _limited(shape: Any, limits: tuple[Any, ...]) -> Any:
    return Annotated[(shape, *limits)] if limits else shape


def _union(hint: Any, members: tuple[tuple[tuple[type, ...] | None, Checker], ...], value: Any, loc: Loc) -> Any:
    for kinds, member in members:  # in the order written: the first that fits
        if kinds is None or isinstance(value, kinds):
            try:
                return member(value, loc)
            except Invalid:
                pass
    raise Invalid("value", loc, value, hint)


_ARRAYS = (list, tuple, set, frozenset)


def _kinds(hint: Any) -> tuple[type, ...] | None:
    """The Python types a value of ``hint`` can have (``None``: any), so that a union skips members that cannot fit
    without the cost of trying them."""
    base = _split(hint)[0]
    origin, args = get_origin(base), get_args(base)
    if origin in (Union, types.UnionType):
        members = [_kinds(arg) for arg in args]
        return None if None in members else tuple(kind for kinds in members for kind in kinds or ())
    if origin is typing.Literal:
        return tuple({type(value) for value in args})
    if base is float:
        return (int, float)
    if base in (str, int, bool, _NONE):
        return (base,)
    if origin in _CONTAINERS:
        return _ARRAYS
    if origin is dict or _is_dataclass(base):
        return (dict,)
    return None


def _items(hint: Any, shape: Checker, item: Checker, origin: type, value: Any, loc: Loc) -> Any:
    try:
        shape(value, loc)
    except Invalid:
        raise Invalid("value", loc, value, hint) from None
    if origin is dict:
        return {key: item(entry, (*loc, key)) for key, entry in value.items()}
    items = [item(entry, (*loc, index)) for index, entry in enumerate(value)]
    return items if origin is list else origin(items)


def _is_dataclass(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _holds_dataclass(hint: Any) -> bool:
    return _is_dataclass(hint) or any(_holds_dataclass(arg) for arg in get_args(hint))


@functools.cache
def _native(hint: Any) -> bool:
    """Whether msgspec can check ``hint`` whole: a type it supports (it refuses, for one, unions of several kinds of
    list) whose dataclasses all ignore undeclared keys, as msgspec does (the others' keys are checked here)."""
    if not _lenient(hint):
        return False
    try:
        mi.type_info(hint)
    except (TypeError, ValueError):
        return False
    return True


def _lenient(hint: Any, seen: frozenset[type] = frozenset()) -> bool:
    if _is_dataclass(hint):
        if getattr(hint, "extra_keys", None) != IGNORE:
            return False
        if hint in seen:
            return True
        hints = typing.get_type_hints(hint, include_extras=True)
        return all(_lenient(hints[f.name], seen | {hint}) for f in dataclasses.fields(hint) if f.init)
    return all(_lenient(arg, seen) for arg in get_args(hint))


# -- words ---------------------------------------------------------------------------------------------------------

def describe(hint: Any) -> str:
    """What ``hint`` allows, in words: "an integer from 0 to 65535", "one of 'a', 'b'", "a list of strings"."""
    base, limits = _split(hint)
    origin, args = get_origin(base), get_args(base)
    description = limits.get("description")
    if origin in (Union, types.UnionType):
        words = " or ".join(describe(arg) for arg in args if arg is not _NONE)
        words = words + " or null" if _NONE in args else words
    elif origin is typing.Literal:
        words = "one of " + ", ".join(repr(value) for value in args)
    elif base is bool:
        words = "true or false"
    elif base in (int, float):
        bounds = _bounds(limits)
        words = ("an integer" if base is int else "a number") + (f" {bounds}" if bounds else "")
    elif base is str:
        words = _string(limits, described=bool(description))[0]
    elif origin in (*_CONTAINERS, dict) and args:
        noun = "table" if origin is dict else "list"
        words = f"a non-empty {noun}" if limits.get("min_length") == 1 else f"a {noun}"
        sizes = [f"at least {limits['min_length']} items"] if (limits.get("min_length") or 0) > 1 else []
        sizes += [f"at most {limits['max_length']} items"] if limits.get("max_length") is not None else []
        item = args[-1] if origin is dict else args[0]
        if get_origin(item) is typing.Literal:
            words += " drawn from " + ", ".join(repr(value) for value in get_args(item))
        elif item is not Any:
            plural, condition = _plural(item)
            words += f" of {plural}" + (f", each {condition}" if condition else "")
        words += f" ({', '.join(sizes)})" if sizes else ""
    elif _is_dataclass(base):
        words = "a table of settings"
    elif base is Any:
        words = "any value"
    elif base is _NONE or base is None:
        words = "null"
    else:
        words = getattr(base, "__name__", str(base))
    return f"{words} ({description})" if description else words


def _split(hint: Any) -> tuple[Any, dict[str, Any]]:
    """``Annotated[X, Meta(...), ...]`` as ``X`` and the limits its ``Meta`` set."""
    limits: dict[str, Any] = {}
    while get_origin(hint) is Annotated:
        hint, *extras = get_args(hint)
        for meta in extras:
            if isinstance(meta, msgspec.Meta):
                limits.update({name: getattr(meta, name) for name in _LIMITS if getattr(meta, name) is not None})
    return hint, limits


_LIMITS = ("gt", "ge", "lt", "le", "min_length", "max_length", "pattern", "description")


def _plural(hint: Any) -> tuple[str, str]:
    """The plural noun for items of type ``hint`` and the condition each must meet ("" when none)."""
    base, limits = _split(hint)
    description = limits.get("description")
    origin, args = get_origin(base), get_args(base)
    if base in (int, float):
        plural, condition = ("integers" if base is int else "numbers"), _bounds(limits)
    elif base is str:
        plural = _string(limits, described=bool(description))[1]
        condition = f"matching {limits['pattern']}" if "pattern" in limits and not description else ""
    elif base is bool:
        plural, condition = "booleans", ""
    elif origin in _CONTAINERS and args:
        inner, condition = _plural(args[0])
        plural = f"lists of {inner}"
    elif _is_dataclass(base) or origin is dict:
        plural, condition = "tables", ""
    else:
        plural, condition = "values", describe(base)
    if description:
        condition = f"{condition} ({description})" if condition else description
    return plural, condition


def _string(limits: dict[str, Any], described: bool) -> tuple[str, str]:
    """``"a string"``-like words for these limits, and their plural (a pattern only when no description says more)."""
    low, high = limits.get("min_length"), limits.get("max_length")
    if low == 1 and high is None:
        words = ("a non-empty string", "non-empty strings")
    elif low or high is not None:
        size = f"{low or 0} to {high} characters" if high is not None else f"at least {low} characters"
        words = (f"a string of {size}", f"strings of {size}")
    else:
        words = ("a string", "strings")
    if "pattern" in limits and not described:
        return f"{words[0]} matching {limits['pattern']}", words[1]
    return words


def _bounds(limits: dict[str, Any]) -> str:
    # A whole float is written as an integer: Meta(gt=0) and Meta(gt=0.0) are equal, so the cached checks of equal
    # annotations may carry either, and the message must read the same.
    n = {key: int(value) if isinstance(value, float) and value.is_integer() else value
         for key, value in limits.items() if key in ("gt", "ge", "lt", "le")}
    if "ge" in n and "le" in n:
        return f"from {n['ge']} to {n['le']}"
    low = f">= {n['ge']}" if "ge" in n else f"> {n['gt']}" if "gt" in n else ""
    high = f"<= {n['le']}" if "le" in n else f"< {n['lt']}" if "lt" in n else ""
    return " and ".join(part for part in (low, high) if part)


# -- JSON Schema ---------------------------------------------------------------------------------------------------

REF_TEMPLATE = "#/components/schemas/{name}"


def json_schema(hint: Any, components: dict[str, Any], ref_template: str = REF_TEMPLATE) -> dict[str, Any]:
    """The JSON Schema (2020-12, as OpenAPI 3.1 uses it) of what :func:`convert` accepts for ``hint``.

    Dataclasses go into ``components`` under their names (a field's ``metadata["description"]`` describes it) and
    are referenced with ``ref_template``.
    """
    if _is_dataclass(hint):
        name = hint.__name__
        if name not in components:
            components[name] = {}  # taken, should a field refer back to its own class
            components[name] = _object_schema(hint, components, ref_template)
        return {"$ref": ref_template.format(name=name)}
    if get_origin(hint) is typing.Literal:
        return {"enum": list(get_args(hint))}  # in the order written (msgspec sorts them)
    if not _holds_dataclass(hint) and _native(hint):
        (schema,), defined = msgspec.json.schema_components([hint], ref_template=ref_template)
        components.update(defined)
        return schema
    hint, limits, origin, args = _unwrapped(hint)
    if origin in (Union, types.UnionType):
        return {"anyOf": [json_schema(arg, components, ref_template) for arg in args]}
    if origin in _CONTAINERS:
        shape = tuple[Any, ...] if origin is tuple else origin[Any]
        return {**json_schema(_limited(shape, limits), components, ref_template),
                "items": json_schema(args[0], components, ref_template)}
    if origin is dict:
        return {**json_schema(_limited(dict[args[0], Any], limits), components, ref_template),
                "additionalProperties": json_schema(args[1], components, ref_template)}
    raise TypeError(f"appliance.validation has no JSON Schema for {hint!r}")


def _object_schema(cls: type, components: dict[str, Any], ref_template: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required = []
    for name, spec in fields(cls).items():
        schema = json_schema(spec.hint, components, ref_template)
        if "description" in spec.field.metadata:
            schema = {**schema, "description": spec.field.metadata["description"]}
        if spec.required:
            required.append(name)
        elif isinstance(spec.field.default, (str, int, float, bool, type(None))):
            schema = {**schema, "default": spec.field.default}
        properties[name] = schema
    result: dict[str, Any] = {"title": cls.__name__, "type": "object"}
    if "__doc__" in vars(cls) and cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        result["description"] = inspect.cleandoc(cls.__doc__).replace("``", "`")  # Markdown, as OpenAPI reads it
    result["properties"] = properties
    if required:
        result["required"] = required
    if getattr(cls, "extra_keys", None) != IGNORE:
        result["additionalProperties"] = False
    return result
