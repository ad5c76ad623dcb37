"""A task function's parameters, checked against the JSON arguments of a job at submit time.

`Signature.of(fn)` reads the function once, at registration, and builds one small checker per
parameter; any annotation it cannot check against JSON raises `TaskDefinitionError` then.
`Signature.bind(args)` runs per submitted job: a JSON object becomes keyword arguments, an array
positional ones, `None` no arguments; every bad field is reported in one `InvalidRequest`.

Supported annotations: `int`, `float`, `bool`, `str`, `list`, `dict`, `list[X]`,
`dict[str, X]`, `X | Y` (so `X | None`, `Optional[X]`), `Literal[...]` of str, int, bool or None,
`Any`, `object`, or none at all. The first parameter receives the task context when it is named
`ctx` or annotated with `Context` or `SyncContext`; it is no user argument.

Each checker comes with the JSON Schema of what it accepts (`Signature.args_schema()`, shown in
`/openapi.json`), built from the same annotation so that the two cannot drift apart.
"""

from __future__ import annotations

import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aioqueue.context import CONTEXT_TYPES
from aioqueue.errors import FieldError, InvalidRequest, TaskDefinitionError

#: Checks one value; appends a FieldError for each fault found at `path` or below it.
Check = Callable[[Any, str, list[FieldError]], None]

SUPPORTED = (
    "int, float, bool, str, list, dict, list[X], dict[str, X], X | None, X | Y, "
    "Literal[...] of str/int/bool/None values, Any, object, or no annotation"
)
_P = inspect.Parameter
_POSITIONAL = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
_GOT = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _got(value: object) -> str:
    return _GOT.get(type(value)) or f"a {type(value).__name__}"


def _accept(value: Any, path: str, errors: list[FieldError]) -> None:
    """The check of an unannotated, `Any` or `object` parameter: anything goes."""


@dataclass(frozen=True, slots=True)
class _Type:
    """One supported annotation: its display form, and how a JSON value is checked against it."""

    display: str
    expected: str  # "an integer", "a string or null": the start of the message of a mismatch
    accepts: Callable[[Any], bool]  # is the value of the right JSON kind?
    inner: Check | None = None  # checks the items of an array or object that is of that kind
    #: The JSON Schema of what the check accepts ({} is anything). JSON Schema's "integer" also
    #: takes 2.0, which `int` refuses: a JSON number written with a fraction is a float here.
    schema: Mapping[str, Any] = field(default_factory=dict)


def _scalar(display: str, expected: str, json_type: str, accepts: Callable[[Any], bool]) -> _Type:
    schema: dict[str, Any] = {"type": json_type}
    if json_type == "integer":
        # orjson reads an integer outside these bounds as a float, which `int` then refuses.
        schema.update(minimum=-(2**63), maximum=2**64 - 1)
    return _Type(display, expected, accepts, schema=schema)


_ANY = _Type("any", "anything", lambda v: True)
_SCALARS = {
    int: _scalar(
        "int", "an integer", "integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    ),
    float: _scalar(
        "float", "a number", "number", lambda v: isinstance(v, int | float) and type(v) is not bool
    ),
    bool: _scalar("bool", "a boolean", "boolean", lambda v: isinstance(v, bool)),
    str: _scalar("str", "a string", "string", lambda v: isinstance(v, str)),
    list: _scalar("list", "an array", "array", lambda v: isinstance(v, list)),
    dict: _scalar("dict", "an object", "object", lambda v: isinstance(v, dict)),
    type(None): _scalar("None", "null", "null", lambda v: v is None),
}


#: The errors one check reports at most: it stops there. A 1 MB body of 500,000 ill-typed items
#: made a problem document of 36 MB, and took the event loop for 1.8 s.
MAX_ERRORS = 50


class _TooManyErrors(Exception):
    pass


class _Errors(list[FieldError]):
    """The errors of one check: appending one past MAX_ERRORS stops the check."""

    def append(self, error: FieldError) -> None:
        if len(self) >= MAX_ERRORS:
            raise _TooManyErrors
        super().append(error)


class _Unsupported(Exception):
    """An annotation, or a part of one, that cannot be checked against JSON."""


def _check(t: _Type) -> Check:
    """The checker of a type: kind first, then the items, if any."""
    if t is _ANY:
        return _accept
    accepts, inner, expected = t.accepts, t.inner, t.expected

    def check(value: Any, path: str, errors: list[FieldError]) -> None:
        if not accepts(value):
            errors.append(FieldError(path, f"expected {expected}, got {_got(value)}"))
        elif inner is not None:
            inner(value, path, errors)

    return check


def _list_of(item: _Type) -> _Type:
    check = _check(item)

    def inner(value: list[Any], path: str, errors: list[FieldError]) -> None:
        for i, x in enumerate(value):
            check(x, f"{path}[{i}]", errors)

    schema = {"type": "array", "items": item.schema}
    return _Type(f"list[{item.display}]", "an array", _SCALARS[list].accepts, inner, schema)


def _dict_of(item: _Type) -> _Type:
    check = _check(item)

    def inner(value: dict[str, Any], path: str, errors: list[FieldError]) -> None:
        for key, x in value.items():
            check(x, f"{path}.{key}", errors)

    schema = {"type": "object", "additionalProperties": item.schema}
    return _Type(f"dict[str, {item.display}]", "an object", _SCALARS[dict].accepts, inner, schema)


def _union_of(members: list[_Type]) -> _Type:
    if any(m is _ANY for m in members):
        return _ANY
    expected = list(dict.fromkeys(m.expected for m in members))
    phrase = " or ".join(
        [", ".join(expected[:-1]), expected[-1]] if len(expected) > 1 else expected
    )

    def accepts(value: Any) -> bool:
        return any(m.accepts(value) for m in members)

    def inner(value: Any, path: str, errors: list[FieldError]) -> None:
        """Fine if any member of the right kind takes it; else the faults of the first one."""
        first: list[FieldError] | None = None
        for m in members:
            if m.accepts(value):
                found: list[FieldError] = []
                if m.inner is not None:
                    m.inner(value, path, found)
                if not found:
                    return
                first = first or found
        errors.extend(first or ())

    schema = {"anyOf": [m.schema for m in members]}
    return _Type(" | ".join(m.display for m in members), phrase, accepts, inner, schema)


def _literal_of(values: tuple[Any, ...]) -> _Type:
    if not all(v is None or isinstance(v, str | int) for v in values):
        raise _Unsupported
    allowed = {(type(v), v) for v in values}
    kinds = {type(v) for v in values}
    shown = ", ".join(json.dumps(v) for v in values)
    return _Type(
        f"Literal[{', '.join(map(repr, values))}]",
        f"one of {shown}",
        lambda v: type(v) in kinds and (type(v), v) in allowed,
        schema={"enum": list(values)},
    )


def _type_of(ann: Any) -> _Type:
    """The `_Type` of an annotation; raises `_Unsupported` if it cannot be checked."""
    if ann is Any or ann is object or ann is _P.empty:
        return _ANY
    if ann is None:
        return _SCALARS[type(None)]
    if isinstance(ann, type) and ann in _SCALARS:
        return _SCALARS[ann]
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        return _union_of([_type_of(a) for a in args])
    if origin is typing.Literal:
        return _literal_of(args)
    if origin is list and len(args) <= 1:
        item = _type_of(args[0]) if args else _ANY
        return _SCALARS[list] if item is _ANY else _list_of(item)
    if origin is dict and (not args or args[0] is str):
        item = _type_of(args[1]) if args else _ANY
        return _SCALARS[dict] if item is _ANY else _dict_of(item)
    raise _Unsupported


def _shown(ann: Any) -> str:
    if isinstance(ann, type) and not typing.get_args(ann):
        return ann.__qualname__
    return repr(ann).replace("typing.", "")


def _jsonable(value: object) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def _is_context(ann: Any) -> bool:
    members = (
        typing.get_args(ann)
        if typing.get_origin(ann) in (typing.Union, types.UnionType)
        else (ann,)
    )
    return all(m in CONTEXT_TYPES for m in members)


@dataclass(frozen=True, slots=True)
class Param:
    """One user-visible parameter of a task, as `GET /v1/tasks` shows it."""

    name: str
    type: str
    required: bool
    default: Any
    kind: inspect._ParameterKind = field(
        default=_P.POSITIONAL_OR_KEYWORD, repr=False, compare=False
    )
    check: Check = field(default=_accept, repr=False, compare=False)
    schema: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default": self.default,
        }


_STARS: dict[Any, str] = {_P.VAR_POSITIONAL: "*", _P.VAR_KEYWORD: "**"}


def _param(where: str, p: inspect.Parameter, ann: Any) -> Param:
    try:
        t = _type_of(ann)
    except _Unsupported:
        raise TaskDefinitionError(
            f"{where}: parameter {p.name!r} is annotated {_shown(ann)}, which aioqueue cannot "
            f"check against JSON arguments; supported: {SUPPORTED}"
        ) from None
    prefix = _STARS.get(p.kind, "")
    required = not prefix and p.default is _P.empty
    default = None if p.default is _P.empty else p.default
    shown = default if _jsonable(default) else repr(default)
    return Param(prefix + p.name, t.display, required, shown, p.kind, _check(t), t.schema)


def _hints(fn: Callable[..., Any], where: str) -> dict[str, Any]:
    source = fn if inspect.isroutine(fn) else getattr(fn, "func", type(fn).__call__)
    try:
        return typing.get_type_hints(source)
    except Exception as exc:
        raise TaskDefinitionError(f"{where}: cannot resolve its annotations: {exc}") from exc


def _context(where: str, params: list[inspect.Parameter], hints: dict[str, Any]) -> str | None:
    """The name of the context parameter, if the first one is it; checks the others are not."""
    for i, p in enumerate(params):
        if not (_is_context(hints.get(p.name)) or (i == 0 and p.name == "ctx")):
            continue
        if i > 0:
            raise TaskDefinitionError(f"{where}: the context parameter {p.name!r} must come first")
        if p.kind not in _POSITIONAL:
            raise TaskDefinitionError(
                f"{where}: the context parameter {p.name!r} must be positional"
            )
        return p.name
    return None


def _too_many(most: int, got: int) -> str:
    if most == 0:
        return f"takes no positional arguments, got {got}"
    return f"takes at most {most} positional argument{'s' if most > 1 else ''}, got {got}"


class Signature:
    """The checked parameters of a task function."""

    __slots__ = ("_by_name", "_detail", "_kwargs", "_positional", "_star", "context", "params")

    def __init__(self, name: str, params: tuple[Param, ...], context: str | None = None) -> None:
        self.params = params
        self.context = context
        self._detail = f"invalid arguments for task {name!r}"
        self._positional = tuple(p for p in params if p.kind in _POSITIONAL)
        self._by_name = {
            p.name: p for p in params if p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
        }
        self._star = next((p for p in params if p.kind is _P.VAR_POSITIONAL), None)
        self._kwargs = next((p for p in params if p.kind is _P.VAR_KEYWORD), None)

    @property
    def takes_context(self) -> bool:
        return self.context is not None

    def __repr__(self) -> str:
        return f"<Signature ({', '.join(p.name for p in self.params)}) context={self.context}>"

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Signature:
        """Read `fn` once; raises `TaskDefinitionError` for a parameter that cannot be checked."""
        where = f"task function {getattr(fn, '__qualname__', repr(fn))}"
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError) as exc:
            raise TaskDefinitionError(f"{where}: cannot read its signature: {exc}") from exc
        hints = _hints(fn, where)
        context = _context(where, params, hints)
        if context is not None:
            params = params[1:]
        checked = tuple(_param(where, p, hints.get(p.name, _P.empty)) for p in params)
        return cls(getattr(fn, "__name__", repr(fn)), checked, context)

    def describe(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.params]

    def args_schema(self) -> dict[str, Any]:
        """The JSON Schema (2020-12) of the `args` that `bind()` accepts: exactly the same set."""
        forms: list[dict[str, Any]] = []
        if not any(p.required and p.kind is _P.POSITIONAL_ONLY for p in self.params):
            forms.append(self._object_schema())
        if not any(p.required and p.kind is _P.KEYWORD_ONLY for p in self.params):
            forms.append(self._array_schema())
        if not any(p.required for p in self.params):
            forms.append({"type": "null"})
        return {"anyOf": forms} if forms else {"not": {}}

    def _object_schema(self) -> dict[str, Any]:
        # Names that may not be used as keys (positional-only parameters, the context) are
        # `false`, so that even a `**kwargs` does not take them.
        properties: dict[str, Any] = {}
        for p in self.params:
            if p.kind is _P.POSITIONAL_ONLY:
                properties[p.name] = False
            elif p.kind is not _P.VAR_POSITIONAL and p.kind is not _P.VAR_KEYWORD:
                properties[p.name] = dict(p.schema)
        if self.context is not None:
            properties[self.context] = False
        return {
            "type": "object",
            "properties": properties,
            "required": [p.name for p in self.params if p.required],
            "additionalProperties": dict(self._kwargs.schema) if self._kwargs else False,
        }

    def _array_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "array",
            "items": dict(self._star.schema) if self._star else False,
            "minItems": sum(p.required for p in self._positional),
        }
        if self._positional:  # an empty `prefixItems` is not valid JSON Schema
            schema["prefixItems"] = [dict(p.schema) for p in self._positional]
        return schema

    def bind(self, args: object) -> tuple[list[Any], dict[str, Any]]:
        """`(positional, keyword)` to call the function with (after the context, if any)."""
        errors = _Errors()
        positional: list[Any] = []
        keyword: dict[str, Any] = {}
        try:
            if isinstance(args, list):
                positional = self._bind_array(args, errors)
            elif args is None or isinstance(args, dict):
                keyword = self._bind_object(args or {}, errors)
            else:
                expected = f"expected an object, an array or null, got {_got(args)}"
                errors.append(FieldError("args", expected))
        except _TooManyErrors:
            detail = f"{self._detail}; checking stopped after the first {MAX_ERRORS} errors"
            raise InvalidRequest(detail, list(errors)) from None
        if errors:
            raise InvalidRequest(self._detail, list(errors))
        return positional, keyword

    def _bind_object(self, args: dict[str, Any], errors: list[FieldError]) -> dict[str, Any]:
        for key, value in args.items():
            path = f"args.{key}"
            p = self._by_name.get(key) or self._kwargs
            if key == self.context:
                errors.append(FieldError(path, "reserved for the task context"))
            elif p is None:
                errors.append(FieldError(path, "unknown argument"))
            elif p.kind is _P.POSITIONAL_ONLY:
                errors.append(FieldError(path, "positional-only, pass it in an array"))
            else:
                p.check(value, path, errors)
        for p in self.params:
            if p.required and p.name not in args:
                message = (
                    "required"
                    if p.kind is not _P.POSITIONAL_ONLY
                    else "positional-only, pass it in an array"
                )
                errors.append(FieldError(f"args.{p.name}", message))
        return dict(args)

    def _bind_array(self, args: list[Any], errors: list[FieldError]) -> list[Any]:
        positional = self._positional
        for i, value in enumerate(args):
            p = positional[i] if i < len(positional) else self._star
            if p is None:
                errors.append(FieldError("args", _too_many(len(positional), len(args))))
                break
            p.check(value, f"args[{i}]", errors)
        for i in range(len(args), len(positional)):
            if positional[i].required:
                errors.append(FieldError(f"args[{i}]", f"required ({positional[i].name})"))
        for p in self.params:
            if p.required and p.kind is _P.KEYWORD_ONLY:
                errors.append(FieldError(f"args.{p.name}", "keyword-only, pass it in an object"))
        return list(args)
