"""Every error answer as an RFC 9457 problem document, decided in one table.

Handlers raise `aioqueue.errors` exceptions; `@problems` (each aioqueue handler, so that errors
are right also when aioqueue is mounted in someone else's application) and `problem_middleware`
(aiohttp's own errors: unknown route, wrong method, body too large) render them. No answer ever
carries a server traceback or an HTML page.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from aioqueue.errors import (
    BrokerUnavailable,
    FieldError,
    NotReady,
    QueueFull,
    RateLimited,
    RequestError,
    Unauthorized,
)

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBLEM_TYPE = "about:blank"


def problem(
    status: int,
    title: str,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    document: dict[str, Any] = {
        "type": PROBLEM_TYPE,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        document["errors"] = [error.to_dict() for error in errors]
    return web.Response(
        status=status,
        body=orjson.dumps(document),
        content_type="application/problem+json",
        headers=headers,
    )


def render(exc: Exception) -> web.Response:
    """The problem document for any exception a handler let escape."""
    if isinstance(exc, Unauthorized):
        # RFC 6750 §3: the scheme to use, and `invalid_token` when the one given was refused.
        challenge = 'Bearer realm="aioqueue"' + (', error="invalid_token"' if exc.given else "")
        return problem(401, exc.title, exc.detail, headers={"WWW-Authenticate": challenge})
    if isinstance(exc, RequestError):
        errors = getattr(exc, "errors", None)
        return problem(exc.status, exc.title, exc.detail, errors)
    if isinstance(exc, QueueFull | RateLimited):
        retry = {"Retry-After": str(math.ceil(exc.retry_after))}
        return problem(429, "Too many requests", str(exc), headers=retry)
    if isinstance(exc, BrokerUnavailable | NotReady):
        retry = {"Retry-After": str(exc.retry_after)}
        return problem(503, "Service unavailable", str(exc), headers=retry)
    if isinstance(exc, web.HTTPException):
        detail = {
            404: "no such endpoint; GET /openapi.json lists them",
            405: "this endpoint does not take that method",
            413: "the body is larger than this endpoint accepts",
        }.get(exc.status, exc.text or exc.reason)
        # A 405 must say which methods the resource takes (RFC 9110 §15.5.6).
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem(exc.status, exc.reason, detail, headers=allow)
    logger.exception("unexpected error in a handler", exc_info=exc)
    return problem(500, "Internal server error", "an unexpected error; the server log has it")


def problems(handler: Handler) -> Handler:
    """Render whatever the handler raises as a problem document."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return render(exc)
        except Exception as exc:
            return render(exc)

    return wrapper


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await problems(handler)(request)
