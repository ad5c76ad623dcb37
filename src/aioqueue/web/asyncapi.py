"""`GET /asyncapi.json`: the AsyncAPI 3.0 description of the websocket `GET /v1/ws` (CONTRACT §3).

Built per request from the served app, as `/openapi.json` is, and from what the code itself
uses, so that the two cannot drift apart: the ops are ws.py's `OPS` (each must have an entry in
`OPS_DESCRIBED`), the error codes and job events protocol.py's tables, the job record and the
submit body openapi.py's schemas, the version openapi.py's. `tests/test_asyncapi.py` validates
the document against the official AsyncAPI 3.0.0 JSON Schema and real frames against it.

The document describes the server. Its three channels: `socket`, the websocket itself, where
each op arrives (a `receive` operation) and gets its reply; `job` and `topic`, the channels a
client subscribes to inside it, whose addresses are the values of a frame's `channel` field
(`job:{id}`, `topic:{pattern}`), not URLs; the server pushes frames on them (`send`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import orjson
from aiohttp import web

from aioqueue import topics
from aioqueue.web.connection import CLOSE_SLOW, SEND_TIMEOUT
from aioqueue.web.hub import ALL_JOBS, QUEUES, QUEUES_INTERVAL
from aioqueue.web.openapi import OFFSET, TOPIC_NAME, package_version, schemas, submit_body
from aioqueue.web.problems import problems
from aioqueue.web.protocol import ERRORS, JOB_EVENTS
from aioqueue.web.state import STATE
from aioqueue.web.ws import OPS

Key = TypeVar("Key", bound=str)

ASYNCAPI_VERSION = "3.0.0"
#: What the job record and the frames refer to, of openapi.py's schemas.
SHARED_SCHEMAS = ("Job", "JobStatus", "FieldError", "Queue", "QueueList")
SCHEMAS = "#/components/schemas/"

DESCRIPTION = f"""\
The websocket of aioqueue: follow jobs live, submit them, publish to topics and subscribe to \
them. The HTTP API is in `/openapi.json`.

Text frames of one JSON object each. A client sends ops (`{{"op": ...}}`), each answered by one \
frame (`{{"type": ...}}`): its reply, or an `error` frame, after which the connection stays \
open (a job subscription's reply is followed by the job's `snapshot`). An op's `id` \
(optional, any JSON value) comes back in its reply or error. A client subscribes to channels \
(`job:ID`, `topic:PATTERN`), and the server pushes their frames.

Closes: 1009 for a frame over `ws.max_frame_bytes`; {CLOSE_SLOW} for a client whose send buffer \
(`ws.send_buffer` frames) filled, or that has not read for {SEND_TIMEOUT:g} s: it reconnects and \
resubscribes (a job's snapshot, or a topic's `since`, carries what it missed); 1001 when the \
server shuts down. A browser page from another origin than the server's own, `localhost` or \
`ws.allowed_origins` is refused at the handshake (403)."""

#: An op's `id`, and its echo in the reply.
ID = {
    "description": "optional, any JSON value (null counts as none): the reply carries it back;"
    " a number of 2^53 or more that is not an integer below 2^64 is refused (it would not come"
    " back the same): send such an id as a string; so is one nested more than 253 levels deep"
}
ECHOED_ID = {"description": "the `id` of the op this answers, if it had one"}


class Op(NamedTuple):
    """One op: its frame's fields (besides `op` and `id`) and its reply's (besides `type`)."""

    summary: str
    fields: dict[str, Any]
    required: tuple[str, ...]
    reply: str
    reply_summary: str
    reply_fields: dict[str, Any]
    #: None where a fixed example would not be valid for every app.
    example: dict[str, Any] | None
    #: Reply fields that are not always there.
    reply_optional: tuple[str, ...] = ()


_JOB = {"$ref": SCHEMAS + "Job"}
_TOPIC = {"$ref": SCHEMAS + "Topic"}

#: Every op of ws.py's `OPS`, described; `tests/test_asyncapi.py` checks that none is missing.
OPS_DESCRIBED: dict[str, Op] = {
    "subscribe": Op(
        summary="Subscribe to a job's events or to a topic pattern's messages",
        fields={
            "channel": {
                "type": "string",
                "pattern": "^(job:|topic:|jobs:\\*$|queues$)",
                "description": "`job:ID`, `topic:PATTERN`, `jobs:*` or `queues` (see the"
                " channels); subscribing again to a channel starts it again",
            },
            "since": {
                "type": "integer",
                "minimum": -1,
                "description": "topic channels only: first send the retained messages after"
                " this offset that match, in order (-1: all retained), then the live ones, with"
                " no gap and no duplicate",
            },
        },
        required=("channel",),
        reply="subscribed",
        reply_summary="Subscribed; on a job channel, its `snapshot` follows; on `queues`, the"
        " current report",
        reply_fields={
            "channel": {"type": "string"},
            "since": {
                "type": "integer",
                "minimum": -1,
                "description": "topic channels only: the offset the messages follow (the"
                " `since` sent, or for a live subscription the last offset before it); a"
                " client that drops before its first message resubscribes with it",
            },
        },
        example={"op": "subscribe", "channel": "topic:orders.#", "since": 41, "id": 1},
        reply_optional=("since",),
    ),
    "unsubscribe": Op(
        summary="Stop a subscription",
        fields={
            "channel": {
                "type": "string",
                "description": "as subscribed; one that is not subscribed is no error",
            }
        },
        required=("channel",),
        reply="unsubscribed",
        reply_summary="Unsubscribed",
        reply_fields={"channel": {"type": "string"}},
        example={"op": "unsubscribe", "channel": "job:4bX0q9VJrR2m8kQ3sT1uYw"},
    ),
    "submit": Op(
        summary="Submit a job, as `POST /v1/jobs` does",
        fields={"job": {"$ref": SCHEMAS + "SubmitBody"}},
        required=("job",),
        reply="submitted",
        reply_summary="Accepted: the broker confirmed the job",
        reply_fields={
            "job": _JOB,
            "created": {
                "type": "boolean",
                "description": "false for a repeated `idempotency_key`: the job is the first"
                " one submitted with it (HTTP answers 200 for it, not 202)",
            },
        },
        example=None,  # the body names one of the served app's tasks
    ),
    "publish": Op(
        summary="Publish a message to a topic, as `POST /v1/topics/{topic}` does",
        fields={"topic": _TOPIC, "data": {"description": "the message: any JSON value"}},
        required=("topic", "data"),
        reply="published",
        reply_summary="Published: the broker confirmed the message",
        reply_fields={"topic": _TOPIC, "offset": OFFSET},
        example={"op": "publish", "topic": "orders.eu.paid", "data": {"order": 7}},
    ),
    "ping": Op(
        summary="Check that the server answers",
        fields={},
        required=(),
        reply="pong",
        reply_summary="The answer to `ping`",
        reply_fields={},
        example={"op": "ping", "id": "p1"},
    ),
    "auth": Op(
        summary="Authenticate (with `[auth] mode` token or jwt): the first frame, within"
        " `ws.auth_timeout` seconds, unless the handshake carried the token; again, as the same"
        " principal, to renew a JWT before or after it expires",
        fields={"token": {"type": "string", "minLength": 1, "description": "a bearer token"}},
        required=("token",),
        reply="authenticated",
        reply_summary="Authenticated: `principal` is who the connection acts as (null with"
        " auth off)",
        reply_fields={"principal": {"type": ["string", "null"]}},
        example={"op": "auth", "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig"},
    ),
}

PATTERN_RULES = (
    f"A topic pattern: 1 to {topics.MAX_BYTES} bytes (UTF-8) of dot-separated words of"
    " `A-Z a-z 0-9 _ -`, where a word may also be `*` (exactly one word) or `#` (zero or more"
    " words), as a whole word. Matched as a RabbitMQ topic exchange matches: `orders.*` takes"
    " `orders.eu` but not `orders.eu.paid`; `orders.#` takes both, and `orders`."
)


def _object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _described(values: Mapping[Key, str]) -> dict[str, Any]:
    """A string that is one of `values`' keys, each with its meaning."""
    return {"oneOf": [{"const": key, "description": meaning} for key, meaning in values.items()]}


def _message(name: str, summary: str, payload: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"name": name, "summary": summary, "payload": payload, **more}


def _messages() -> dict[str, Any]:
    """Every frame: the ops of `OPS` and their replies, then what the server pushes."""
    messages: dict[str, Any] = {}
    for name in OPS:
        op = OPS_DESCRIBED[name]
        fields = {"op": {"const": name}, **op.fields, "id": ID}
        payload = _object(["op", *op.required], fields)
        examples = {} if op.example is None else {"examples": [{"payload": op.example}]}
        messages[name] = _message(name, op.summary, payload, **examples)
        reply_fields = {"type": {"const": op.reply}, **op.reply_fields, "id": ECHOED_ID}
        always = [name for name in op.reply_fields if name not in op.reply_optional]
        reply = _object(["type", *always], reply_fields)
        messages[op.reply] = _message(op.reply, op.reply_summary, reply)
    messages["job"] = _message(
        "job",
        "An event of a job: its record as it is after the event",
        _object(
            ["type", "channel", "event", "job"],
            {
                "type": {"const": "job"},
                "channel": {
                    "type": "string",
                    "pattern": "^(job:|jobs:\\*$)",
                    "description": "`job:ID`, or `jobs:*` for every job's",
                },
                "event": _described(JOB_EVENTS),
                "job": _JOB,
            },
        ),
    )
    messages["queues"] = _message(
        "queues",
        "The queues' report, as `GET /v1/queues` answers it",
        _object(
            ["type", "channel", "queues", "dead_letter_queue"],
            {
                "type": {"const": "queues"},
                "channel": {"const": "queues"},
                "queues": {"$ref": SCHEMAS + "QueueList/properties/queues"},
                "dead_letter_queue": {"$ref": SCHEMAS + "QueueList/properties/dead_letter_queue"},
            },
        ),
    )
    messages["message"] = _message(
        "message",
        "A message published to a topic the subscribed pattern matches",
        _object(
            ["type", "channel", "topic", "offset", "data"],
            {
                "type": {"const": "message"},
                "channel": {
                    "type": "string",
                    "pattern": "^topic:",
                    "description": "the subscribed channel, `topic:PATTERN`",
                },
                "topic": _TOPIC,
                "offset": OFFSET,
                "data": {"description": "the message: the JSON value published"},
            },
        ),
    )
    messages["error"] = _message(
        "error",
        "An op that could not be served, or (`offset_expired`) a gap in a topic catch-up",
        _object(
            ["type", "code", "message"],
            {
                "type": {"const": "error"},
                "code": _described(ERRORS),
                "message": {"type": "string", "description": "what went wrong, for people"},
                "id": ECHOED_ID,
                "errors": {
                    "type": "array",
                    "items": {"$ref": SCHEMAS + "FieldError"},
                    "description": "`invalid_job`: each bad field of the submit body",
                },
                "retry_after": {
                    "type": "number",
                    "minimum": 0,
                    "description": "`rate_limited`: seconds until a publish is taken again",
                },
                "first": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "`offset_expired`: the oldest offset kept, sent next",
                },
                "channel": {
                    "type": "string",
                    "description": "`offset_expired`: the topic channel it happened on",
                },
            },
        ),
    )
    return messages


def _refs(kind: str, names: list[str]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/{kind}/{name}"} for name in names}


def _channels() -> dict[str, Any]:
    socket = [*OPS, *(op.reply for op in OPS_DESCRIBED.values()), "error"]
    return {
        "socket": {
            "address": "/v1/ws",
            "title": "The websocket",
            "description": "`GET /v1/ws` on the server that serves this document. Ops arrive"
            " here and are answered here.",
            "messages": _refs("messages", socket),
            "bindings": {"ws": {"method": "GET", "bindingVersion": "0.1.0"}},
        },
        "job": {
            "address": "job:{id}",
            "title": "One job's events",
            "description": "Subscribed to with `subscribe`: first a `snapshot` of the job's"
            " record, then every later event. An unknown job is an error `not_found`.",
            "parameters": {"id": {"description": "the job's id, as its submit answered it"}},
            "messages": _refs("messages", ["job"]),
        },
        "allJobs": {
            "address": ALL_JOBS,
            "title": "Every job's events",
            "description": "Subscribed to with `subscribe`; with auth on, only by a principal"
            " with `jobs:admin` (else an error `forbidden`). No snapshot: list the jobs"
            " (`GET /v1/jobs`) once subscribed, and apply the events that came meanwhile after"
            " the list. Progress coalesces per job for a slow reader.",
            "messages": _refs("messages", ["job"]),
        },
        "queues": {
            "address": QUEUES,
            "title": f"The queues' report, every {QUEUES_INTERVAL:g} s",
            "description": "Subscribed to with `subscribe` (with auth on, by `jobs:admin` only):"
            f" the report of `GET /v1/queues` at once, then every {QUEUES_INTERVAL:g} s, made once"
            " for all the"
            " subscribers; a slow reader gets only the newest. None while the broker is away.",
            "messages": _refs("messages", ["queues"]),
        },
        "topic": {
            "address": "topic:{pattern}",
            "title": "The messages of the topics a pattern matches",
            "description": "Subscribed to with `subscribe`, live from then on or, with `since`,"
            " from that offset. Messages past the retention are announced by an error"
            " `offset_expired`, never skipped in silence.",
            "parameters": {"pattern": {"description": PATTERN_RULES}},
            "messages": _refs("messages", ["message", "error"]),
        },
    }


def _in(channel: str, *messages: str) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in messages]


def _operations() -> dict[str, Any]:
    socket = {"$ref": "#/channels/socket"}
    # Any op may be answered with an error instead (`ping` too: a frame that is not JSON).
    operations: dict[str, Any] = {
        name: {
            "action": "receive",
            "channel": socket,
            "summary": OPS_DESCRIBED[name].summary,
            "messages": _in("socket", name),
            "reply": {
                "channel": socket,
                "messages": _in("socket", OPS_DESCRIBED[name].reply, "error"),
            },
        }
        for name in OPS
    }
    operations["jobEvents"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/job"},
        "summary": "A subscribed job's snapshot and events",
        "messages": _in("job", "job"),
    }
    operations["allJobEvents"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/allJobs"},
        "summary": "Every job's events, for `jobs:admin`",
        "messages": _in("allJobs", "job"),
    }
    operations["queueReports"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/queues"},
        "summary": f"The queues' report, every {QUEUES_INTERVAL:g} s",
        "messages": _in("queues", "queues"),
    }
    operations["topicMessages"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/topic"},
        "summary": "The messages of a subscribed pattern, and `offset_expired` in a catch-up",
        "messages": _in("topic", "message", "error"),
    }
    return operations


def document(request: web.Request) -> dict[str, Any]:
    """The AsyncAPI description of the websocket of the app that serves `request`."""
    shared = schemas()
    components = {name: shared[name] for name in SHARED_SCHEMAS}
    components["SubmitBody"] = submit_body(request.app[STATE])
    components["Topic"] = {**TOPIC_NAME, "description": "dot-separated words (CONTRACT §6)"}
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {"title": "aioqueue", "version": package_version(), "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "channels": _channels(),
        "operations": _operations(),
        "components": {"schemas": components, "messages": _messages()},
    }


@problems
async def asyncapi_json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=orjson.dumps(document(request)), content_type="application/json")
