"""`GET /openapi.json`: the OpenAPI 3.1 description of the HTTP API that `install()` serves.

Plain Python data, built per request from the served app: the submit body lists the app's own
tasks, each with the JSON Schema of its `args` (from the task's signature, the same source as
the submit-time check) and the app's queues, so that a client, or a fuzzer such as schemathesis,
can tell a valid submit from an invalid one. The description says what the server does, no more:
every status code listed is one the handler can answer, and `tests/test_openapi.py` checks that
every route on the router is described. The websocket (`GET /v1/ws`) is no request/response
operation OpenAPI can describe: `/asyncapi.json` (asyncapi.py) does, with the job record and the
submit body from here (`schemas`, `submit_body`), and the same version.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from aioqueue import deadletters, submission, topics
from aioqueue.broker.base import PRIORITY_BANDS
from aioqueue.jobs import JobStatus
from aioqueue.runner import MAX_PROGRESS_MESSAGE
from aioqueue.tasks import PRIORITIES
from aioqueue.web.dashboard import ASSETS
from aioqueue.web.handlers import MAX_LIMIT, MAX_WAIT
from aioqueue.web.problems import problems
from aioqueue.web.state import STATE, State

if TYPE_CHECKING:
    from aioqueue.tasks import Task

OPENAPI_VERSION = "3.1.0"
#: Routes on the router that are deliberately not operations here (see the module's doc).
UNDESCRIBED = frozenset({("GET", "/v1/ws")})

JSON = "application/json"
#: What GET /metrics answers (prometheus-client's CONTENT_TYPE_PLAIN_0_0_4 says charset=utf-8 too).
METRICS_TEXT = "text/plain; version=0.0.4"
PROBLEM = "application/problem+json"
SCHEMAS = "#/components/schemas/"

DESCRIPTION = """\
From an HTTP request to a background job to a live result. Errors are RFC 9457 problem \
documents (`application/problem+json`); validation errors name each bad field in `errors`. \
An integer is written without a fraction: `2.0` is a float, which no integer field takes.

The websocket `GET /v1/ws` (not described here: OpenAPI has no way to) takes text frames of \
one JSON object each: `{"op": "subscribe", "channel": "job:ID"}` (or `"topic:PATTERN"`), \
`unsubscribe`, `{"op": "submit", "job": <the body of POST /v1/jobs>}`, `publish` and `ping`; \
it pushes `{"type": "job", "channel", "event", "job": <job record>}` and topic `message` \
frames. `GET /asyncapi.json` describes it: its AsyncAPI 3.0 document."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def _nullable(schema: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """`schema` or null: every optional submit field takes null for "not given"."""
    nullable: dict[str, Any] = {"anyOf": [schema, {"type": "null"}]}
    if description:
        nullable["description"] = description
    return nullable


def _content(schema: dict[str, Any], media: str = JSON) -> dict[str, Any]:
    return {media: {"schema": schema}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _content(schema)}


def _job_links(response: dict[str, Any]) -> dict[str, Any]:
    """`response` (a job record) with links to what can be done with the job next."""
    by_id = {"id": "$response.body#/id"}
    response["links"] = {
        name: {"operationId": operation, "parameters": by_id}
        for name, operation in (
            ("GetJob", "getJob"),
            ("CancelJob", "cancelJob"),
            ("RetryJob", "retryJob"),
        )
    }
    return response


def _problem(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": _content(_ref("Problem"), PROBLEM),
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before trying again",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return response


def _bad_request() -> dict[str, Any]:
    response = _problem(
        "bad JSON, a bad field or query parameter: a problem document whose `errors` names "
        "each; or a request that is not well-formed HTTP (a request line or a header over 8190 "
        "bytes, raw non-ASCII bytes in the URL), which the HTTP server refuses before the API "
        "sees it: a problem document under `aioqueue serve`, text/plain where aioqueue is mounted "
        "in another application"
    )
    response["content"]["text/plain"] = {"schema": {"type": "string"}}
    return response


# The error answers, by status; each operation lists the ones its handler can give. Every one
# can give a 400: aiohttp's HTTP parser answers a malformed request itself.
ERRORS: dict[str, dict[str, Any]] = {
    "400": _bad_request(),
    "404": _problem("no such job (or, on submit, no such task)"),
    "408": _problem("the body did not arrive within `http.body_timeout`"),
    "409": _problem("the job is in the wrong state, or an idempotency key was reused"),
    "413": _problem(
        "the body is larger than `http.max_body_bytes`; a job's args, larger than"
        " `jobs.max_args_bytes`; a message to a topic, larger than `topics.max_message_bytes`"
    ),
    "415": _problem("the body is not declared as JSON"),
    "429": _problem(
        "the queue is full (`broker.max_queue_length`), jobs not finished fill the job store"
        " (`store.max_bytes`), or the principal is over `auth.max_submits_per_second`; not"
        " accepted",
        True,
    ),
    "503": _problem("the broker is unavailable, or the service is starting or stopping", True),
}


def _errors(*statuses: int) -> dict[str, dict[str, Any]]:
    return {str(status): ERRORS[str(status)] for status in statuses}


UNAUTHORIZED = _problem("no credentials, or refused ones (see the `WWW-Authenticate` header)")
UNAUTHORIZED["headers"] = {
    "WWW-Authenticate": {"required": True, "schema": {"type": "string", "pattern": "^Bearer"}}
}
FORBIDDEN = _problem("the principal's scopes do not allow this")
#: Operations that change something: each is counted against `auth.max_submits_per_second`.
WRITES = frozenset(
    {"submitJob", "cancelJob", "retryJob", "publish", "retryDeadLetters", "purgeDeadLetters"}
)
#: Operations any authenticated principal may call, whatever its scopes.
ANY_PRINCIPAL = frozenset({"listTasks"})


def _secure(paths: dict[str, Any]) -> None:
    """With auth on: the operations under /v1/ need a bearer token (401), and scopes (403);
    the writes are rate-limited per principal (429)."""
    for path, item in paths.items():
        if not path.startswith("/v1/"):
            continue
        for operation in item.values():
            if not isinstance(operation, dict):  # the path's `parameters`
                continue
            operation["security"] = [{"bearer": []}]
            responses = operation["responses"]
            responses["401"] = UNAUTHORIZED
            if operation["operationId"] not in ANY_PRINCIPAL:
                responses["403"] = FORBIDDEN
            if operation["operationId"] in WRITES:
                responses["429"] = ERRORS["429"]


#: A topic message's offset (the websocket's frames carry it too).
OFFSET = {
    "type": "integer",
    "minimum": 0,
    "description": "the message's place in the topic log: strictly increasing, the same on every"
    " process; subscribe with `since` to resume after it",
}
#: A topic name (CONTRACT §6); UTF-8 bytes are checked apart, `maxLength` counts characters.
TOPIC_NAME = {"type": "string", "pattern": topics.TOPIC_PATTERN, "maxLength": topics.MAX_BYTES}


def _submit_fields(queues: list[str], max_timeout: float) -> dict[str, Any]:
    """The optional submit fields (all but `task` and `args`), as `build_spec` checks them."""
    delay = {"type": "number", "minimum": 0, "maximum": submission.MAX_DELAY}
    run_at = {"type": "string", "format": "date-time"}
    key = {"type": "string", "minLength": 1, "maxLength": submission.MAX_KEY_LENGTH}
    fields: dict[str, Any] = {
        "queue": _nullable({"enum": queues}, "default: the task's queue"),
        "priority": _nullable(
            {"type": "integer", "minimum": PRIORITIES[0], "maximum": PRIORITIES[-1]},
            "higher runs first; default: the task's",
        ),
        "delay": _nullable(delay, "seconds from now; excludes run_at"),
        "run_at": _nullable(
            run_at,
            "RFC 3339 with a zone; a time past means now; at most "
            f"{submission.MAX_DELAY:.0f} s ahead (else 400); excludes delay",
        ),
        "max_attempts": _nullable({"type": "integer", "minimum": 1, "maximum": 1000}),
        "timeout": _nullable(
            {"type": "number", "exclusiveMinimum": 0, "maximum": max_timeout},
            "seconds one attempt may run",
        ),
        "ttl": _nullable(
            {"type": "number", "exclusiveMinimum": 0, "maximum": submission.MAX_DELAY},
            "seconds the job may wait to start, from when it is due; then it is `dead`",
        ),
        "idempotency_key": _nullable(
            key, "as the Idempotency-Key header; if both are given they must be the same"
        ),
    }
    return fields


def submit_body(state: State) -> Any:
    """The JSON Schema of the submit body of the app `state` serves (POST /v1/jobs, and the
    websocket's `submit` op)."""
    tasks = sorted(state.registry.tasks.values(), key=lambda task: task.name)
    queues = sorted({task.queue for task in tasks})
    # The longest timeout a submit may ask for depends on the broker: the service's own bound
    # (Service.__init__ decides it), which the producer passes to `build_spec`.
    service = state.service
    max_timeout = submission.MAX_TIMEOUT if service is None else service.jobs.max_timeout
    return _submit_body(tasks, queues, max_timeout)


def _submit_body(tasks: list[Task[Any, Any]], queues: list[str], max_timeout: float) -> Any:
    """One branch per task: its name, the JSON Schema of its args, and the common fields."""
    fields = _submit_fields(queues, max_timeout)
    branches = []
    for task in tasks:
        args = task.signature.args_schema()
        # A task with a required parameter needs `args`; null or no `args` means none.
        needs_args = any(p.required for p in task.signature.params)
        branches.append(
            {
                "type": "object",
                "title": task.name,
                "properties": {"task": {"const": task.name}, "args": args, **fields},
                "required": ["task", "args"] if needs_args else ["task"],
                "additionalProperties": False,
                # `delay` and `run_at` exclude each other (null counts as not given).
                "not": {
                    "required": ["delay", "run_at"],
                    "properties": {"delay": {"type": "number"}, "run_at": {"type": "string"}},
                },
            }
        )
    # An app with no tasks takes no submit at all.
    return {"oneOf": branches} if branches else {"not": {}}


def schemas() -> dict[str, Any]:
    """The response bodies: the job record, its list, the tasks, the problem document (the job
    record and its parts are the websocket's too, in /asyncapi.json)."""
    time = {"type": "string", "format": "date-time"}
    maybe_time = {"type": ["string", "null"], "format": "date-time"}
    return {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "errors": {"type": "array", "items": _ref("FieldError")},
            },
        },
        "FieldError": {
            "type": "object",
            "required": ["field", "message"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
        },
        "JobStatus": {"enum": [status.value for status in JobStatus]},
        "Job": {
            "type": "object",
            "required": [
                "id",
                "task",
                "queue",
                "status",
                "args",
                "attempt",
                "max_attempts",
                "progress",
                "result",
                "error",
                "owner",
                "created_at",
                "scheduled_for",
                "started_at",
                "finished_at",
            ],
            "properties": {
                "id": {"type": "string"},
                "task": {"type": "string"},
                "queue": {"type": "string"},
                "status": _ref("JobStatus"),
                "args": {"type": ["object", "array", "null"]},
                "attempt": {"type": "integer", "minimum": 1},
                "max_attempts": {"type": "integer", "minimum": 1},
                "progress": {
                    "type": ["object", "null"],
                    "required": ["value", "message"],
                    "properties": {
                        "value": {"type": "number"},
                        "message": {
                            "type": ["string", "null"],
                            "description": f"cut to {MAX_PROGRESS_MESSAGE} characters, with a"
                            " marker",
                        },
                    },
                },
                "result": {
                    "description": "what the task returned (any JSON), at most"
                    " `jobs.max_result_bytes` of it: a larger one fails the job (ResultTooLarge)"
                },
                "error": {
                    "type": ["object", "null"],
                    "description": "message and traceback are cut to `jobs.max_error_bytes`"
                    " characters each, with a marker",
                    "required": ["type", "message"],
                    "properties": {
                        "type": {"type": "string"},
                        "message": {"type": "string"},
                        "traceback": {
                            "type": ["string", "null"],
                            "description": "null unless the caller may see tracebacks: auth"
                            " off, or the scope jobs:admin",
                        },
                    },
                },
                "owner": {
                    "type": ["string", "null"],
                    "description": "the principal that submitted the job; null with auth off",
                },
                "created_at": time,
                "scheduled_for": maybe_time,
                "started_at": maybe_time,
                "finished_at": maybe_time,
            },
        },
        "JobList": {
            "type": "object",
            "required": ["jobs", "next"],
            "properties": {
                "jobs": {"type": "array", "items": _ref("Job")},
                "next": {
                    "type": ["string", "null"],
                    "description": "the cursor of the next page; null on the last",
                },
            },
        },
        "TaskList": {
            "type": "object",
            "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "items": _ref("Task")}},
        },
        "Task": {
            "type": "object",
            "required": ["name", "queue", "params", "max_attempts", "timeout"],
            "properties": {
                "name": {"type": "string"},
                "queue": {"type": "string"},
                "params": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "type", "required", "default"],
                        "properties": {
                            "name": {"type": "string"},
                            "type": {"type": "string"},
                            "required": {"type": "boolean"},
                            "default": {},
                        },
                    },
                },
                "max_attempts": {"type": "integer"},
                "timeout": {"type": "number"},
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}},
        },
        "Ready": {
            "type": "object",
            "required": ["status", "stuck_threads"],
            "properties": {
                "status": {"const": "ready"},
                "stuck_threads": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "threads of sync tasks whose attempt is over (timed out,"
                    " cancelled) but that still run; each holds a slot of its job's queue until"
                    " it returns, and only a restart reclaims one that never does",
                },
            },
        },
        "ScheduleList": {
            "type": "object",
            "required": ["schedules"],
            "properties": {"schedules": {"type": "array", "items": _ref("Schedule")}},
        },
        "Schedule": {
            "type": "object",
            "description": "a periodic task (`@app.periodic`): `cron` or `every`",
            "required": [
                "task",
                "catch_up",
                "grace",
                "next_run_at",
                "leader",
                "last_tick_at",
                "last_job_id",
            ],
            "oneOf": [{"required": ["cron"]}, {"required": ["every"]}],
            "properties": {
                "task": {"type": "string"},
                "cron": {"type": "string", "description": "a cron expression, in UTC"},
                "every": {"type": "number", "exclusiveMinimum": 0, "description": "seconds"},
                "catch_up": {
                    "enum": ["once", "skip"],
                    "description": "what happens to ticks missed while no process ran the"
                    " schedule (found more than `grace` late): the latest is submitted once,"
                    " or none is",
                },
                "grace": {
                    "type": "number",
                    "minimum": 0,
                    "description": "seconds a tick may be late and still be submitted on its"
                    " own (a failover)",
                },
                "next_run_at": {
                    **maybe_time,
                    "description": "the next tick; null if the schedule has none to come",
                },
                "leader": {
                    "type": "boolean",
                    "description": "whether this process is the one that submits the ticks (one"
                    " process at a time is)",
                },
                "last_tick_at": {
                    **maybe_time,
                    "description": "the latest tick submitted (its job's idempotency key is"
                    " `periodic:TASK:` and this time), as the event log holds it",
                },
                "last_job_id": {"type": ["string", "null"], "description": "that tick's job"},
            },
        },
        "Published": {
            "type": "object",
            "required": ["topic", "offset"],
            "properties": {
                "topic": {"type": "string"},
                "offset": OFFSET,
            },
        },
        **_operations_schemas(),
    }


def _operations_schemas() -> dict[str, Any]:
    """The bodies of GET /v1/queues and of the dead-letter operations."""
    count = {"type": "integer", "minimum": 0}
    maybe_count = {"type": ["integer", "null"], "minimum": 0}
    name = {"type": "string", "minLength": 1, "maxLength": deadletters.MAX_NAME}
    band = {
        "type": "object",
        "required": ["depth", "consumers"],
        "properties": {"depth": count, "consumers": count},
    }
    return {
        "Queue": {
            "type": "object",
            "required": [
                "name",
                "depth",
                "bands",
                "consumers",
                "running",
                "in_per_s",
                "out_per_s",
                "oldest_age_s",
                "dead",
            ],
            "properties": {
                "name": {"type": "string"},
                "depth": {
                    **maybe_count,
                    "description": "jobs ready in the broker, every band; null while the broker"
                    " is unreachable (so are bands and consumers)",
                },
                "bands": {
                    "type": ["object", "null"],
                    "description": "depth and consumers of each priority band",
                    "required": list(PRIORITY_BANDS),
                    "properties": dict.fromkeys(PRIORITY_BANDS, band),
                    "additionalProperties": False,
                },
                "consumers": {**maybe_count, "description": "the fewest of any band"},
                "running": {**count, "description": "jobs running, in every process"},
                "in_per_s": {
                    "type": "number",
                    "minimum": 0,
                    "description": "jobs and attempts sent to the queue per second (queued,"
                    " scheduled, retrying) over the last minute, in every process",
                },
                "out_per_s": {
                    "type": "number",
                    "minimum": 0,
                    "description": "attempts started per second over the last minute",
                },
                "oldest_age_s": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "description": "seconds since the oldest queued job was created; null if"
                    " none is queued",
                },
                "dead": {**count, "description": "the queue's failed and dead jobs kept"},
            },
        },
        "QueueList": {
            "type": "object",
            "required": ["queues", "dead_letter_queue"],
            "properties": {
                "queues": {"type": "array", "items": _ref("Queue")},
                "dead_letter_queue": {
                    "type": "object",
                    "required": ["messages", "max_length", "max_age_seconds"],
                    "properties": {
                        "messages": {
                            **maybe_count,
                            "description": "messages in the dead-letter queue; null while the"
                            " broker is unreachable",
                        },
                        "max_length": count,
                        "max_age_seconds": count,
                    },
                },
            },
        },
        "DeadFilter": {
            "type": "object",
            "description": "the failed and dead jobs that match every field given; at least"
            ' one of task, error_type, before, or "all": true',
            "properties": {
                "task": name,
                "error_type": {**name, "description": "the type of the job's error"},
                "before": {
                    "type": "string",
                    "format": "date-time",
                    "description": "jobs that finished before this time (RFC 3339)",
                },
                "all": {
                    "type": "boolean",
                    "description": "true, with no other field: every dead letter",
                },
                "dry_run": {
                    "type": "boolean",
                    "description": "count the jobs that match, and change nothing",
                },
            },
            "additionalProperties": False,
            "anyOf": [
                {"required": ["task"]},
                {"required": ["error_type"]},
                {"required": ["before"]},
                {"required": ["all"], "properties": {"all": {"const": True}}},
            ],
        },
        "DeadRetried": {
            "type": "object",
            "required": ["count"],
            "properties": {
                "count": {**count, "description": "jobs retried (with dry_run: that match)"},
                "left": {
                    **count,
                    "description": "jobs that match and were not retried: a full queue or job"
                    " store, or the broker away, stopped it (absent with dry_run)",
                },
            },
        },
        "DeadPurged": {
            "type": "object",
            "required": ["count"],
            "properties": {
                "count": {**count, "description": "jobs purged (with dry_run: that match)"},
                "removed": {
                    **count,
                    "description": "messages taken out of the dead-letter queue (absent with"
                    " dry_run)",
                },
            },
        },
    }


TOPIC = {
    "name": "topic",
    "in": "path",
    "required": True,
    "description": "dot-separated words of A-Z a-z 0-9 _ -, 1 to 255 bytes (CONTRACT §6)",
    "schema": TOPIC_NAME,
}

JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    # Ids this server makes are URL-safe base64; any other is simply unknown (404).
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
}


def _paths(submit_body: Any) -> dict[str, Any]:
    job = _ref("Job")
    return {
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "the same as the body's idempotency_key: a repeat "
                        "within `jobs.result_ttl` returns the first job with 200",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": submission.MAX_KEY_LENGTH,
                        },
                    }
                ],
                "requestBody": {"required": True, "content": _content(submit_body)},
                "responses": {
                    "202": _job_links(_ok("accepted: the broker confirmed the job", job)),
                    "200": _job_links(_ok("a repeated idempotency key: the first job", job)),
                    **_errors(400, 404, 408, 409, 413, 415, 429, 503),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "Recent jobs, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "style": "form",
                        "explode": False,
                        "description": "one or several statuses, comma-separated",
                        "schema": {"type": "array", "items": _ref("JobStatus"), "minItems": 1},
                    },
                    {"name": "task", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "error_type",
                        "in": "query",
                        "description": "jobs whose error has this type",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "finished_after",
                        "in": "query",
                        "description": "jobs that finished at this time (RFC 3339) or later",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "finished_before",
                        "in": "query",
                        "description": "jobs that finished before this time (RFC 3339)",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": 50,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "opaque: the `next` of the previous page",
                        "schema": {"type": "string", "minLength": 1},
                    },
                ],
                "responses": {
                    "200": _ok(
                        "a page of jobs: `limit` of them, or fewer where the body would pass"
                        " `http.max_list_bytes` (one job at least); `next` goes on from there",
                        _ref("JobList"),
                    ),
                    **_errors(400, 503),
                },
            },
        },
        "/v1/jobs/{id}": {
            "parameters": [JOB_ID],
            "get": {
                "operationId": "getJob",
                "summary": "One job; with `wait`, long-poll until it is terminal",
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "description": f"seconds to wait for a terminal status; above "
                        f"{MAX_WAIT:g} counts as {MAX_WAIT:g}",
                        "schema": {"type": "number", "minimum": 0},
                    }
                ],
                "responses": {"200": _ok("the job record", job), **_errors(400, 404, 503)},
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a queued, scheduled, retrying or running job",
                "responses": {"202": _ok("cancelling", job), **_errors(400, 404, 409, 503)},
            },
        },
        "/v1/jobs/{id}/retry": {
            "parameters": [JOB_ID],
            "post": {
                "operationId": "retryJob",
                "summary": "Run a failed, dead or cancelled job again (same id, attempt 1)",
                "responses": {"202": _ok("queued again", job), **_errors(400, 404, 409, 429, 503)},
            },
        },
        "/v1/topics/{topic}": {
            "parameters": [TOPIC],
            "post": {
                "operationId": "publish",
                "summary": "Publish a message (any JSON value) to a topic",
                "requestBody": {"required": True, "content": _content({})},
                "responses": {
                    "202": _ok("published: the broker confirmed it", _ref("Published")),
                    **_errors(400, 408, 413, 415, 503),
                },
            },
        },
        **_operations_paths(),
        "/v1/tasks": {
            "get": {
                "operationId": "listTasks",
                "summary": "The registered tasks",
                "responses": {"200": _ok("the tasks", _ref("TaskList")), **_errors(400)},
            }
        },
        "/v1/schedules": {
            "get": {
                "operationId": "listSchedules",
                "summary": "The periodic tasks' schedules, with their next run (needs jobs:admin)",
                "responses": {
                    "200": _ok("the schedules", _ref("ScheduleList")),
                    **_errors(400, 503),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is alive",
                "responses": {"200": _ok("alive", _ref("Status")), **_errors(400)},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Broker connected, topology declared, consumers running",
                "responses": {
                    "200": _ok("ready, with the count of stuck threads", _ref("Ready")),
                    **_errors(400),
                    "503": _problem("not ready; `detail` says why", retry_after=True),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This description",
                "responses": {"200": _ok("OpenAPI 3.1", {"type": "object"}), **_errors(400)},
            }
        },
        "/asyncapi.json": {
            "get": {
                "operationId": "asyncapi",
                "summary": "The AsyncAPI 3.0 description of the websocket `GET /v1/ws`",
                "responses": {"200": _ok("AsyncAPI 3.0", {"type": "object"}), **_errors(400)},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this process (jobs, queues, broker, websockets,"
                " event log, HTTP); open unless `[metrics] require_admin`",
                "responses": {
                    "200": {
                        "description": "the Prometheus text exposition format 0.0.4",
                        "content": {METRICS_TEXT: {"schema": {"type": "string"}}},
                    },
                    **_errors(400),
                },
            }
        },
    }


def _operations_paths() -> dict[str, Any]:
    """GET /v1/queues and the dead-letter operations (jobs:admin, with auth on)."""
    body = {"required": True, "content": _content(_ref("DeadFilter"))}
    return {
        "/v1/queues": {
            "get": {
                "operationId": "listQueues",
                "summary": "Each queue: depth per band, consumers, rates, oldest job, dead letters",
                "responses": {"200": _ok("the queues", _ref("QueueList")), **_errors(400, 503)},
            }
        },
        "/v1/dead/retry": {
            "post": {
                "operationId": "retryDeadLetters",
                "summary": "Run again every failed and dead job that matches",
                "requestBody": body,
                "responses": {
                    "200": _ok("retried", _ref("DeadRetried")),
                    **_errors(400, 408, 413, 415, 429, 503),
                },
            }
        },
        "/v1/dead/purge": {
            "post": {
                "operationId": "purgeDeadLetters",
                "summary": "Forget every failed and dead job that matches, and its dead letters",
                "requestBody": body,
                "responses": {
                    "200": _ok("purged", _ref("DeadPurged")),
                    **_errors(400, 408, 413, 415, 503),
                },
            }
        },
    }


def _dashboard_paths(path: str) -> dict[str, Any]:
    """The dashboard's page and files (`[dashboard]`): open to anyone, whatever the auth mode,
    since they hold no secret; the API calls the page makes are checked as any others."""
    unchanged = {"description": "unchanged since the `ETag` sent in `If-None-Match`"}
    return {
        path: {
            "get": {
                "operationId": "dashboard",
                "summary": "The dashboard: one page, live over the websocket (see the README)",
                "responses": {
                    "200": {
                        "description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "304": unchanged,
                    **_errors(400),
                },
            }
        },
        path + "/{asset}": {
            "get": {
                "operationId": "dashboardAsset",
                "summary": "The dashboard's script or style sheet",
                "parameters": [
                    {
                        "name": "asset",
                        "in": "path",
                        "required": True,
                        "schema": {
                            "type": "string",
                            "enum": [a for a in ASSETS if a != "index.html"],
                        },
                    }
                ],
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                        },
                    },
                    "304": unchanged,
                    "404": _problem("no such file in the dashboard"),
                    **_errors(400),
                },
            }
        },
    }


def document(request: web.Request) -> dict[str, Any]:
    """The OpenAPI description of the app that serves `request`."""
    state = request.app[STATE]
    paths = _paths(submit_body(state))
    if state.settings.dashboard.enabled:
        paths |= _dashboard_paths(state.settings.dashboard.path)
    components: dict[str, Any] = {"schemas": schemas()}
    if state.authenticator is not None:
        _secure(paths)
        if state.settings.metrics.require_admin:
            operation = paths["/metrics"]["get"]
            operation["security"] = [{"bearer": []}]
            operation["responses"] |= {"401": UNAUTHORIZED, "403": FORBIDDEN}
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": f"a token of `[auth] mode = {state.settings.auth.mode!r}`",
            }
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "aioqueue", "version": package_version(), "description": DESCRIPTION},
        "paths": paths,
        "components": components,
    }


@functools.cache
def package_version() -> str:
    """aioqueue's version: /openapi.json's and /asyncapi.json's `info.version`."""
    try:
        return version("aioqueue")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0"


@problems
async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=orjson.dumps(document(request)), content_type=JSON)
