"""`GET /v1/ws`: the websocket protocol (CONTRACT §3). One JSON object per text frame.

A bad frame gets an `error` frame and the connection stays open; a frame over
`ws.max_frame_bytes` is closed by aiohttp with 1009. The codes of error frames are protocol.py's
`ERRORS`; the ops are `OPS` below. `GET /asyncapi.json` (asyncapi.py) describes both, and every
frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import WSMsgType, web

from aioqueue import compactjson
from aioqueue.auth import ANONYMOUS, Principal, bearer
from aioqueue.config import normal_origin
from aioqueue.errors import (
    BrokerUnavailable,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    RequestError,
    TokenExpired,
    Unauthorized,
)
from aioqueue.topics import check_pattern, check_topic
from aioqueue.web.browsers import normal_origins
from aioqueue.web.connection import CLOSE_SLOW, CLOSE_TIMEOUT, Connection
from aioqueue.web.hub import ALL_JOBS, QUEUES, job_frame, queues_frame
from aioqueue.web.problems import problem, render
from aioqueue.web.protocol import SNAPSHOT, ErrorCode
from aioqueue.web.state import STATE, State

logger = logging.getLogger(__name__)

#: The kernel's send buffer per websocket. Linux grows it up to 4 MiB on its own, which would let
#: each client that does not read hold megabytes before the hub notices (G5).
SEND_BUFFER_BYTES = 128 * 1024


#: Close code for a connection that did not authenticate in time, or with a refused token.
CLOSE_POLICY = 1008
#: Close code for a frame whose handling failed unexpectedly (a bug): RFC 6455's "internal error".
CLOSE_INTERNAL = 1011

#: Hosts a browser page may always open the websocket from (a developer's own machine).
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def origin_refused(request: web.Request, allowed: tuple[str, ...]) -> str | None:
    """Why a handshake from this request's `Origin` is refused; None if it may go on: no
    `Origin` (not a browser), the request's own origin, localhost, or one of `allowed`."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return None
    normal = normal_origin(origin)
    if normal is None:
        return f"the Origin header {origin[:100]!r} is not an origin"
    parts = urlsplit(normal)
    if parts.hostname in LOCAL_HOSTS:
        return None
    if parts.netloc == request.host.lower() or normal in normal_origins(allowed):
        return None
    return f"websockets from {normal} are not allowed (ws.allowed_origins)"


class FrameError(Exception):
    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


#: The subprotocol a browser offers, beside `bearer.TOKEN`, to send its token in the handshake
#: (`new WebSocket(url, ["aioqueue", "bearer." + token])`): the server selects it.
SUBPROTOCOL = "aioqueue"
_BEARER_PROTOCOL = "bearer."


def handshake_token(request: web.Request) -> str | None:
    """The token of the handshake: its `Authorization` header, or a `bearer.TOKEN`
    subprotocol; None if it has neither. Raises `Unauthorized` for a malformed one."""
    header = request.headers.get("Authorization")
    if header is not None:
        return bearer(header)
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    tokens = [p[len(_BEARER_PROTOCOL) :] for p in offered if p.startswith(_BEARER_PROTOCOL)]
    if not tokens:
        return None
    if SUBPROTOCOL not in offered:
        # A browser fails a handshake whose answer selects none of the protocols it offered,
        # and aiohttp would log the offered list, token included.
        raise Unauthorized(f"offer the subprotocol {SUBPROTOCOL!r} beside 'bearer.TOKEN'")
    return tokens[0]


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    refused = origin_refused(request, state.settings.ws.allowed_origins)
    if refused is not None:
        # Cross-site websocket hijacking: a page elsewhere opening this socket with the
        # browser's cookies. Only browsers send Origin, and they cannot forge it.
        return problem(403, "Forbidden", refused)
    who: Principal | None = ANONYMOUS
    if state.authenticator is not None:
        try:
            token = handshake_token(request)
            who = None if token is None else state.authenticator.authenticate(token)
        except Unauthorized as exc:
            return render(exc)
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        # aiohttp refuses a frame of max_msg_size bytes too; one of max_frame_bytes is allowed.
        max_msg_size=state.settings.ws.max_frame_bytes + 1,
        heartbeat=state.settings.ws.heartbeat,
        timeout=CLOSE_TIMEOUT,
        # No permessage-deflate, which browsers offer: aiohttp would compress each frame once
        # per connection, and keep a compressor of 268 KB per connection (bench/idle_ws.py
        # --deflate: 113 KiB per idle connection against 22; fan-out at half the speed). The
        # frames are small JSON; Centrifugo leaves compression off by default for the same reason.
        compress=False,
    )
    limits = state.settings.ws
    conn = Connection(
        ws,
        limits.send_buffer,
        limits.max_publishes_per_second,
        request.transport,
        state.metrics.ws,
    )
    if who is not None and (refused := state.limits.websocket_refused(who, conn)) is not None:
        await conn.drain()
        return problem(429, "Too many requests", refused, headers={"Retry-After": "1"})
    try:  # from here `conn` counts as one of `who`'s websockets, until the finally
        _signed_in(state, conn, who)
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        state.connections.add(conn)
        try:
            await conn.serve(_read_frames(state, conn))
        except Exception:
            # A bug in an op. The websocket is prepared: the problem middleware's 500 would be
            # written into its stream, which the client reads as a broken frame.
            logger.exception("unexpected error on a websocket: closing it with 1011")
            conn.close(CLOSE_INTERNAL, "internal error; the server log has it")
            await conn.wait_closed()
    finally:
        if conn.auth_timer is not None:
            conn.auth_timer.cancel()
        state.limits.forget(conn.identity, conn)
        state.connections.discard(conn)
        state.hub.drop(conn)
        await conn.drain()
    return ws


def _signed_in(state: State, conn: Connection, who: Principal | None) -> None:
    """`who` is now on the other end of `conn` (None: nobody yet, who must authenticate within
    `ws.auth_timeout`); when its credentials expire, it is told so, and given as long again."""
    conn.principal = who
    if who is not None:
        conn.identity = who.name
    if conn.auth_timer is not None:
        conn.auth_timer.cancel()
    loop = asyncio.get_running_loop()
    if who is None:
        conn.auth_timer = loop.call_later(
            state.settings.ws.auth_timeout,
            conn.close,
            CLOSE_POLICY,
            "not authenticated within ws.auth_timeout",
        )
    elif who.expires_at is not None:
        left = who.expires_at + state.settings.auth.jwt_leeway - time.time()
        conn.auth_timer = loop.call_later(max(0.0, left), _expired, state, conn)
    else:
        conn.auth_timer = None


def _close_soon(conn: Connection, code: int, reason: str) -> None:
    """Close `conn` after the reply to the frame being handled is sent."""
    asyncio.get_running_loop().call_soon(conn.close, code, reason)


def _expired(state: State, conn: Connection) -> None:
    seconds = state.settings.ws.auth_timeout
    message = f"the token has expired; send a new 'auth' within {seconds:g} s"
    _send(conn, _error("token_expired", message))
    _signed_in(state, conn, None)


async def _read_frames(state: State, conn: Connection) -> None:
    while (message := await conn.receive()) is not None:
        if message.type is WSMsgType.TEXT:
            await _on_frame(state, conn, message.data)
        elif message.type is WSMsgType.BINARY:
            _send(conn, _error("bad_frame", "binary frames are not accepted; send JSON text"))
        else:  # closed by the client, or the connection is lost
            return


async def _on_frame(state: State, conn: Connection, data: str) -> None:
    frame_id: Any = None
    try:
        frame = orjson.loads(data)
        if not isinstance(frame, dict):
            raise FrameError("bad_frame", "a frame is a JSON object with an 'op'")
        frame_id = _frame_id(frame)
        op = frame.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise FrameError("unknown_op", f"unknown op {_shown(op)}; ops are {', '.join(OPS)}")
        if conn.principal is None and op != "auth":
            raise FrameError("unauthorized", 'authenticate first: {"op": "auth", "token": ...}')
        for reply in await handler(state, conn, frame):
            _send(conn, reply, frame_id)
    except orjson.JSONDecodeError as exc:
        _send(conn, _error("bad_frame", f"not JSON: {exc}"))
    except FrameError as exc:
        _send(conn, _error(exc.code, exc.message, **exc.extra), frame_id)
    except (BrokerUnavailable, NotReady) as exc:
        _send(conn, _error("unavailable", f"try again shortly: {exc}"), frame_id)
    except QueueFull as exc:
        _send(conn, _error("queue_full", f"try again shortly: {exc}"), frame_id)
    except RateLimited as exc:
        wait = round(exc.retry_after, 3)
        _send(conn, _error("rate_limited", str(exc), retry_after=wait), frame_id)
    except RequestError as exc:  # the policy's refusals (auth.py), and those of the service
        _send(conn, _error(CODES_BY_ERROR.get(type(exc), "bad_frame"), exc.detail), frame_id)


def _frame_id(frame: dict[str, Any]) -> Any:
    """The frame's `id`, for its reply to carry back; FrameError if it would not come back as
    it was sent (and then the error frame has no `id`)."""
    frame_id = frame.get("id")
    if isinstance(frame_id, float) and abs(frame_id) >= 2**53:
        # An integer past 2^64 is read as a float: it would come back changed.
        raise FrameError("bad_frame", "'id' is too large a number to come back exactly")
    if isinstance(frame_id, list | dict):
        # orjson reads JSON nested 1024 levels deep but writes 254 at most: a deeper id would
        # fail the reply, not the frame.
        try:
            orjson.dumps({"id": frame_id})  # nested as in a reply
        except TypeError:
            raise FrameError("bad_frame", "'id' is nested too deeply to come back") from None
    return frame_id


def _shown(op: Any) -> str:
    """An `op` that is not one, for a message: never all of a long string, and never the repr
    of an array or object, which could be megabytes, or nested past Python's recursion limit."""
    if isinstance(op, str):
        return repr(op[:100])
    if isinstance(op, list | dict):
        return f"of type {'array' if isinstance(op, list) else 'object'}"
    return repr(op)


#: The frame code of each refusal, of the access policy (`Principal.check_*`) or the service;
#: any other RequestError is a bad_frame.
CODES_BY_ERROR: dict[type[RequestError], ErrorCode] = {
    Unauthorized: "unauthorized",
    TokenExpired: "token_expired",
    Forbidden: "forbidden",
    NotFound: "not_found",
    Conflict: "conflict",
    PayloadTooLarge: "too_large",
}


def _send(conn: Connection, reply: dict[str, Any] | bytes, frame_id: Any = None) -> None:
    if isinstance(reply, dict):
        if frame_id is not None:
            reply["id"] = frame_id
        reply = compactjson.dumps(reply)  # it may wait in the queue
    conn.send(reply)


def _error(code: ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


#: The channels that are neither a job's nor a topic pattern (hub.py's), each for jobs:admin.
ADMIN_CHANNELS = frozenset({ALL_JOBS, QUEUES})


def _channel(frame: dict[str, Any]) -> str:
    channel = frame.get("channel")
    if not isinstance(channel, str) or not channel:
        raise FrameError("bad_frame", "'channel' must be a string like 'job:ID' or 'topic:PATTERN'")
    if channel in ADMIN_CHANNELS:
        return channel
    if channel.startswith("topic:"):
        try:
            check_pattern(channel[6:], field="channel")
        except InvalidRequest as exc:
            raise FrameError("bad_frame", exc.detail) from None
    elif not channel.startswith("job:"):
        raise FrameError(
            "bad_frame",
            f"unknown channel {channel[:100]!r}; use 'job:ID', 'topic:PATTERN', 'jobs:*' or"
            " 'queues'",
        )
    return channel


def _since(frame: dict[str, Any], channel: str) -> int | None:
    since = frame.get("since")
    if since is None:
        return None
    if not channel.startswith("topic:"):
        raise FrameError("bad_frame", "'since' is for topic channels; the others have none")
    if isinstance(since, bool) or not isinstance(since, int) or since < -1:
        raise FrameError("bad_frame", "'since' must be an offset: an integer >= -1")
    return since


async def _subscribe(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    channel = _channel(frame)
    since = _since(frame, channel)
    who = _principal(conn)
    if channel in ADMIN_CHANNELS:
        who.check_admin(f"the channel {channel!r}")  # every job's: before any other check
    if channel not in conn.subscriptions:
        _check_room(state, conn, who)
    if channel == ALL_JOBS:
        # No snapshot: a client lists the jobs (GET /v1/jobs) once subscribed, and applies the
        # events that came meanwhile after the list.
        state.hub.subscribe(conn, channel)
        return [{"type": "subscribed", "channel": channel}]
    if channel == QUEUES:
        state.hub.subscribe(conn, channel)
        replies: list[Any] = [{"type": "subscribed", "channel": channel}]
        # The current report at once, not in up to QUEUES_INTERVAL seconds; without the
        # broker, the next tick sends one.
        with contextlib.suppress(BrokerUnavailable, NotReady):
            replies.append(queues_frame(await state.queue_stats().report()))
        return replies
    if channel.startswith("topic:"):
        who.check_subscribe(channel[6:])
        topics = state.topics()
        await topics.log.wait_position()  # where live begins: the reply says it
        # No await from here to the reply: it goes before every message of the channel.
        sub = state.hub.topics.subscribe(conn, channel, since, topics.log)
        # `since`: the offset the messages follow, to resubscribe with if the connection drops
        # before the first one comes (for a live subscription, the last one before it).
        return [{"type": "subscribed", "channel": channel, "since": sub.after}]
    job = state.jobs().known(channel[4:])
    who.check_read(job)
    # Subscribing and taking the snapshot with no await in between: every later event follows
    # the snapshot, none is missed and none comes twice.
    state.hub.subscribe(conn, channel)
    snapshot = job_frame(channel, SNAPSHOT, job, state.hub.tracebacks)
    return [{"type": "subscribed", "channel": channel}, snapshot]


def _principal(conn: Connection) -> Principal:
    assert conn.principal is not None, "_on_frame lets only `auth` through before it is set"
    return conn.principal


def _check_room(state: State, conn: Connection, who: Principal) -> None:
    limit = state.settings.ws.max_subscriptions
    if len(conn.subscriptions) >= limit:
        raise FrameError("too_many_subscriptions", f"at most {limit} subscriptions per connection")
    left = state.limits.subscriptions_left(who)
    if left is not None and left <= 0:
        most = state.settings.auth.max_subscriptions
        raise FrameError(
            "too_many_subscriptions",
            f"at most {most} subscriptions per principal (auth.max_subscriptions)",
        )


async def _unsubscribe(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    channel = frame.get("channel")
    if not isinstance(channel, str):
        raise FrameError("bad_frame", "'channel' must be a string")
    state.hub.unsubscribe(conn, channel)
    return [{"type": "unsubscribed", "channel": channel}]


async def _submit(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    body = frame.get("job")
    if not isinstance(body, dict):
        raise FrameError("invalid_job", "'job' must be an object: the submit body")
    who = _principal(conn)
    state.limits.check_write(who)
    if isinstance(body.get("task"), str):
        who.check_submit(body["task"])
    jobs = state.jobs()
    try:
        job, created = await jobs.submit_once(body, owner=who.name)
    except InvalidRequest as exc:
        errors = [error.to_dict() for error in exc.errors]
        raise FrameError("invalid_job", exc.detail, errors=errors) from None
    # `created`: False for a repeated idempotency key, whose first job this is (HTTP's 200).
    record = job.to_dict(traceback=who.sees_everything)
    return [{"type": "submitted", "job": record, "created": created}]


async def _ping(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    return [{"type": "pong"}]


async def _auth(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    """Authenticate, or again with fresh credentials (a JWT about to expire) as the same
    principal: a websocket never changes hands, since its subscriptions were checked for it."""
    token = frame.get("token")
    if not isinstance(token, str) or not token:
        raise FrameError("bad_frame", "'token' must be a non-empty string: the bearer token")
    if state.authenticator is None:
        return [{"type": "authenticated", "principal": None}]
    try:
        who = state.authenticator.authenticate(token)
    except Unauthorized:
        if conn.principal is None:  # one guess per connection, closed once the error is sent
            _close_soon(conn, CLOSE_POLICY, "authentication failed")
        raise
    if conn.identity is not None and conn.identity != who.name:
        raise FrameError("forbidden", "a websocket keeps its principal; open another one")
    if conn.principal is None and (refused := state.limits.websocket_refused(who, conn)):
        _close_soon(conn, CLOSE_SLOW, "too many websockets for this principal")
        raise FrameError("too_many_connections", refused)
    _signed_in(state, conn, who)
    return [{"type": "authenticated", "principal": who.name}]


async def _publish(state: State, conn: Connection, frame: dict[str, Any]) -> list[Any]:
    topic = frame.get("topic")
    if not isinstance(topic, str):
        raise FrameError("bad_frame", "'topic' must be a string like 'orders.eu'")
    if "data" not in frame:
        raise FrameError("bad_frame", "'data' is missing: the message, any JSON value")
    wait = conn.publishes.take()
    if wait:
        limit = state.settings.ws.max_publishes_per_second
        raise FrameError(
            "rate_limited",
            f"at most {limit} publishes per second per connection (ws.max_publishes_per_second);"
            f" try again in {wait:.2f} s",
            retry_after=round(wait, 3),
        )
    who = _principal(conn)
    state.limits.check_write(who)
    check_topic(topic)  # InvalidRequest: a bad_frame (`_on_frame`)
    who.check_publish(topic)
    offset = await state.topics().publish(topic, frame["data"])
    return [{"type": "published", "topic": topic, "offset": offset}]


OPS = {
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "submit": _submit,
    "publish": _publish,
    "ping": _ping,
    "auth": _auth,
}
