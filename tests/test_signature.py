"""Argument checking against a task's signature (CONTRACT §1), as done at submit time."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, TypedDict

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


def optional(
    a: Optional[int],  # noqa: UP045 - the typing spelling must work too
    b: int | str = 0,
    grid: list[list[int]] | None = None,
) -> None: ...


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        pytest.param({"a": None}, {}, id="typing-optional-takes-null"),
        pytest.param({"a": "1"}, {"args.a": "expected an integer or null, got a string"}, id="optional-message"),
        pytest.param({"a": 1, "b": "x"}, {}, id="union-takes-either"),
        pytest.param({"a": 1, "b": 1.5}, {"args.b": "expected an integer or a string, got a float"}, id="union-message"),
        pytest.param({"a": 1, "grid": [[1], [2, "x"]]}, {"args.grid[1][1]": "expected an integer, got a string"}, id="nested-list-path"),
        pytest.param(["x"], {"args[0]": "expected an integer or null, got a string"}, id="positional-path"),
    ],
)  # fmt: skip
def test_optional_union_and_nested_annotations(args: object, bad: dict[str, str]) -> None:
    assert fields(optional, args) == bad


def test_a_literal_names_its_values_in_json() -> None:
    assert fields(typed, {"mode": "medium"}) == {
        "args.mode": 'expected one of "fast", "slow", got a string'
    }


def test_a_literal_int_refuses_true() -> None:
    def level(n: Literal[1, 2]) -> None: ...

    assert fields(level, [1]) == {}
    assert fields(level, [True]) == {"args[0]": "expected one of 1, 2, got a boolean"}


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        pytest.param([1], {"args[1]": "required (b)", "args.d": "keyword-only, pass it in an object"}, id="array-missing"),
        pytest.param({"c": 3, "d": 4}, {"args.a": "positional-only, pass it in an array", "args.b": "positional-only, pass it in an array"}, id="object-lacks-positional-only"),
        pytest.param({"a": 1, "c": 3, "d": 4, "e": 5}, {"args.a": "positional-only, pass it in an array", "args.b": "positional-only, pass it in an array", "args.e": "unknown argument"}, id="object-names-positional-only"),
        pytest.param([1, 2, 3, 4], {"args": "takes at most 3 positional arguments, got 4", "args.d": "keyword-only, pass it in an object"}, id="array-too-long"),
    ],
)  # fmt: skip
def test_parameter_kinds_say_how_to_pass_them(args: object, bad: dict[str, str]) -> None:
    def kinds(a: int, b: int, /, c: int = 0, *, d: int) -> None: ...

    assert fields(kinds, args) == bad


def test_keyword_only_function_takes_no_positional_arguments() -> None:
    def only(*, a: int = 1) -> None: ...

    assert fields(only, [1]) == {"args": "takes no positional arguments, got 1"}
    assert fields(only, {}) == {}


def test_bind_returns_a_new_positional_list() -> None:
    """The runner inserts the context at the front: the job's own args must not change."""
    args = [1, 2]
    positional, _ = Signature.of(add).bind(args)
    positional.insert(0, "ctx")
    assert args == [1, 2]


def test_the_context_is_not_counted_among_positional_arguments() -> None:
    assert fields(with_ctx_by_name, [1, 1]) == {
        "args": "takes at most 1 positional argument, got 2"
    }


def test_the_context_name_is_refused_even_with_star_star_kwargs() -> None:
    def open_ended(ctx, **options: Any) -> None: ...

    assert fields(open_ended, {"ctx": 1}) == {"args.ctx": "reserved for the task context"}
    assert fields(open_ended, {"other": 1}) == {}


def test_sync_and_async_functions_are_read_alike() -> None:
    async def run(n: int) -> None: ...

    def call(n: int) -> None: ...

    assert Signature.of(run).describe() == Signature.of(call).describe()
    assert not Signature.of(run).takes_context


def test_string_annotations_of_the_context_are_resolved() -> None:
    namespace: dict[str, Any] = {"Context": Context}
    exec("async def f(job: 'Context', n: 'int') -> None: ...", namespace)
    signature = Signature.of(namespace["f"])
    assert signature.takes_context and [p.name for p in signature.params] == ["n"]


class Options(TypedDict):
    width: int


def takes_tuple(t: tuple[int, int]) -> None: ...


def takes_typed_dict(o: Options) -> None: ...


def takes_int_keys(d: dict[int, str]) -> None: ...


def takes_float_literal(x: Literal[1.5]) -> None: ...  # type: ignore[valid-type]


def takes_list_of_sets(x: list[set[int]]) -> None: ...


@pytest.mark.parametrize(
    ("fn", "shown"),
    [
        pytest.param(takes_tuple, "tuple[int, int]", id="tuple"),
        pytest.param(takes_typed_dict, "Options", id="typed-dict"),
        pytest.param(takes_int_keys, "dict[int, str]", id="dict-int-keys"),
        pytest.param(takes_float_literal, "Literal[1.5]", id="float-literal"),
        pytest.param(takes_list_of_sets, "list[set[int]]", id="list-of-sets"),
    ],
)
def test_the_refusal_names_function_parameter_annotation_and_what_is_supported(
    fn: Any, shown: str
) -> None:
    with pytest.raises(TaskDefinitionError) as info:
        Signature.of(fn)
    message = str(info.value)
    assert fn.__name__ in message and f"is annotated {shown}," in message
    assert "supported: int, float, bool, str, list, dict" in message


def context_second(n: int, ctx: Context) -> None: ...


def context_keyword_only(*, ctx: SyncContext) -> None: ...


@pytest.mark.parametrize(
    ("fn", "why"),
    [(context_second, "must come first"), (context_keyword_only, "must be positional")],
)
def test_a_misplaced_context_parameter_is_refused(fn: Any, why: str) -> None:
    with pytest.raises(TaskDefinitionError, match=why):
        Signature.of(fn)


def test_describe_is_exact_for_every_kind_of_parameter() -> None:
    def sample(
        ctx: Context,
        url: str,
        /,
        width: int = 100,
        *sizes: int,
        mode: Literal["fast", "slow"] = "fast",
        when: object = Point,
        extra: dict[str, float] | None = None,
        **tags: str,
    ) -> None: ...

    assert Signature.of(sample).describe() == [
        {"name": "url", "type": "str", "required": True, "default": None},
        {"name": "width", "type": "int", "required": False, "default": 100},
        {"name": "*sizes", "type": "int", "required": False, "default": None},
        {"name": "mode", "type": "Literal['fast', 'slow']", "required": False, "default": "fast"},
        {"name": "when", "type": "any", "required": False, "default": repr(Point)},
        {"name": "extra", "type": "dict[str, float] | None", "required": False, "default": None},
        {"name": "**tags", "type": "str", "required": False, "default": None},
    ]


def test_checking_stops_after_fifty_errors() -> None:
    """A body of 500,000 ill-typed items gets 50 errors, at once, not a document of 500,000."""

    def fn(xs: list[int]) -> None: ...

    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as raised:
        Signature.of(fn).bind({"xs": ["a"] * 500_000})
    assert time.perf_counter() - started < 0.5
    assert len(raised.value.errors) == 50
    assert raised.value.errors[0].to_dict() == {
        "field": "args.xs[0]",
        "message": "expected an integer, got a string",
    }
    assert "stopped after the first 50 errors" in raised.value.detail
