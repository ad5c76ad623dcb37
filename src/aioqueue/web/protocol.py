"""The websocket protocol's vocabulary: the codes of `error` frames and the events of `job` frames.

One table each, read by ws.py and topichub.py (which send them), by `/asyncapi.json` (which
describes them) and by the tests, which check that the README's table of codes says the same
and that every code sent is here. The ops themselves are ws.py's `OPS`.

No I/O here.
"""

from __future__ import annotations

from typing import Literal

#: A code an `error` frame may carry. A Literal, so that mypy refuses a code missing from ERRORS
#: at each `FrameError(...)`; `tests/test_asyncapi.py` checks that the two list the same codes.
ErrorCode = Literal[
    "bad_frame",
    "unknown_op",
    "not_found",
    "invalid_job",
    "too_many_subscriptions",
    "conflict",
    "queue_full",
    "unavailable",
    "too_large",
    "rate_limited",
    "offset_expired",
    "unauthorized",
    "token_expired",
    "forbidden",
    "too_many_connections",
]

#: Every code an `error` frame carries, and what it means (Markdown: the README's table has the
#: same rows). Only what the server sends: the contract's auth codes wait for auth to be built.
ERRORS: dict[ErrorCode, str] = {
    "bad_frame": "not a JSON object, a binary frame, a missing or unknown `channel`, a bad topic"
    " name or pattern, a bad `since`, a `publish` without `data`",
    "unknown_op": "no `op`, or one the server does not have (the message lists those it has)",
    "not_found": "no such job (`subscribe`) or task (`submit`)",
    "invalid_job": "the submit body is invalid; `errors` names each bad field, as in the HTTP"
    " problems",
    "too_many_subscriptions": "the connection already has `ws.max_subscriptions`",
    "conflict": "the submit's idempotency key was used for another request (HTTP's 409)",
    "queue_full": "the submit's queue is at `broker.max_queue_length`, or jobs not finished fill"
    " the job store (`store.max_bytes`): not accepted, try later (HTTP's 429)",
    "unavailable": "the broker is unreachable, or the service is starting or stopping (HTTP's 503)",
    "too_large": "a published message over `topics.max_message_bytes`, or a submit's args"
    " over `jobs.max_args_bytes`, as JSON (HTTP's 413)",
    "rate_limited": "over `ws.max_publishes_per_second` on this connection, or over"
    " `auth.max_submits_per_second` of the principal; `retry_after` says in how many seconds"
    " there is room (HTTP's 429)",
    "unauthorized": "an op before `auth`, or an `auth` whose token is refused (then the"
    " connection closes with 1008) (HTTP's 401)",
    "token_expired": "the connection's JWT expired: send a new `auth` within `ws.auth_timeout`"
    " seconds, or it closes with 1008",
    "forbidden": "the principal's scopes do not allow this op on this job, task or topic"
    " (HTTP's 403)",
    "too_many_connections": "the principal has `auth.max_websockets` open already; the"
    " connection closes with 1013",
    "offset_expired": "(not a refusal) the messages right after `since` are past the retention:"
    " `first` is the oldest one kept, and the subscription goes on from it",
}

#: The `event` of a `job` frame, and when it is sent. The store's events (`jobs.EventType`) less
#: `retried`, which subscribers see as `queued`; plus `scheduled`, a new job's other first status,
#: and `snapshot`, which ws.py sends on `subscribe`.
JOB_EVENTS: dict[str, str] = {
    "snapshot": "the job's record as it is when the subscription begins (right after"
    " `subscribed`): a client that subscribes after the job finished still gets its result",
    "queued": "submitted, or run again by `POST /v1/jobs/{id}/retry` (attempt 1 of a new run)",
    "scheduled": "submitted with a `delay` or `run_at`: waiting for it",
    "started": "an attempt began to run",
    "progress": "the task reported progress (`job.progress`); a slow reader gets only the newest"
    " of those still queued for it",
    "retrying": "an attempt failed; the next one runs after its back-off",
    "succeeded": "the task returned: `job.result` holds what it returned",
    "failed": "the task raised or timed out on its last attempt: `job.error` says how",
    "dead": "the broker dead-lettered the job before the task could finish",
    "cancelled": "cancelled before it finished",
}

#: The event a job channel starts with (ws.py sends it on `subscribe`).
SNAPSHOT = "snapshot"
