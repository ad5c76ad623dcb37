"""Topic names and patterns: what clients may send (CONTRACT §6), and a matcher as RabbitMQ's.

Two concerns, kept apart on purpose:

- `check_topic` and `check_pattern` say what aioqueue *accepts*: 1 to 255 bytes (UTF-8) of
  dot-separated words of `[A-Za-z0-9_-]+`; a pattern also takes `*` (exactly one word) and `#`
  (zero or more words), each as a whole word. Empty words (`a..b`, `.a`, `a.`, and the empty
  string) are refused in both, since a contract word has at least one character: a topic name
  with an empty word is almost always a client's string-building bug, and refusing it now keeps
  the choice open (allowing later breaks no client; refusing later would).
- `compile_pattern` matches exactly as a RabbitMQ topic exchange routes, for *any* binding key
  and routing key, the ones the rules refuse included. The service will match messages itself
  (a `since` replay is answered from retained messages, not by the broker), and what it sends
  must be what a binding on the broker would have sent; `tests/test_topics.py` checks the
  matcher against a real topic exchange on empty words and random keys too.

RabbitMQ's rules, as its topic exchange implements them (and as the tests observe): both keys
are split on every `.`, so `a..b` is three words, the middle one empty, and `.` is two empty
words; the empty string is zero words, not one empty word, so `*` does not match it and `#`
does. `*` matches one word, `#` zero or more, any other word itself only (a `*` or `#` in a
routing key is a plain word). Matching is on the words only: nothing is case-folded.

`TopicTemplate` is a task's topic with `{argument}` words (see jobtopics.py). No I/O here.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from aioqueue.errors import FieldError, InvalidRequest, TaskDefinitionError

#: A routing key is an AMQP short string: at most 255 bytes. A longer topic could never be
#: published through RabbitMQ, so the contract caps names (and patterns) there.
MAX_BYTES = 255

_WORD = re.compile(r"[A-Za-z0-9_-]+")
#: A topic name as a JSON Schema / ECMA regex (the byte length is checked apart).
TOPIC_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
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


def split_words(key: str) -> list[str]:
    """The words of a routing or binding key, as RabbitMQ splits it: `""` is no word at all."""
    return key.split(".") if key else []


class Matcher:
    """One pattern, compiled: `matches(topic)` says whether RabbitMQ would route `topic` to it.

    Compile once per subscription, then test each published topic; with many subscriptions,
    split the topic once (`split_words`) and call `matches_words` on each.

    Why not a regex: `#` would become a repeated group such as `(?:\\.[^.]*)*`, and with several
    `#` Python's backtracking engine tries every way of sharing the words among them before it
    says no, polynomial in the key's length with the number of `#` as the degree. Patterns come
    from clients and every published message is tested against every subscription, so one
    pattern like `#.a.#.a.#.a.#.b` must not cost more than a few microseconds. Here the `#`
    wildcards cut the pattern into fixed-width segments: the first must sit at the key's start,
    the last at its end, and each one between at its earliest fit after the one before, since
    an earlier fit leaves more room for the rest. No backtracking: at most words x pattern words
    comparisons, and patterns without `#` (the usual `orders.*`) are one length check and a
    word-by-word comparison.
    """

    __slots__ = ("_head", "_middle", "_min_words", "_tail", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        segments: list[list[str]] = [[]]
        for word in split_words(pattern):
            if word == "#":
                segments.append([])
            else:
                segments[-1].append(word)
        self._head = tuple(segments[0])
        #: None when the pattern has no `#`: the key must then have exactly the head's words.
        self._middle: tuple[tuple[str, ...], ...] | None = None
        self._tail: tuple[str, ...] = ()
        if len(segments) > 1:
            # `#.#` is `#`: the empty segments between adjacent `#` constrain nothing.
            self._middle = tuple(tuple(s) for s in segments[1:-1] if s)
            self._tail = tuple(segments[-1])
        self._min_words = sum(map(len, segments))

    def __repr__(self) -> str:
        return f"Matcher({self.pattern!r})"

    def matches(self, topic: str) -> bool:
        """Whether a RabbitMQ topic exchange routes `topic` to a binding of this pattern."""
        return self.matches_words(split_words(topic))

    def matches_words(self, words: Sequence[str]) -> bool:
        """`matches`, on a topic already split by `split_words`."""
        count = len(words)
        if self._middle is None:
            return count == len(self._head) and _fits(self._head, words, 0)
        end = count - len(self._tail)
        # The length check first: it also keeps the head and the tail from overlapping.
        if count < self._min_words or not _fits(self._head, words, 0):
            return False
        if not _fits(self._tail, words, end):
            return False
        at = len(self._head)
        for segment in self._middle:
            at = _find(segment, words, at, end)
            if at < 0:
                return False
            at += len(segment)
        return True


def _fits(segment: tuple[str, ...], words: Sequence[str], start: int) -> bool:
    """Whether `segment` (words and `*`) matches `words` from `start` on, word for word."""
    for offset, expected in enumerate(segment):
        if expected != "*" and expected != words[start + offset]:
            return False
    return True


def _find(segment: tuple[str, ...], words: Sequence[str], start: int, stop: int) -> int:
    """The first index from `start` where `segment` fits and ends by `stop`, or -1."""
    for at in range(start, stop - len(segment) + 1):
        if _fits(segment, words, at):
            return at
    return -1


def compile_pattern(pattern: str) -> Matcher:
    """The matcher of any binding key, valid by `check_pattern` or not: check client input first."""
    return Matcher(pattern)


def matches(pattern: str, topic: str) -> bool:
    """Whether RabbitMQ routes `topic` to `pattern`: for one-off checks; compile to repeat."""
    return Matcher(pattern).matches(topic)


#: The longest job event name: the last word of a task's topic (see jobtopics.py).
_LONGEST_EVENT = "cancelled"


class TopicTemplate:
    """`albums.{album}.thumbnails`: a topic name with `{argument}` words."""

    def __init__(self, template: str, task: str) -> None:
        self.template = template
        self.fields: list[str] = []
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise TaskDefinitionError(
                    f"task {task!r}: topic {template!r}: {{{name}}} must name an argument,"
                    " as {album}"
                )
            self.fields.append(name)
        try:
            check_topic(self._fill(dict.fromkeys(self.fields, "x")) + "." + _LONGEST_EVENT)
        except InvalidRequest as exc:
            raise TaskDefinitionError(f"task {task!r}: topic {template!r}: {exc.detail}") from None

    def _fill(self, values: Mapping[str, str]) -> str:
        return self.template.format_map(values)

    def render(self, args: Any, event: str) -> str | None:
        """The topic of `event` of a job with `args`; None if the args do not make one."""
        if not isinstance(args, dict):
            args = {}
        values = {}
        for name in self.fields:
            value = args.get(name)
            if isinstance(value, bool) or not isinstance(value, str | int):
                return None
            values[name] = str(value)
        topic = f"{self._fill(values)}.{event}"
        try:
            check_topic(topic)
        except InvalidRequest:
            return None
        return topic
