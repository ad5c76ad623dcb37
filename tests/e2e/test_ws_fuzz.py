"""Issue 9: Hypothesis-generated websocket frames against the real `aioqueue serve`, auth on.

Thousands of frames, one at a time, each waited for: objects with known and unknown `op`s whose
fields (`channel`, `since`, `job`, `topic`, `data`, `id`, `token`) are plausible or of any type,
any JSON value, text that is not JSON, huge strings, numbers past a double or past 64 bits,
nestings past what orjson reads or writes, frames a few bytes either side of
`ws.max_frame_bytes`, binary frames and text frames that are not UTF-8. Most go over a
connection authenticated in its handshake (the `Authorization` header); some batches open a
connection without credentials, whose frames are refused until an `auth` frame succeeds.

Each frame must get exactly one answer (skipping the `job` and `message` frames its
subscriptions push): an `error` frame with a code of `protocol.ERRORS`, or the reply its op
has, with its `id` echoed (or a `bad_frame` for an `id` that could not come back as sent); never
a reply to an op other than `auth` before the connection authenticated. After each batch a
`ping` of its own must be answered next, so that no frame got two answers. The connection stays open, except where the protocol closes it: a frame over
`ws.max_frame_bytes` (1009), a text frame that is not UTF-8 (1007, RFC 6455 §8.1), and a
refused token in the `auth` frame of a connection not authenticated yet (its `unauthorized`
error, then 1008); then the test reconnects and goes on. No frame or close reason carries a traceback, the server logs no
unexpected error, and it still answers /healthz at the end.

The frames are drawn by Hypothesis with a fixed seed (`AQ_WS_FUZZ_SEED` for another), in
batches: one Hypothesis example is one batch, sent by a sync test that drives its own event
loop (`asyncio.Runner`), so that the connection and the server outlive the examples.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from aioqueue.web.protocol import ERRORS
from aioqueue.web.ws import OPS
from tests.support import ServeProcess, wait_ready

SEED = int(os.environ.get("AQ_WS_FUZZ_SEED", "20261130"))
#: Hypothesis examples, each a batch of frames (5 to 40): about 7,400 frames with the seed.
BATCHES = 300
FRAMES_PROMISED = 5000
#: Small, so that frames either side of it are cheap to send.
MAX_FRAME_BYTES = 65536
MAX_MESSAGE_BYTES = 16384
#: How long one frame may wait for its answer, and one batch for all of its own.
ANSWER_TIMEOUT = 10.0
BATCH_TIMEOUT = 60.0
TRACEBACK = "Traceback (most recent call last)"

ALICE = "alice-" + secrets.token_urlsafe(16)
BOB = "bob-" + secrets.token_urlsafe(16)
CAROL = "carol-" + secrets.token_urlsafe(16)
EVERYTHING = ["jobs:submit", "jobs:read", "topics:publish:#", "topics:subscribe:#"]
TOKENS = [
    {"token": ALICE, "principal": "alice", "scopes": EVERYTHING},
    {"token": BOB, "principal": "bob", "scopes": EVERYTHING},
    # Scopes for little: most of her ops are `forbidden`.
    {"token": CAROL, "principal": "carol", "scopes": ["jobs:read", "topics:subscribe:orders.*"]},
]
ENV = {
    "AIOQUEUE_APP": "tests.e2e.openapi_app:app",  # tasks that finish at once, whatever their args
    "AIOQUEUE_AUTH__MODE": "token",
    "AIOQUEUE_AUTH__TOKENS": json.dumps(TOKENS),
    "AIOQUEUE_WS__MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
    "AIOQUEUE_TOPICS__MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
    "AIOQUEUE_TOPICS__RETENTION_BYTES": str(2**20),  # bounds what a `since: -1` replays
    "AIOQUEUE_WS__MAX_SUBSCRIPTIONS": "20",  # bounds the copies of each publish
    # Limits on rate are not what this is about: frames should reach the ops.
    "AIOQUEUE_WS__MAX_PUBLISHES_PER_SECOND": "100000",
    "AIOQUEUE_AUTH__MAX_SUBMITS_PER_SECOND": "100000",
    # A batch without credentials is short; its connection must not time out mid-batch.
    "AIOQUEUE_WS__AUTH_TIMEOUT": "60",
}
#: The reply of each op that succeeded.
REPLIES = {
    "subscribe": "subscribed",
    "unsubscribe": "unsubscribed",
    "submit": "submitted",
    "publish": "published",
    "ping": "pong",
    "auth": "authenticated",
}
#: Frames pushed by subscriptions, not answers to a frame.
PUSHED = frozenset({"job", "message"})
CLOSE_TOO_BIG, CLOSE_NOT_UTF8, CLOSE_POLICY = 1009, 1007, 1008
#: The errors answering an `auth` frame of a connection not authenticated yet that close it
#: once sent, and their close codes.
CLOSING_ERRORS = {"unauthorized": CLOSE_POLICY, "too_many_connections": 1013}


# What a frame is made of. Values are JSON built here (`encode`), so that a frame can hold what
# no encoder writes: `Raw` text is put in as it is, and `KnownJob` becomes `job:ID` of a job
# the run submitted, once there is one.


@dataclass(frozen=True)
class Raw:
    text: str


@dataclass(frozen=True)
class KnownJob:
    index: int


@dataclass(frozen=True)
class Send:
    """A text frame of `value` as JSON; `size`: padded with a `pad` field to that many bytes."""

    value: Any
    size: int | None = None


@dataclass(frozen=True)
class SendText:
    text: str


@dataclass(frozen=True)
class SendBytes:
    data: bytes
    opcode: WSMsgType


Frame = Send | SendText | SendBytes


@dataclass(frozen=True)
class Batch:
    authenticated: bool  # over the connection authenticated in its handshake, or a new one
    frames: list[Frame]


def encode(value: Any, jobs: list[str]) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, KnownJob):
        job = jobs[value.index % len(jobs)] if jobs else "none-yet"
        return json.dumps(f"job:{job}")
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)}:{encode(v, jobs)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(item, jobs) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def nest(opening: str, depth: int) -> Raw:
    if opening == "[":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


# The strategies. `weighted` picks among strategies in proportion to their weights: Hypothesis's
# own `one_of` favours no branch, and a field of any type in every frame would make nearly every
# frame a `bad_frame` that never reaches an op.


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


WORDS = ["orders", "eu", "us", "paid", "a", "x-y", "_", "9"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
huge_strings = st.builds(
    lambda char, n: char * n,
    st.sampled_from(["a", "é", "☃", "😀", "\\", '"', "\x00", "\n", "\u2028"]),
    st.integers(1000, 15000),
)
#: Numbers no encoder writes: past a double (orjson refuses them), past 64 bits (read as a
#: double), a double's extremes, and exponents.
raw_numbers = st.sampled_from(
    [
        *("1e400", "-1e400", "1e-400", "18446744073709551616", "-9223372036854775809"),
        *("5e-324", "1.7976931348623157e308", "-0", "0e0", "1E+2", "1234567890" * 3),
    ]
) | st.integers(20, 2000).map(lambda digits: "9" * digits)
#: Nestings, often at a limit: `MAX_ARGS_DEPTH` (128), what orjson writes (254 levels) and reads
#: (1024), and Python's recursion limit (1000, less the stack already in use).
depths = st.integers(100, 1100) | st.sampled_from(
    [128, 129, 251, 252, 253, 254, 255, 960, 990, 1000, 1023, 1024, 1025]
)
deep = st.builds(nest, st.sampled_from(["[", "{"]), depths)
#: Any value: mostly ordinary JSON, sometimes huge, a number no encoder writes, or deep.
wild = weighted((24, json_values), (1, huge_strings), (1, raw_numbers.map(Raw)), (1, deep))


def sometimes(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, else anything."""
    return weighted((5, plausible), (1, wild))


topic_names = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(".".join)
patterns = st.lists(st.sampled_from([*WORDS, "*", "#"]), min_size=1, max_size=4).map(".".join)
channels = sometimes(
    weighted(
        (3, st.builds(KnownJob, st.integers(0, 10**6))),
        (3, patterns.map("topic:".__add__)),
        (1, st.text(max_size=30).map("job:".__add__)),
        (1, st.text(max_size=30).map("topic:".__add__)),
        (1, st.text(max_size=30)),
    )
)
ints = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
#: The arguments each task of tests/e2e/openapi_app.py takes, or near misses.
ARGS: dict[str, st.SearchStrategy[Any]] = {
    "add": st.fixed_dictionaries({"a": ints}, optional={"b": ints}) | st.lists(ints, max_size=3),
    "scale": st.fixed_dictionaries(
        {"values": st.lists(floats, max_size=5)}, optional={"factor": st.none() | floats}
    ),
    "label": st.fixed_dictionaries(
        {"name": st.text(max_size=20)},
        optional={
            "tags": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
            "mode": st.sampled_from(["fast", "slow", 3, None, "other"]),
            "flag": st.booleans(),
        },
    ),
    # Their `Any` parameters take anything: deep nestings reach the job's record.
    "variadic": st.lists(weighted((3, json_values), (1, deep)), max_size=4)
    | st.dictionaries(st.text(max_size=5), st.booleans(), max_size=3),
    "keyword_only": st.fixed_dictionaries(
        {"key": st.text(max_size=20)}, optional={"values": weighted((3, wild), (1, deep))}
    ),
    "fails": st.fixed_dictionaries({}, optional={"message": st.text(max_size=20)}),
    "nothing": st.just({}) | st.just([]),
    "missing": json_values,
}


def rarely(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A submit field beside `task` and `args`: mostly plausible, each alone."""
    return weighted((8, value), (1, wild))


def submit_body(task: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"task": st.just(task), "args": sometimes(ARGS[task])},
        optional={
            "queue": rarely(st.sampled_from(["default", "other", "nope"])),
            "max_attempts": rarely(st.integers(-1, 5)),
            "timeout": rarely(st.floats(0, 10)),
            "delay": rarely(st.floats(0, 10)),
            "run_at": rarely(st.sampled_from(["2026-01-01T00:00:00+00:00", "soon", ""])),
            "idempotency_key": rarely(st.text(min_size=1, max_size=20)),
            "priority": rarely(st.integers(-1, 10)),
            "ttl": rarely(st.floats(0, 10)),
        },
    )


submit_bodies = sometimes(st.sampled_from(list(ARGS)).flatmap(submit_body))
tokens = sometimes(st.sampled_from([ALICE, BOB, CAROL, "x" * 9000]) | st.text(max_size=30))
topics = sometimes(topic_names | st.text(max_size=20))
ids = sometimes(st.integers() | st.text(max_size=10))


def op_frame(op: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of `op` with its fields, sometimes of any type, and sometimes an `id`."""
    return st.fixed_dictionaries({"op": st.just(op), **fields}, optional={"id": ids})


#: Each op with its own fields; or any op, known or not, with any of the fields or none.
objects = weighted(
    (3, op_frame("subscribe", channel=channels)),
    (
        2,
        op_frame(
            "subscribe",
            channel=sometimes(patterns.map("topic:".__add__)),
            since=sometimes(st.integers(-3, 100)),
        ),
    ),
    (2, op_frame("unsubscribe", channel=channels)),
    (4, op_frame("submit", job=submit_bodies)),
    (3, op_frame("publish", topic=topics, data=wild)),
    (1, op_frame("publish", topic=topic_names, data=huge_strings)),
    (1, op_frame("ping")),
    (1, op_frame("auth", token=tokens)),
    (
        4,
        st.fixed_dictionaries(
            {"op": weighted((6, st.sampled_from(list(OPS))), (1, st.text()), (1, wild), (1, deep))},
            optional={
                "channel": channels,
                "since": sometimes(st.integers(-3, 100) | st.integers()),
                "job": submit_bodies,
                "topic": topics,
                "data": wild,
                "id": ids,
                "token": tokens,
            },
        ),
    ),
)
not_json = st.text(max_size=40) | st.sampled_from(
    ["", "{", "[1,", "nul", "\ufeff{}", '{"op": "ping"', "{'op': 'ping'}", "NaN", "[]]"]
)
not_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]).flatmap(
    lambda bad: st.builds(lambda before: before + bad, st.binary(max_size=16))
)
sizes = st.integers(-40, 40).map(lambda delta: MAX_FRAME_BYTES + delta) | st.sampled_from(
    [MAX_FRAME_BYTES - 1, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1]
)
frames = weighted(
    (40, st.builds(Send, objects)),
    (2, st.builds(Send, json_values)),
    (2, st.builds(SendText, not_json)),
    (1, st.builds(SendBytes, st.binary(max_size=64), st.just(WSMsgType.BINARY))),
    (1, st.builds(SendBytes, not_utf8, st.just(WSMsgType.TEXT))),
    (1, st.builds(Send, objects, sizes)),
)
#: A connection without credentials: more `auth` frames, some with a token that is refused.
unauthenticated_frames = weighted((1, st.builds(Send, op_frame("auth", token=tokens))), (4, frames))
batches = weighted(
    (5, st.builds(Batch, st.just(True), st.lists(frames, min_size=20, max_size=40))),
    (
        1,
        st.builds(Batch, st.just(False), st.lists(unauthenticated_frames, min_size=5, max_size=20)),
    ),
)


# Sending them.


@dataclass
class Closed:
    code: int | None


@dataclass
class Conn:
    ws: aiohttp.ClientWebSocketResponse
    authenticated: bool


@dataclass
class Fuzz:
    session: aiohttp.ClientSession
    url: str
    jobs: list[str] = field(default_factory=list)
    frames: int = 0
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    closes: collections.Counter[int | None] = field(default_factory=collections.Counter)
    pushed: int = 0
    pings: int = 0
    main: Conn | None = None

    async def connect(self, token: str | None) -> Conn:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        ws = await self.session.ws_connect(
            self.url + "/v1/ws",
            headers=headers,
            max_msg_size=0,  # the server's frames, whatever their size
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
        return Conn(ws, authenticated=token is not None)

    async def batch(self, batch: Batch) -> None:
        if batch.authenticated:
            if self.main is None or self.main.ws.closed:
                self.main = await self.connect(ALICE)
            conn = self.main
        else:
            conn = await self.connect(None)
        try:
            for frame in batch.frames:
                if not await self.exchange(conn, frame):
                    conn = await self.connect(ALICE if batch.authenticated else None)
                    if batch.authenticated:
                        self.main = conn
            await self.in_step(conn)
        finally:
            if not batch.authenticated:
                await conn.ws.close()

    async def in_step(self, conn: Conn) -> None:
        """A ping of the test's own (not counted) is answered next: no frame before it got
        more than one answer."""
        self.pings += 1
        ping = {"op": "ping", "id": f"in-step-{self.pings}"}
        await conn.ws.send_str(orjson.dumps(ping).decode())
        answer = await self.answer(conn, str(ping))
        assert isinstance(answer, dict) and answer.get("id") == ping["id"], answer
        expected = "pong" if conn.authenticated else "error"
        assert answer["type"] == expected, answer

    def payload(self, frame: Frame) -> tuple[bytes, WSMsgType]:
        if isinstance(frame, SendBytes):
            return frame.data, frame.opcode
        if isinstance(frame, SendText):
            return frame.text.encode(), WSMsgType.TEXT
        text = encode(frame.value, self.jobs).encode()
        if frame.size is not None and isinstance(frame.value, dict):
            bare = encode({**frame.value, "pad": ""}, self.jobs).encode()
            pad = max(0, frame.size - len(bare))
            text = encode({**frame.value, "pad": "x" * pad}, self.jobs).encode()
        return text, WSMsgType.TEXT

    async def exchange(self, conn: Conn, frame: Frame) -> bool:
        """Send one frame and check its answer; False if the connection closed, as it should."""
        data, opcode = self.payload(frame)
        sent = _shown(data)
        self.frames += 1
        await conn.ws.send_frame(data, opcode)
        parsed = _parsed(data) if opcode is WSMsgType.TEXT else None
        answer = await self.answer(conn, sent)
        expected_close = _expected_close(data, opcode)
        if expected_close is not None:
            assert isinstance(answer, Closed), f"{sent} was answered {answer}, not closed"
            assert answer.code == expected_close, f"{sent} closed with {answer.code}"
            self.closes[answer.code] += 1
            return False
        assert not isinstance(answer, Closed), f"{sent} closed the connection: {answer.code}"
        closing = not conn.authenticated and _op(parsed) == "auth"
        self.check(conn, parsed, answer, sent)
        code = answer.get("code")
        if closing and isinstance(code, str) and code in CLOSING_ERRORS:
            # A refused `auth` before authentication: its error, then the close.
            closed = await self.answer(conn, sent)
            assert isinstance(closed, Closed), f"{sent} was refused but not closed: {closed}"
            assert closed.code == CLOSING_ERRORS[code], f"{sent} closed with {closed.code}"
            self.closes[closed.code] += 1
            return False
        return True

    async def answer(self, conn: Conn, sent: str) -> dict[str, Any] | Closed:
        """The frame that answers the one sent, past those its subscriptions push."""
        while True:
            try:
                message = await conn.ws.receive(timeout=ANSWER_TIMEOUT)
            except TimeoutError:
                raise AssertionError(f"no answer within {ANSWER_TIMEOUT} s to {sent}") from None
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                reason = message.extra or ""
                assert TRACEBACK not in reason, reason
                return Closed(conn.ws.close_code)
            assert message.type is WSMsgType.TEXT, f"{sent} was answered {message}"
            assert TRACEBACK not in message.data, message.data[:5000]
            reply = orjson.loads(message.data)
            assert isinstance(reply, dict), message.data[:1000]
            if reply.get("type") in PUSHED or reply.get("code") == "offset_expired":
                self.pushed += 1
                continue
            return reply

    def check(self, conn: Conn, parsed: Any, reply: dict[str, Any], sent: str) -> None:
        kind = reply.get("type")
        op = _op(parsed)
        if kind == "error":
            code = reply.get("code")
            assert code in ERRORS, f"{sent}: unknown code in {reply}"
            assert isinstance(reply.get("message"), str), reply
            self.answers[f"error:{code}"] += 1
        else:
            assert op is not None and kind == REPLIES[op], f"{sent} was answered {reply}"
            # Nothing but `auth` is served to a connection that has not authenticated.
            assert conn.authenticated or op == "auth", f"{sent} was served unauthenticated"
            self.answers[kind] += 1
            if kind == "authenticated":
                conn.authenticated = True
            if kind == "submitted":
                self.jobs.append(reply["job"]["id"])
        if isinstance(parsed, dict) and parsed.get("id") is not None:
            if _echoable(parsed["id"]):
                assert reply.get("id") == parsed["id"], f"{sent}: the id did not come back: {reply}"
            else:
                refused = reply.get("code") == "bad_frame" and "id" not in reply
                assert refused, f"{sent}: an id that cannot come back was not refused: {reply}"


def _parsed(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _op(parsed: Any) -> str | None:
    op = parsed.get("op") if isinstance(parsed, dict) else None
    return op if isinstance(op, str) and op in OPS else None


def _expected_close(data: bytes, opcode: WSMsgType) -> int | None:
    """The close code the protocol answers this frame with, if it closes the connection."""
    if len(data) > MAX_FRAME_BYTES:
        return CLOSE_TOO_BIG
    if opcode is WSMsgType.TEXT:
        try:
            data.decode()
        except UnicodeDecodeError:
            return CLOSE_NOT_UTF8
    return None


def _echoable(frame_id: Any) -> bool:
    """Whether the server gives this `id` back as it is; else it refuses the frame (asyncapi's
    description of `id`): a float of 2^53 or more (an integer past 64 bits is read as one), or
    a value nested more than 253 levels deep (its reply would nest it one level more than the
    254 that orjson writes)."""
    if isinstance(frame_id, float):
        return abs(frame_id) < 2**53
    return _depth(frame_id) <= 253


def _depth(value: Any) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, list | dict):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in _children(item))
    return deepest


def _children(value: list[Any] | dict[str, Any]) -> Iterator[Any]:
    return iter(value.values() if isinstance(value, dict) else value)


def _shown(data: bytes) -> str:
    return repr(data[:300]) + (f"... ({len(data)} bytes)" if len(data) > 300 else "")


def run_batches(runner: asyncio.Runner, fuzz: Fuzz) -> None:
    @seed(SEED)
    @settings(
        max_examples=BATCHES,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: each example is a live exchange
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    # Drawn from `st.data()`, not passed to the test: Hypothesis would write each batch's repr
    # (tens of kB) for every example. A failure names the frame at fault.
    @given(st.data())
    def one_batch(data: st.DataObject) -> None:
        batch = data.draw(batches)
        runner.run(asyncio.wait_for(fuzz.batch(batch), BATCH_TIMEOUT))

    one_batch()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_hypothesis_frames_are_answered(prefix: str, tmp_path: Path) -> None:
    server = ServeProcess("memory://", prefix, ENV).start(tmp_path)
    started = time.monotonic()
    try:
        with asyncio.Runner() as runner:
            session = runner.run(_session())
            fuzz = Fuzz(session, server.url)
            try:
                runner.run(wait_ready(session, server.url))
                started = time.monotonic()
                run_batches(runner, fuzz)
                seconds = time.monotonic() - started
                runner.run(_healthy(session, server.url))
            finally:
                if fuzz.main is not None:
                    runner.run(fuzz.main.ws.close())
                runner.run(session.close())
    finally:
        server.kill()
    answers = ", ".join(f"{name} {n}" for name, n in sorted(fuzz.answers.items()))
    print(
        f"\nwebsocket fuzz: {fuzz.frames} frames in {seconds:.1f} s, seed {SEED}; answers: "
        f"{answers}; closes {dict(fuzz.closes)}; {fuzz.pushed} pushed frames; "
        f"{len(fuzz.jobs)} jobs submitted; {fuzz.pings} pings between batches"
    )
    log = server.log()
    assert "unexpected error" not in log and TRACEBACK not in log, log[-5000:]
    assert fuzz.frames >= FRAMES_PROMISED, fuzz.frames
    # The frames went deep enough: every op was served, and refused in many ways.
    assert set(REPLIES.values()) <= set(fuzz.answers), fuzz.answers
    assert {"error:bad_frame", "error:unknown_op", "error:unauthorized"} <= set(fuzz.answers)
    assert {"error:invalid_job", "error:forbidden", "error:not_found"} <= set(fuzz.answers)
    assert {CLOSE_TOO_BIG, CLOSE_NOT_UTF8, CLOSE_POLICY} <= set(fuzz.closes), fuzz.closes


async def _session() -> aiohttp.ClientSession:
    """A client session, made in the loop it is used in; every call times out."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


async def _healthy(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(url + "/healthz") as response:
        assert response.status == 200, "the server did not survive the frames"
