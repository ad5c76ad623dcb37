"""Topic names and patterns: what clients may send (CONTRACT §6).

`check_topic` and `check_pattern` say what aioqueue *accepts*: 1 to 255 bytes (UTF-8) of
dot-separated words of `[A-Za-z0-9_-]+`; a pattern also takes `*` (exactly one word) and `#`
(zero or more words), each as a whole word. Empty words (`a..b`, `.a`, `a.`, and the empty
string) are refused in both, since a contract word has at least one character: a topic name
with an empty word is almost always a client's string-building bug, and refusing it now keeps
the choice open (allowing later breaks no client; refusing later would).

No I/O here.
"""

from __future__ import annotations

import re

from aioqueue.errors import FieldError, InvalidRequest

#: A routing key is an AMQP short string: at most 255 bytes. A longer topic could never be
#: published through RabbitMQ, so the contract caps names (and patterns) there.
MAX_BYTES = 255

_WORD = re.compile(r"[A-Za-z0-9_-]+")
_WILDCARDS = frozenset({"*", "#"})
#: How much of a bad value a message quotes: enough to recognise it, never a 255-byte echo.
_QUOTE = 40


def check_topic(name: str, *, field: str = "topic") -> None:
    """Raise InvalidRequest, naming `field`, unless `name` is a topic name per CONTRACT §6.

    `field` is where the caller read the name from (`topic` in a publish): the error says so.
    """
    _check(name, field, "topic", wildcards=False)


def check_pattern(pattern: str, *, field: str = "pattern") -> None:
    """Raise InvalidRequest, naming `field`, unless `pattern` is a topic pattern per CONTRACT §6.

    `field` is where the caller read the pattern from (`channel` in a `topic:PATTERN`
    subscribe, a scope in a token): the error says so.
    """
    _check(pattern, field, "pattern", wildcards=True)


def _check(text: str, field: str, kind: str, *, wildcards: bool) -> None:
    problem = _problem(text, wildcards=wildcards)
    if problem is not None:
        raise InvalidRequest(
            f"invalid {kind} {_quote(text)}: {problem}", [FieldError(field, problem)]
        )


def _problem(text: str, *, wildcards: bool) -> str | None:
    """What is wrong with `text` as a name (or a pattern, with `wildcards`), or None."""
    if not text:
        return f"empty; expected 1 to {MAX_BYTES} bytes of dot-separated words"
    # surrogatepass: a lone surrogate (a broken \u escape) is refused below as a bad
    # character, not raised here as a UnicodeEncodeError.
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        return f"{size} bytes long in UTF-8; at most {MAX_BYTES}"
    for index, word in enumerate(text.split("."), start=1):
        problem = _word_problem(word, wildcards=wildcards)
        if problem is not None:
            return f"word {index} {problem}"
    return None


def _word_problem(word: str, *, wildcards: bool) -> str | None:
    if _WORD.fullmatch(word):
        return None
    if not word:
        return "is empty: words are joined by single dots, with none at either end"
    if word in _WILDCARDS:
        return None if wildcards else f"is {word!r}, a wildcard: only patterns have them"
    if wildcards and any(c in _WILDCARDS for c in word):
        return f"{_quote(word)} has '*' or '#' inside: a wildcard is a whole word"
    bad = next(c for c in word if not _WORD.fullmatch(c))
    return f"{_quote(word)} has {bad!r}: a word is letters A-Z a-z, digits, '_' and '-'"


def _quote(text: str) -> str:
    return repr(text) if len(text) <= _QUOTE else repr(text[:_QUOTE]) + "…"
