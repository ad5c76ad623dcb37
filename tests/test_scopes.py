"""Scopes: parsing, and the rule that says whether a topic scope covers a subscription pattern.

The rule (scopes.py) is decided on the patterns alone. Hypothesis checks it against brute force:
for random small patterns, every topic of a few words over the patterns' own words (and one
other word) that the subscription matches must be matched by a scope said to cover it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioqueue.scopes import EVERYTHING, Scopes, covers, scope_problem
from aioqueue.topics import matches


@pytest.mark.parametrize(
    ("scope", "pattern", "covered"),
    [
        ("orders.#", "orders.#", True),
        ("orders.#", "orders.eu.*", True),
        ("orders.#", "orders", True),  # `#` is zero words too
        ("orders.eu.*", "orders.#", False),  # the edge: would deliver orders.us.new
        ("orders.eu.*", "orders.eu.*", True),
        ("orders.eu.*", "orders.eu.paid", True),
        ("orders.eu.paid", "orders.eu.*", False),
        ("orders.*", "orders", False),  # `*` is exactly one word
        ("orders.*.*", "orders.*", False),
        ("#", "#", True),
        ("#", "a.*.b.#", True),
        ("*", "#", False),  # `#` also matches no word, and two
        ("*.#", "#.*", True),  # both "one or more words"
        ("#.*", "*.#", True),
        ("#.#", "#", True),
        ("*.#", "#", False),
        ("a.#.b", "a.x.#.b", True),
        ("a.#.b", "a.#", False),
        ("a.#.c", "a.b.#.c", True),
        ("a.*.#", "a.b", True),
        ("a.*.#", "a", False),
        ("#.z", "#.y.z", True),
        ("#.z", "#.*", False),
        ("*.#", "#.a", False),  # covered in fact; refused by the rule (see scopes.py)
    ],
)
def test_covers(scope: str, pattern: str, covered: bool) -> None:
    assert covers(scope, pattern) is covered


WORDS = st.sampled_from(["a", "b", "*", "#"])
PATTERNS = st.lists(WORDS, min_size=1, max_size=4).map(".".join)


def _topics(alphabet: list[str], longest: int) -> list[str]:
    return [
        ".".join(words)
        for size in range(longest + 1)
        for words in itertools.product(alphabet, repeat=size)
    ]


#: Every routing key of up to 6 words over a, b and a word neither pattern names; and the empty
#: one, which RabbitMQ routes to `#` (no topic name is empty, so this costs only `*.#` covering
#: `#`: the rule says no).
TOPICS = _topics(["a", "b", "z"], 6)


@settings(max_examples=400, deadline=None)
@given(scope=PATTERNS, pattern=PATTERNS)
def test_covers_never_allows_a_topic_the_scope_does_not_match(scope: str, pattern: str) -> None:
    """Sound: a covered pattern delivers no topic (of up to 6 words) the scope does not match."""
    if covers(scope, pattern):
        leaked = [t for t in TOPICS if matches(pattern, t) and not matches(scope, t)]
        assert not leaked, leaked[:5]


@settings(max_examples=400, deadline=None)
@given(scope=PATTERNS, pattern=PATTERNS)
def test_covers_allows_what_brute_force_says_is_covered(scope: str, pattern: str) -> None:
    """Complete where either pattern has no `#`, as far as routing keys of up to 6 words tell
    (the patterns have at most 4 words, so a difference shows within 6). Where both have one,
    the rule may refuse a pattern that is covered: a subscription's `#` must sit inside a
    scope's `#` (`*.#` does not cover `#.a`, though every key ending in `a` has a word)."""
    if "#" in scope.split(".") and "#" in pattern.split("."):
        return
    expected = all(matches(scope, t) for t in TOPICS if matches(pattern, t))
    assert covers(scope, pattern) is expected


@pytest.mark.parametrize(
    ("scope", "problem"),
    [
        ("jobs:submit", None),
        ("jobs:submit:resize", None),
        ("jobs:submit:", "names no task"),
        ("jobs:read", None),
        ("jobs:admin", None),
        ("jobs:write", "unknown scope"),
        ("topics:publish:orders.*", None),
        ("topics:subscribe:#", None),
        ("topics:subscribe:", "empty"),
        ("topics:subscribe:a..b", "is empty"),
        ("topics:publish:a.b*", "'*' or '#' inside"),
        (7, "a scope is a string"),
    ],
)
def test_scope_problem(scope: object, problem: str | None) -> None:
    found = scope_problem(scope)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_parse_keeps_the_scopes_it_knows_and_skips_others() -> None:
    scopes = Scopes.parse(
        ["jobs:submit:resize", "jobs:read", "openid", "topics:publish:a.*", "topics:subscribe:b.#"]
    )
    assert scopes.may_submit("resize") and not scopes.may_submit("delete_everything")
    assert scopes.read and not scopes.admin
    assert scopes.may_publish("a.x") and not scopes.may_publish("a.x.y")
    assert scopes.may_subscribe("b.c.*") and not scopes.may_subscribe("#")


def test_admin_submits_anything_and_everything_is_everything() -> None:
    assert Scopes.parse(["jobs:admin"]).may_submit("anything")
    assert EVERYTHING.may_submit("x") and EVERYTHING.may_publish("a.b")
    assert EVERYTHING.may_subscribe("#") and EVERYTHING.admin and EVERYTHING.read
