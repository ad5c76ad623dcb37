"""Topic names and patterns: the rules of CONTRACT §6."""

from __future__ import annotations

import pytest

from aioqueue.errors import FieldError, InvalidRequest
from aioqueue.topics import MAX_BYTES, check_pattern, check_topic

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
