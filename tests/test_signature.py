"""Argument checking against a task's signature (CONTRACT §1), as done at submit time."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from aioqueue import Context, InvalidRequest, SyncContext, TaskDefinitionError
from aioqueue.signature import Signature


def fields(fn: Any, args: object) -> dict[str, str]:
    """The bad fields `bind` reports, field -> message; {} when the arguments are good."""
    try:
        Signature.of(fn).bind(args)
    except InvalidRequest as exc:
        return {error.field: error.message for error in exc.errors}
    return {}


def typed(
    i: int = 0,
    f: float = 0.0,
    b: bool = False,
    s: str = "",
    items: list[int] | None = None,
    weights: dict[str, float] | None = None,
    anything: Any = None,
    untyped=None,
    mode: Literal["fast", "slow"] = "fast",
) -> None: ...


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        pytest.param({"i": 1}, {}, id="int-ok"),
        pytest.param({"i": True}, {"args.i": "expected an integer, got a boolean"}, id="int-rejects-bool"),
        pytest.param({"i": 2.0}, {"args.i": "expected an integer, got a float"}, id="int-rejects-float"),
        pytest.param({"f": 1}, {}, id="float-takes-int"),
        pytest.param({"f": 1.5}, {}, id="float-ok"),
        pytest.param({"f": True}, {"args.f": "expected a number, got a boolean"}, id="float-rejects-bool"),
        pytest.param({"b": 1}, {"args.b": "expected a boolean, got an integer"}, id="bool-rejects-int"),
        pytest.param({"s": None}, {"args.s": "expected a string, got null"}, id="str-rejects-null"),
        pytest.param({"items": [1, 2]}, {}, id="list-ok"),
        pytest.param({"items": None}, {}, id="optional-takes-null"),
        pytest.param({"items": [1, "x"]}, {"args.items[1]": "expected an integer, got a string"}, id="list-item"),
        pytest.param({"weights": {"a": 1, "b": 0.5}}, {}, id="dict-ok"),
        pytest.param({"weights": {"a": "x"}}, {"args.weights.a": "expected a number, got a string"}, id="dict-value"),
        pytest.param({"anything": {"deep": [1]}}, {}, id="any"),
        pytest.param({"untyped": [None]}, {}, id="unannotated"),
        pytest.param({"mode": "slow"}, {}, id="literal-ok"),
    ],
)  # fmt: skip
def test_types_follow_the_contract(args: dict[str, Any], bad: dict[str, str]) -> None:
    assert fields(typed, args) == bad


def test_a_literal_refuses_other_values() -> None:
    assert list(fields(typed, {"mode": "medium"})) == ["args.mode"]


def add(a: int, b: int = 0) -> int:
    return a + b


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        pytest.param(None, {"args.a": "required"}, id="null-means-none"),
        pytest.param([1, 2], {}, id="array-positional"),
        pytest.param({"a": 1}, {}, id="object-keyword"),
        pytest.param({"b": 1}, {"args.a": "required"}, id="missing"),
        pytest.param({"a": 1, "c": 2}, {"args.c": "unknown argument"}, id="unknown"),
        pytest.param([1, 2, 3], {"args": "takes at most 2 positional arguments, got 3"}, id="too-many"),
        pytest.param("1", {"args": "expected an object, an array or null, got a string"}, id="bad-container"),
        pytest.param({"a": "x", "b": "y"}, {"args.a": "expected an integer, got a string", "args.b": "expected an integer, got a string"}, id="every-fault"),
    ],
)  # fmt: skip
def test_containers_and_counts(args: object, bad: dict[str, str]) -> None:
    assert fields(add, args) == bad


def test_bind_returns_what_to_call_with() -> None:
    signature = Signature.of(add)
    assert signature.bind([1, 2]) == ([1, 2], {})
    assert signature.bind({"a": 1}) == ([], {"a": 1})
    with pytest.raises(InvalidRequest):
        signature.bind(None)


def positional_only(a: int, /, *, b: int) -> None: ...


def test_positional_only_and_keyword_only_are_enforced() -> None:
    assert fields(positional_only, {"a": 1, "b": 2}) == {
        "args.a": "positional-only, pass it in an array"
    }
    assert fields(positional_only, [1]) == {"args.b": "keyword-only, pass it in an object"}


def star(*values: int, **options: str) -> None: ...


def test_star_parameters_take_the_extras_and_check_them() -> None:
    assert fields(star, [1, 2, 3]) == {}
    assert fields(star, [1, "x"]) == {"args[1]": "expected an integer, got a string"}
    assert fields(star, {"colour": "red"}) == {}
    assert fields(star, {"colour": 1}) == {"args.colour": "expected a string, got an integer"}


async def with_async_context(ctx: Context, n: int) -> None: ...


def with_sync_context(job: SyncContext, n: int) -> None: ...


def with_ctx_by_name(ctx, n: int) -> None: ...


@pytest.mark.parametrize(
    ("fn", "name"),
    [(with_async_context, "ctx"), (with_sync_context, "job"), (with_ctx_by_name, "ctx")],
)
def test_the_context_parameter_is_not_an_argument(fn: Any, name: str) -> None:
    signature = Signature.of(fn)
    assert signature.takes_context
    assert [p.name for p in signature.params] == ["n"]
    assert fields(fn, [1]) == {}
    assert fields(fn, {name: 1, "n": 1}) == {f"args.{name}": "reserved for the task context"}


def test_string_annotations_are_resolved() -> None:
    namespace: dict[str, Any] = {}
    exec("def f(a: 'int', b: 'list[str] | None' = None) -> None: ...", namespace)
    assert fields(namespace["f"], {"a": 1, "b": ["x"]}) == {}
    assert list(fields(namespace["f"], {"a": "1"})) == ["args.a"]


class Point: ...


def takes_point(p: Point) -> None: ...


def takes_set(s: set[int]) -> None: ...


@pytest.mark.parametrize("fn", [takes_point, takes_set])
def test_an_annotation_that_cannot_be_checked_is_refused_at_definition(fn: Any) -> None:
    with pytest.raises(TaskDefinitionError, match="cannot check"):
        Signature.of(fn)


def test_describe_shows_types_requirement_and_defaults() -> None:
    def f(
        url: str, width: int = 100, tags: list[str] | None = None, when: object = Point
    ) -> None: ...

    described = Signature.of(f).describe()
    assert described[:3] == [
        {"name": "url", "type": "str", "required": True, "default": None},
        {"name": "width", "type": "int", "required": False, "default": 100},
        {"name": "tags", "type": "list[str] | None", "required": False, "default": None},
    ]
    assert described[3]["default"] == repr(Point)  # not JSON: shown as its repr
