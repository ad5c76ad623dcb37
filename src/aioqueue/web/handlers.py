"""The HTTP API (CONTRACT §2): thin handlers that check input, call the service, render JSON."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from aioqueue.auth import Principal
from aioqueue.deadletters import parse_filter
from aioqueue.errors import (
    FieldError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from aioqueue.jobs import Job, JobStatus
from aioqueue.store import JobFilter
from aioqueue.submission import RFC3339_EXPECTED, parse_time
from aioqueue.topics import check_topic
from aioqueue.web.problems import problem, problems
from aioqueue.web.state import STATE

if TYPE_CHECKING:
    from aioqueue.deadletters import DeadFilter, DeadLetters
    from aioqueue.producer import Jobs

#: `?wait=` above this many seconds counts as this many.
MAX_WAIT = 60.0
MAX_LIMIT = 1000


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON: 415 unless declared JSON, 413 if too large, 400 if not JSON."""
    mime = request.content_type
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        raise UnsupportedMediaType(f"send the body as application/json, not {mime or 'nothing'}")
    limit = request.app[STATE].settings.http.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes (http.max_body_bytes)")
    seconds = request.app[STATE].settings.http.body_timeout
    try:
        # A client that stops sending mid-body would hold this handler for ever.
        async with asyncio.timeout(seconds):
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {seconds:g} s") from None
    if len(body) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes (http.max_body_bytes)")
    if not body:
        raise InvalidRequest("the body is empty; send a JSON object", [FieldError("body", "empty")])
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the body is not valid JSON: {exc}", [FieldError("body", str(exc))]
        ) from None


def _check_query(query: MultiMapping[str], allowed: Collection[str]) -> None:
    errors = [FieldError(key, "unknown query parameter") for key in query if key not in allowed]
    errors += [
        FieldError(k, "given more than once") for k in allowed if len(query.getall(k, [])) > 1
    ]
    if errors:
        raise InvalidRequest("invalid query parameters", errors)


def job_response(job: Job, who: Principal, status: int = 200) -> web.Response:
    return json_response(job.to_dict(traceback=who.sees_everything), status)


@problems
async def submit_job(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = state.caller(request)
    state.limits.check_write(who)
    jobs = state.jobs()
    body = await read_json(request)
    if isinstance(body, dict) and isinstance(body.get("task"), str):
        who.check_submit(body["task"])
    job, created = await jobs.submit_once(body, _idempotency_header(request), who.name)
    return job_response(job, who, status=202 if created else 200)


def _idempotency_header(request: web.Request) -> str | None:
    """The Idempotency-Key header, if it is text. aiohttp keeps bytes that are not UTF-8 as lone
    surrogates, which no JSON encoder takes: the key, stored with the job, was a 500."""
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        try:
            key.encode()
        except UnicodeEncodeError:
            error = FieldError("Idempotency-Key", "expected UTF-8 text")
            raise InvalidRequest("invalid Idempotency-Key header", [error]) from None
    return key


@problems
async def get_job(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = state.caller(request)
    jobs = state.jobs()
    _check_query(request.query, {"wait"})
    wait = request.query.get("wait")
    seconds = 0.0 if wait is None else _wait_seconds(wait)
    who.check_read(jobs.known(request.match_info["id"]))
    job = await jobs.wait_terminal(request.match_info["id"], seconds)
    return job_response(job, who)


def _wait_seconds(raw: str) -> float:
    # float() also reads "1_0" and digits of other scripts; `limit` takes neither (`_limit`).
    try:
        seconds = float(raw) if raw.isascii() and "_" not in raw else math.nan
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest("invalid wait", [FieldError("wait", "expected seconds, 0 to 60")])
    return min(seconds, MAX_WAIT)


@problems
async def cancel_job(request: web.Request) -> web.StreamResponse:
    who, jobs = _changing(request)
    job = await jobs.cancel(request.match_info["id"])
    return job_response(job, who, status=202)


@problems
async def retry_job(request: web.Request) -> web.StreamResponse:
    who, jobs = _changing(request)
    job = await jobs.retry(request.match_info["id"])
    return job_response(job, who, status=202)


def _changing(request: web.Request) -> tuple[Principal, Jobs]:
    """The caller of a cancel or retry, once it may change the job (401, 429, 404, 403)."""
    state = request.app[STATE]
    who = state.caller(request)
    state.limits.check_write(who)
    jobs = state.jobs()
    who.check_change(jobs.known(request.match_info["id"]))
    return who, jobs


@problems
async def list_jobs(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    owner = state.caller(request).list_owner()
    jobs = state.jobs()
    query = request.query
    _check_query(query, LIST_FILTERS)
    errors: list[FieldError] = []
    statuses: set[JobStatus] = set()
    # Exactly the names, comma-separated: an empty or padded one is a 400, not ignored.
    for name in query["status"].split(",") if "status" in query else ():
        try:
            statuses.add(JobStatus(name))
        except ValueError:
            errors.append(FieldError("status", f"unknown status {name[:40]!r}"))
    limit = _limit(query.get("limit", "50"))
    if not 1 <= limit <= MAX_LIMIT:
        errors.append(FieldError("limit", f"expected an integer from 1 to {MAX_LIMIT}"))
    times = {key: _time(query, key, errors) for key in ("finished_after", "finished_before")}
    if errors:
        raise InvalidRequest("invalid query parameters", errors)
    most = state.settings.http.max_list_bytes
    where = JobFilter(statuses, query.get("task"), owner, query.get("error_type"), **times)
    page = jobs.page(where, limit, query.get("cursor"))
    with contextlib.closing(page):
        # Only `jobs:admin` (or anyone, with auth off) sees every job, and tracebacks.
        body = list_body(page, most, tracebacks=owner is None)
    return web.Response(body=body, content_type="application/json")


#: The query parameters of `GET /v1/jobs`.
LIST_FILTERS = frozenset(
    {"status", "task", "error_type", "finished_after", "finished_before", "limit", "cursor"}
)


def _time(query: MultiMapping[str], key: str, errors: list[FieldError]) -> float | None:
    if key not in query:
        return None
    try:
        return parse_time(query[key])
    except ValueError:
        errors.append(FieldError(key, RFC3339_EXPECTED))
        return None


def list_body(
    page: Iterable[tuple[Job, str | None]], most: int, *, tracebacks: bool = True
) -> bytes:
    """`{"jobs": [...], "next": cursor}` of the jobs of `page` (each with the cursor after it)
    that fit in `most` bytes, the first one whatever its size; `next` goes on after the last
    one taken. Each job is encoded as it comes, and the rest are never read: a page of 1000
    large jobs was once a body of 181 MiB, and three times that of memory at its peak."""
    parts: list[bytes] = []
    size = 0  # of the parts, with the commas between them
    following: str | None = None
    for job, after in page:
        part = orjson.dumps(job.to_dict(tracebacks))
        grown = size + len(part) + (1 if parts else 0)
        if parts and _LIST_FRAME + grown + len(orjson.dumps(after)) > most:
            break  # `following` stays the cursor after the last job taken
        parts.append(part)
        size, following = grown, after
    return b'{"jobs":[' + b",".join(parts) + b'],"next":' + orjson.dumps(following) + b"}"


#: The bytes of a list body around its jobs and its cursor: `{"jobs":[`, `],"next":` and `}`.
_LIST_FRAME = len(b'{"jobs":[],"next":}')


def _limit(text: str) -> int:
    """The `limit` query parameter, or 0 if it is not a whole number written in ASCII digits.

    `str.isdigit()` alone also takes a superscript 2, which `int()` refuses (that was a 500),
    and Arabic-Indic digits, which it reads; and `int()` refuses more than 4300 digits.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return 0
    return int(text)


@problems
async def publish(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = state.caller(request)
    state.limits.check_write(who)
    topics = state.topics()
    _check_query(request.query, set())
    topic = request.match_info["topic"]
    check_topic(topic)
    who.check_publish(topic)
    data = await read_json(request)
    offset = await topics.publish(topic, data)
    return json_response({"topic": topic, "offset": offset}, status=202)


@problems
async def list_queues(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.caller(request).check_admin("the queues")
    stats = state.queue_stats()
    _check_query(request.query, set())
    return json_response(await stats.report())


@problems
async def retry_dead(request: web.Request) -> web.StreamResponse:
    dead, flt = await _dead_request(request)
    if flt.dry_run:
        return json_response({"count": dead.count(flt)})
    retried, left = await dead.retry(flt)
    return json_response({"count": retried, "left": left})


@problems
async def purge_dead(request: web.Request) -> web.StreamResponse:
    dead, flt = await _dead_request(request)
    if flt.dry_run:
        return json_response({"count": dead.count(flt)})
    purged, removed = await dead.purge(flt)
    return json_response({"count": purged, "removed": removed})


async def _dead_request(request: web.Request) -> tuple[DeadLetters, DeadFilter]:
    """The service's dead letters and the request's filter, once the caller may (401, 403,
    429, 503, then 4xx of the body)."""
    state = request.app[STATE]
    who = state.caller(request)
    who.check_admin("dead letters")
    state.limits.check_write(who)
    dead = state.dead_letters()
    _check_query(request.query, set())
    return dead, parse_filter(await read_json(request))


@problems
async def list_tasks(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.caller(request)  # any principal
    defaults = state.settings.jobs
    tasks = [task.describe(defaults) for task in state.registry.tasks.values()]
    return json_response({"tasks": tasks})


@problems
async def list_schedules(request: web.Request) -> web.StreamResponse:
    """The periodic schedules, and whether this process is the one that submits their ticks
    (`leader`: the same for every schedule, and true on one process at a time)."""
    state = request.app[STATE]
    state.caller(request).check_admin("the schedules")
    _check_query(request.query, set())
    return json_response({"schedules": state.built().schedules()})


@problems
async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


@problems
async def readyz(request: web.Request) -> web.StreamResponse:
    service = request.app[STATE].service
    reason = "starting" if service is None else service.problem()
    if service is None or reason is not None:
        return problem(503, "Not ready", reason or "starting", headers={"Retry-After": "1"})
    # Ready whatever the count: stuck threads stop their queues' jobs here, not the HTTP API.
    return json_response({"status": "ready", "stuck_threads": service.runner.stuck_threads})
