"""Topic names and patterns: the rules of CONTRACT §6, and a matcher that routes as RabbitMQ does.

The matcher is checked twice: against a table of expected answers (no broker), and against a
real topic exchange on the session's RabbitMQ node, on that table's patterns and keys and on
random ones, empty words included, which the rules refuse but the matcher must still get right.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence

import aio_pika
import pytest

from aioqueue.errors import FieldError, InvalidRequest
from aioqueue.topics import (
    MAX_BYTES,
    check_pattern,
    check_topic,
    compile_pattern,
    matches,
    split_words,
)

GOOD_TOPICS = [
    pytest.param("a", id="one-letter"),
    pytest.param("orders", id="one-word"),
    pytest.param("orders.eu.created", id="three-words"),
    pytest.param("Order_2-b.X9", id="every-character-class"),
    pytest.param("-._", id="punctuation-only-words"),
    pytest.param("a" * MAX_BYTES, id="255-bytes"),
    pytest.param(".".join(["a"] * 128), id="128-words-255-bytes"),
]

BAD_TOPICS = [
    pytest.param("", "empty", id="empty"),
    pytest.param("a" * (MAX_BYTES + 1), "256 bytes long", id="256-bytes"),
    # 128 characters but 256 bytes: the limit is on UTF-8 bytes, not characters...
    pytest.param("é" * 128, "256 bytes long", id="multibyte-256-bytes"),
    pytest.param("a." + "€" * 85, "257 bytes long", id="multibyte-257-bytes"),
    # ...and at 254 bytes the same letter is refused for what it is, not for its size.
    pytest.param("é" * 127, "word 1 'ééé", id="multibyte-254-bytes"),
    pytest.param(".", "word 1 is empty", id="lone-dot"),
    pytest.param("..", "word 1 is empty", id="two-dots"),
    pytest.param(".a", "word 1 is empty", id="leading-dot"),
    pytest.param("a.", "word 2 is empty", id="trailing-dot"),
    pytest.param("a..b", "word 2 is empty", id="double-dot"),
    pytest.param("*", "word 1 is '*', a wildcard", id="star"),
    pytest.param("orders.#", "word 2 is '#', a wildcard", id="hash"),
    pytest.param("a*", "word 1 'a*' has '*'", id="star-in-word"),
    pytest.param("a.b#", "word 2 'b#' has '#'", id="hash-in-word"),
    pytest.param("a b", "word 1 'a b' has ' '", id="space"),
    pytest.param("a/b", "has '/'", id="slash"),
    pytest.param("topic:a", "has ':'", id="colon"),
    pytest.param("café", "has 'é'", id="non-ascii-letter"),
    pytest.param("a.\n", "word 2 '\\n' has '\\n'", id="newline"),
    pytest.param("a\x00", "has '\\x00'", id="nul"),
    pytest.param("a\ud800", "has '\\ud800'", id="lone-surrogate"),
]

GOOD_PATTERNS = [
    *GOOD_TOPICS,
    pytest.param("*", id="star"),
    pytest.param("#", id="hash"),
    pytest.param("orders.*", id="word-star"),
    pytest.param("orders.#", id="word-hash"),
    pytest.param("#.created", id="hash-word"),
    pytest.param("a.#.b", id="hash-in-the-middle"),
    pytest.param("*.*", id="star-star"),
    pytest.param("#.#", id="hash-hash"),
    pytest.param("*.#.*", id="star-hash-star"),
    pytest.param(".".join(["#"] * 128), id="128-hashes-255-bytes"),
]

BAD_PATTERNS = [
    pytest.param("", "empty", id="empty"),
    pytest.param("#" * (MAX_BYTES + 1), "256 bytes long", id="256-bytes"),
    pytest.param(".".join(["*"] * 128) + ".a", "257 bytes long", id="257-bytes-of-wildcards"),
    pytest.param("*." + "ü" * 127, "256 bytes long", id="multibyte-256-bytes"),
    pytest.param(".", "word 1 is empty", id="lone-dot"),
    pytest.param(".#", "word 1 is empty", id="leading-dot"),
    pytest.param("#.", "word 2 is empty", id="trailing-dot"),
    pytest.param("a..*", "word 2 is empty", id="double-dot"),
    pytest.param("a*", "word 1 'a*' has '*' or '#' inside", id="star-in-word"),
    pytest.param("*a", "word 1 '*a' has '*' or '#' inside", id="star-before-letter"),
    pytest.param("orders.a#", "word 2 'a#' has '*' or '#' inside", id="hash-in-word"),
    pytest.param("**", "word 1 '**' has '*' or '#' inside", id="two-stars"),
    pytest.param("#*", "word 1 '#*' has '*' or '#' inside", id="hash-star"),
    pytest.param("a.b*c.d", "word 2 'b*c' has '*' or '#' inside", id="star-mid-word"),
    pytest.param("orders.*.a b", "word 3 'a b' has ' '", id="space"),
    pytest.param("orders.>", "word 2 '>' has '>'", id="nats-wildcard"),
    pytest.param("orders.+", "has '+'", id="mqtt-wildcard"),
    pytest.param("ü.*", "word 1 'ü' has 'ü'", id="non-ascii-letter"),
]


@pytest.mark.parametrize("name", GOOD_TOPICS)
def test_a_topic_name_of_dot_separated_words_is_accepted(name: str) -> None:
    """1 to 255 bytes of non-empty words of letters, digits, '_' and '-', joined by dots."""
    check_topic(name)


@pytest.mark.parametrize(("name", "says"), BAD_TOPICS)
def test_a_bad_topic_name_is_refused_naming_the_field_and_the_fault(name: str, says: str) -> None:
    """Each fault is one InvalidRequest with one FieldError on `topic` that says what is wrong."""
    with pytest.raises(InvalidRequest) as caught:
        check_topic(name)
    (error,) = caught.value.errors
    assert error.field == "topic"
    assert says in error.message
    assert caught.value.detail.startswith("invalid topic ")
    assert error.message in caught.value.detail


@pytest.mark.parametrize("pattern", GOOD_PATTERNS)
def test_a_pattern_of_words_and_whole_word_wildcards_is_accepted(pattern: str) -> None:
    """A topic name is a pattern too (matching itself only); `*` and `#` may be any whole word."""
    check_pattern(pattern)


@pytest.mark.parametrize(("pattern", "says"), BAD_PATTERNS)
def test_a_bad_pattern_is_refused_naming_the_field_and_the_fault(pattern: str, says: str) -> None:
    """Each fault is one InvalidRequest with one FieldError on `pattern` that says what is wrong."""
    with pytest.raises(InvalidRequest) as caught:
        check_pattern(pattern)
    (error,) = caught.value.errors
    assert error.field == "pattern"
    assert says in error.message
    assert caught.value.detail.startswith("invalid pattern ")


def test_the_error_names_the_field_the_caller_read() -> None:
    """A pattern read from a websocket `channel` (or a name from a URL) is reported there."""
    with pytest.raises(InvalidRequest) as caught:
        check_pattern("a..b", field="channel")
    assert caught.value.errors == [
        FieldError(
            "channel", "word 2 is empty: words are joined by single dots, with none at either end"
        )
    ]
    with pytest.raises(InvalidRequest) as caught:
        check_topic("a*", field="path.topic")
    assert [e.field for e in caught.value.errors] == ["path.topic"]


def test_a_long_bad_value_is_quoted_short() -> None:
    """The message quotes enough of a long value to recognise it, never all 255 bytes."""
    with pytest.raises(InvalidRequest) as caught:
        check_topic("x" * 200 + " ")
    assert len(caught.value.detail) < 200
    assert "'" + "x" * 40 + "'…" in caught.value.detail


@pytest.mark.parametrize(
    ("key", "words"),
    [
        pytest.param("", [], id="empty-is-no-word"),
        pytest.param(".", ["", ""], id="lone-dot-is-two-empty-words"),
        pytest.param("a", ["a"], id="one-word"),
        pytest.param("a..b", ["a", "", "b"], id="double-dot"),
        pytest.param(".a.", ["", "a", ""], id="dots-at-both-ends"),
    ],
)
def test_keys_split_into_words_on_every_dot(key: str, words: list[str]) -> None:
    """As RabbitMQ splits: every dot separates two words, and the empty key has none."""
    assert split_words(key) == words


#: (pattern, key, routed?), as a RabbitMQ topic exchange routes; the broker test below checks
#: these patterns against all these keys, so its cross product covers more than the rows.
MATCH_CASES = [
    # Plain words: equal, word for word, case included.
    ("a", "a", True),
    ("a", "b", False),
    ("a", "A", False),
    ("a", "a.b", False),
    ("a.b", "a.b", True),
    ("a.b", "a", False),
    ("a.b", "b.a", False),
    ("orders.eu.created", "orders.eu.created", True),
    ("orders.eu.created", "orders.eu", False),
    # `*`: exactly one word, against zero, one and several.
    ("*", "", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("orders.*", "orders", False),
    ("orders.*", "orders.eu", True),
    ("orders.*", "orders.eu.created", False),
    ("*.*", "a", False),
    ("*.*", "a.b", True),
    ("*.*", "a.b.c", False),
    # `#`: zero or more words, alone, at the start, in the middle, at the end.
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#.a", "a", True),
    ("#.a", "b.a", True),
    ("#.a", "b.c.a", True),
    ("#.a", "a.b", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.b.c", False),
    ("a.#.b", "a", False),
    ("a.#.b", "b", False),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b.a", False),
    ("a.#", "", False),
    ("#.#", "", True),
    ("#.#", "a", True),
    ("#.#", "a.b.c", True),
    ("#.a.#", "a", True),
    ("#.a.#", "b.a.c", True),
    ("#.a.#", "b", False),
    # A head and a tail never share a word.
    ("a.#.a", "a", False),
    ("a.#.a", "a.a", True),
    ("#.a.#.a.#.b", "a.a.b", True),
    ("#.a.#.a.#.b", "x.a.y.a.z.b", True),
    ("#.a.#.a.#.b", "a.b.a", False),
    ("#.a.#.a.#.b", "a.b", False),
    # Both wildcards.
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("a.*.#", "b.a", False),
    ("*.#.*", "", False),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b", True),
    ("*.#.*", "a.b.c", True),
    ("#.*", "", False),
    ("#.*", "a", True),
    ("*.#", "", False),
    ("*.#", "a", True),
    # Empty words are words: the empty key is none, "." is two, "a..b" three.
    ("", "", True),
    ("", "a", False),
    ("", ".", False),
    ("*", ".", False),
    ("*.*", ".", True),
    ("#", ".", True),
    ("a..b", "a..b", True),
    ("a..b", "a.b", False),
    ("a.b", "a..b", False),
    ("a.*.b", "a..b", True),
    ("a.#.b", "a..b", True),
    (".a", ".a", True),
    (".a", "a", False),
    ("*.a", ".a", True),
    ("#.a", ".a", True),
    ("a", ".a", False),
    ("a.", "a.", True),
    ("a.", "a", False),
    ("a.*", "a.", True),
    ("a.#", "a.", True),
    ("a", "a.", False),
    # In a routing key, `*` and `#` are plain words.
    ("*", "*", True),
    ("#", "#", True),
    ("a", "*", False),
    ("a", "#", False),
    ("a.#", "a.#", True),
    ("#.b", "#", False),
    ("*.b", "*", False),
]


@pytest.mark.parametrize(
    ("pattern", "key", "routed"),
    [pytest.param(p, k, r, id=f"{p!r}-{k!r}") for p, k, r in MATCH_CASES],
)
def test_the_matcher_routes_as_the_table_says(pattern: str, key: str, routed: bool) -> None:
    """`*` is one word, `#` zero or more, empty words are words, and the empty key has none."""
    assert compile_pattern(pattern).matches(key) is routed
    assert matches(pattern, key) is routed
    assert compile_pattern(pattern).matches_words(split_words(key)) is routed


def test_many_wildcards_on_a_long_key_answer_at_once() -> None:
    """No backtracking: a regex would try every share of 127 words among 6 `#` before saying no."""
    matcher = compile_pattern("#.a.#.a.#.a.#.a.#.a.#.b")
    key = ".".join(["a"] * 127)
    started = time.perf_counter()
    assert not matcher.matches(key)
    assert matcher.matches(key + ".b")
    assert time.perf_counter() - started < 0.5  # microseconds, in fact: a generous bound


def test_a_matcher_shows_its_pattern() -> None:
    assert repr(compile_pattern("orders.*")) == "Matcher('orders.*')"


# -- against RabbitMQ ----------------------------------------------------------------------

ROUTE_TIMEOUT = 30.0  # seconds for a whole round: declare, bind, publish, drain


async def route(
    url: str, prefix: str, patterns: Sequence[str], keys: Sequence[str]
) -> set[tuple[str, str]]:
    """Every (pattern, key) that a RabbitMQ topic exchange routes, from one round on the broker.

    One queue bound per pattern, each key published once with a publisher confirm, then every
    queue drained with basic.get. A confirm comes once the message sits in every queue it was
    routed to, so after the last confirm an empty basic.get means no more: no sleeping.
    """
    routed: set[tuple[str, str]] = set()
    async with asyncio.timeout(ROUTE_TIMEOUT):
        connection = await aio_pika.connect(url, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                f"{prefix}.topics", aio_pika.ExchangeType.TOPIC, auto_delete=True
            )
            queues = []
            for index, pattern in enumerate(patterns):
                queue = await channel.declare_queue(
                    f"{prefix}.topic.{index}", exclusive=True, auto_delete=True
                )
                await queue.bind(exchange, routing_key=pattern)
                queues.append((pattern, queue))
            # Not mandatory: a key no pattern takes is dropped and simply confirmed.
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(str(index).encode()), key, mandatory=False, timeout=10
                    )
                    for index, key in enumerate(keys)
                )
            )
            for pattern, queue in queues:
                while (message := await queue.get(no_ack=True, fail=False, timeout=10)) is not None:
                    key = keys[int(message.body)]
                    assert (pattern, key) not in routed, f"{key!r} came twice to {pattern!r}"
                    routed.add((pattern, key))
            await exchange.delete()
    return routed


def disagreements(
    patterns: Sequence[str], keys: Sequence[str], routed: set[tuple[str, str]]
) -> list[tuple[str, str, bool]]:
    """(pattern, key, what the broker did) wherever the matcher says otherwise."""
    wrong = []
    for pattern in patterns:
        matcher = compile_pattern(pattern)
        for key in keys:
            by_broker = (pattern, key) in routed
            if matcher.matches(key) is not by_broker:
                wrong.append((pattern, key, by_broker))
    return wrong


def unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


@pytest.mark.amqp
async def test_the_matcher_agrees_with_a_rabbitmq_topic_exchange(
    amqp_url: str, prefix: str
) -> None:
    """On every pattern of the table against every key of it: empty words, both wildcards anywhere."""
    patterns = unique([p for p, _, _ in MATCH_CASES])
    keys = unique([k for _, k, _ in MATCH_CASES])
    routed = await route(amqp_url, prefix, patterns, keys)
    assert disagreements(patterns, keys, routed) == []
    # And so the table's own answers are the broker's (not only the matcher's).
    assert [(p, k) for p, k, r in MATCH_CASES if ((p, k) in routed) is not r] == []


@pytest.mark.amqp
async def test_the_matcher_agrees_with_rabbitmq_on_random_patterns_and_keys(
    amqp_url: str, prefix: str
) -> None:
    """Random patterns and keys of up to 4 words over a, b, the empty word, `*` and `#`."""
    rng = random.Random(8)  # issue 8; fixed, so a failure names the same pairs on every run

    def draw(alphabet: Sequence[str]) -> str:
        return ".".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))

    patterns = unique([draw(["a", "b", "", "*", "#"]) for _ in range(60)])
    keys = unique([draw(["a", "b", ""]) for _ in range(60)])
    # The draw meets what the table's cases are about: empty words and both wildcards.
    assert {"", "*", "#"} <= set(itertools.chain.from_iterable(map(split_words, patterns)))
    assert "" in itertools.chain.from_iterable(map(split_words, keys))
    routed = await route(amqp_url, prefix, patterns, keys)
    assert disagreements(patterns, keys, routed) == []
    pairs = len(patterns) * len(keys)
    assert pairs >= 300, pairs
    # Not a vacuous agreement: the broker routed a fair share of the pairs, and not all of them.
    assert 0.05 * pairs < len(routed) < 0.95 * pairs, (len(routed), pairs)
