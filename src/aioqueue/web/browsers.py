"""What browsers may do to the HTTP API: which `Host` is answered, and which origins' pages may
call it (CORS). Middlewares of `aioqueue serve`'s application; an application that mounts
aioqueue (`App.mount`) keeps its own policy. The websocket's `Origin` check is in ws.py.

**Host, against DNS rebinding.** A page at `http://evil.example:8080` whose name the attacker
then points at 127.0.0.1 reaches a service on the victim's loopback as its own origin: the
browser sends `Host: evil.example:8080`, and the Origin check passes. So, by default, a service
bound to a loopback address answers only requests naming a loopback host; `http.allowed_hosts`
lists others (`"api.example.com"`, `".example.com"` for it and its subdomains, or `"*"`).

**CORS.** Bearer tokens, never cookies, so there is no `Allow-Credentials`: a page must hold a
token to call the API at all. `http.cors_origins` lists the origins (`["*"]`: any); a preflight
from any other origin gets 403.
"""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from aioqueue.config import HttpSettings, normal_origin
from aioqueue.web.problems import Handler, problem

#: The settings the middlewares read, in the application they serve.
HTTP = web.AppKey("aioqueue.http", HttpSettings)
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
ALLOWED_METHODS = "GET, POST, DELETE"
ALLOWED_HEADERS = "Authorization, Content-Type, Idempotency-Key"
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate"
PREFLIGHT_MAX_AGE = "600"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str, http: HttpSettings) -> bool:
    try:
        host = urlsplit("//" + host_header).hostname
    except ValueError:
        return False
    if not host:
        return False
    if not http.allowed_hosts:
        return not _bound_to_loopback(http.host) or is_loopback(host)
    anyone, names, suffixes = _host_rules(http.allowed_hosts)
    return anyone or host in names or host.endswith(suffixes)


@functools.cache
def _bound_to_loopback(bind: str) -> bool:
    """`is_loopback` of the configured address: once, not per request."""
    return is_loopback(bind)


@functools.cache
def _host_rules(allowed: tuple[str, ...]) -> tuple[bool, frozenset[str], tuple[str, ...]]:
    """`http.allowed_hosts` as (any host, the names, the suffixes of subdomains): once, not per
    request. `.example.com` is the name `example.com` and the suffix `.example.com`."""
    lowered = [entry.lower() for entry in allowed]
    names = {entry.removeprefix(".") for entry in lowered}
    return "*" in lowered, frozenset(names), tuple(e for e in lowered if e.startswith("."))


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    http: HttpSettings = request.app[HTTP]
    if not host_allowed(request.host, http):
        return problem(
            400,
            "Bad request",
            f"this service does not answer for the host {request.host[:100]!r}"
            " (http.allowed_hosts)",
        )
    return await handler(request)


@functools.cache
def normal_origins(origins: tuple[str, ...]) -> frozenset[str | None]:
    """A configured list of origins as `normal_origin` writes them: once, not per request."""
    return frozenset(normal_origin(origin) for origin in origins)


def cors_allowed(origin: str, origins: tuple[str, ...]) -> bool:
    return "*" in origins or normal_origin(origin) in normal_origins(origins)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    allowed = cors_allowed(origin, request.app[HTTP].cors_origins)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not allowed:
            return problem(403, "Forbidden", "this origin may not call the API (http.cors_origins)")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
                "Vary": "Origin",
            },
        )
    response = await handler(request)
    if allowed and not response.prepared:  # a websocket's handshake is sent already
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"
    return response
