"""What a principal may do: its scopes (CONTRACT §6), parsed once, and the questions asked of them.

| scope                      | allows                                                        |
|----------------------------|---------------------------------------------------------------|
| `jobs:submit`              | submit any task; cancel and retry its own jobs                |
| `jobs:submit:TASK`         | submit that task; cancel and retry its own jobs of it         |
| `jobs:read`                | get, list, long-poll and subscribe to its own jobs            |
| `jobs:admin`               | all of the above on every job, and tracebacks                 |
| `topics:publish:PATTERN`   | publish to a topic the pattern matches                        |
| `topics:subscribe:PATTERN` | subscribe to a pattern every match of which PATTERN matches   |

**The rule for topic subscriptions** (`covers`). A subscription to `orders.#` is allowed by a
scope only if every topic the subscription could ever deliver is one the scope's pattern
matches: `topics:subscribe:orders.#` covers `orders.eu.*`, and `topics:subscribe:orders.eu.*`
does not cover `orders.#` (it would deliver `orders.us.new`). It is decided on the patterns,
word by word, never by trying topics: a scope's `#` takes any run of the subscription's words
(its wildcards included), a scope's `*` one word or a `*` of the subscription, and a scope's
word only the same word. A subscription's `#` can be covered only by a scope's `#`, and its `*`
only by a scope's `*` or `#`. Runs of wildcards are first written in one order (`#.*` is `*.#`:
both are "one or more words"), so that two ways of writing one pattern cover each other.
Like RabbitMQ, the rule counts the empty routing key as a match of `#`: so `*.#` does not cover
`#`, though no topic name is empty.

The rule never allows a topic the scope does not match. It is exact when the scope or the
subscription has no `#`; when both have, it may refuse a subscription that is in fact covered,
since a subscription's `#` must fall inside a scope's `#`: `*.#` does not cover `#.a`, though
every topic that ends in `a` has a first word. Such a client subscribes as its scope is
written. `tests/test_scopes.py` checks both claims against brute force.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from aioqueue.errors import InvalidRequest
from aioqueue.topics import Matcher, check_pattern, compile_pattern, split_words

#: The scopes that take no argument, and the prefixes of those that take one.
PLAIN = frozenset({"jobs:submit", "jobs:read", "jobs:admin"})
SUBMIT_TASK = "jobs:submit:"
PUBLISH = "topics:publish:"
SUBSCRIBE = "topics:subscribe:"


def scope_problem(scope: object) -> str | None:
    """What is wrong with `scope` as a scope, or None."""
    if not isinstance(scope, str):
        return f"a scope is a string, not {type(scope).__name__}"
    if scope in PLAIN:
        return None
    if scope.startswith(SUBMIT_TASK):
        return None if scope[len(SUBMIT_TASK) :] else f"{scope!r} names no task"
    for prefix in (PUBLISH, SUBSCRIBE):
        if scope.startswith(prefix):
            try:
                check_pattern(scope[len(prefix) :], field="scope")
            except InvalidRequest as exc:
                return exc.detail
            return None
    known = "jobs:submit[:TASK], jobs:read, jobs:admin, topics:publish:P, topics:subscribe:P"
    return f"unknown scope {scope[:60]!r}; scopes are {known}"


@dataclass(frozen=True, slots=True)
class Scopes:
    submit_any: bool = False
    submit_tasks: frozenset[str] = frozenset()
    read: bool = False
    admin: bool = False
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    @classmethod
    def parse(cls, scopes: Iterable[str]) -> Scopes:
        """The scopes of a list; one that `scope_problem` refuses is skipped (a JWT may carry
        other services' scopes too: config tokens are checked when the config is read)."""
        valid = [scope for scope in scopes if scope_problem(scope) is None]

        def after(prefix: str) -> list[str]:
            return [scope[len(prefix) :] for scope in valid if scope.startswith(prefix)]

        return cls(
            submit_any="jobs:submit" in valid,
            submit_tasks=frozenset(after(SUBMIT_TASK)),
            read="jobs:read" in valid,
            admin="jobs:admin" in valid,
            publish=tuple(after(PUBLISH)),
            subscribe=tuple(after(SUBSCRIBE)),
        )

    def may_submit(self, task: str) -> bool:
        return self.admin or self.submit_any or task in self.submit_tasks

    def may_publish(self, topic: str) -> bool:
        return any(_matcher(pattern).matches(topic) for pattern in self.publish)

    def may_subscribe(self, pattern: str) -> bool:
        return any(covers(scope, pattern) for scope in self.subscribe)


#: Everything: the scopes of every caller when auth is off.
EVERYTHING = Scopes(True, frozenset(), True, True, ("#",), ("#",))


@functools.lru_cache(maxsize=1024)
def _matcher(pattern: str) -> Matcher:
    return compile_pattern(pattern)


def _normal(pattern: str) -> tuple[str, ...]:
    """The words of a pattern, each run of wildcards with a `#` in it as its `*`s then one `#`
    (`#.*.#` and `*.#` both mean "one or more words")."""
    words: list[str] = []
    run: list[str] = []
    for word in [*split_words(pattern), ""]:  # "" ends the last run
        if word in ("*", "#"):
            run.append(word)
            continue
        if run:
            stars = run.count("*")
            words += ["*"] * stars + (["#"] if "#" in run else [])
            run = []
        if word:
            words.append(word)
    return tuple(words)


@functools.lru_cache(maxsize=4096)
def covers(scope: str, pattern: str) -> bool:
    """Whether every topic that `pattern` matches is matched by `scope` (the module's rule)."""
    have, want = _normal(scope), _normal(pattern)

    @functools.cache
    def rest(i: int, j: int) -> bool:  # does have[i:] cover want[j:]?
        if i == len(have):
            return j == len(want)
        if have[i] == "#":
            # Take none of the words left, or one more word (or wildcard) into this `#`.
            return rest(i + 1, j) or (j < len(want) and rest(i, j + 1))
        if j == len(want) or want[j] == "#":
            return False
        # A scope's `*` takes one word or a `*`; its word, only that word.
        return (have[i] == "*" or have[i] == want[j] != "*") and rest(i + 1, j + 1)

    return rest(0, 0)
