"""The access policy, whole: every endpoint and every websocket op, for every kind of caller.

The two tables below are the policy a reader checks (CONTRACT §6). Columns are callers:

- `none`: no credentials; `bad`: a token this service never issued; `expired`: the owner's JWT,
  expired; `scope`: a valid principal (carol) with scopes for none of this;
- `owner`: alice, who submitted the job (jobs:submit, jobs:read, topics on `orders.#`);
- `other`: bob, with exactly alice's scopes, on alice's job;
- `admin`: root, with jobs:admin (and no topic scope).

Each cell is the HTTP status, or the websocket reply's `type` (or error `code`). A job route gets
a job of alice's made for that cell alone: scheduled (`{job}`), or failed (`{failed}`).
Served in-process on memory:// with `[auth] mode = "jwt"` (HS256).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from aioqueue import App, Settings
from aioqueue.config import AuthSettings, WsSettings
from aioqueue.jobs import Job
from aioqueue.web.state import STATE
from tests.support import serve_in_process

Client = TestClient[web.Request, web.Application]
SECRET = "matrix-secret-0123456789abcdef0123456789"
COLUMNS = ("none", "bad", "expired", "scope", "owner", "other", "admin")
ALICE = "jobs:submit jobs:read topics:publish:orders.# topics:subscribe:orders.#"
SCOPES = {
    "alice": ALICE,
    "bob": ALICE,
    "carol": "topics:subscribe:news.#",
    "root": "jobs:admin",
}
CALLER = {"expired": "alice", "scope": "carol", "owner": "alice", "other": "bob", "admin": "root"}
SUBMIT = {"task": "add", "args": {"a": 1}}

# fmt: off
HTTP: dict[str, tuple[str, str, Any, tuple[int, ...]]] = {
    #                 method    path                        body   none bad  exp  scope owner other admin
    "submit":        ("POST",   "/v1/jobs",                 SUBMIT, (401, 401, 401, 403, 202, 202, 202)),
    "list":          ("GET",    "/v1/jobs",                 None,  (401, 401, 401, 403, 200, 200, 200)),
    "get":           ("GET",    "/v1/jobs/{job}",           None,  (401, 401, 401, 404, 200, 404, 200)),
    "long-poll":     ("GET",    "/v1/jobs/{job}?wait=0.01", None,  (401, 401, 401, 404, 200, 404, 200)),
    "get-unknown":   ("GET",    "/v1/jobs/nosuchjob",       None,  (401, 401, 401, 404, 404, 404, 404)),
    "cancel":        ("DELETE", "/v1/jobs/{job}",           None,  (401, 401, 401, 404, 202, 404, 202)),
    "retry":         ("POST",   "/v1/jobs/{failed}/retry",  None,  (401, 401, 401, 404, 202, 404, 202)),
    "publish":       ("POST",   "/v1/topics/orders.eu",     {"n": 1}, (401, 401, 401, 403, 202, 202, 403)),
    "publish-other": ("POST",   "/v1/topics/news.eu",       {"n": 1}, (401, 401, 401, 403, 403, 403, 403)),
    "tasks":         ("GET",    "/v1/tasks",                None,  (401, 401, 401, 200, 200, 200, 200)),
    "list-filtered": ("GET",    "/v1/jobs?error_type=ValueError&finished_before=2100-01-01T00:00:00Z", None, (401, 401, 401, 403, 200, 200, 200)),
    "queues":        ("GET",    "/v1/queues",               None,  (401, 401, 401, 403, 403, 403, 200)),
    "dead-retry":    ("POST",   "/v1/dead/retry",           {"task": "add"}, (401, 401, 401, 403, 403, 403, 200)),
    "dead-purge":    ("POST",   "/v1/dead/purge",           {"task": "add"}, (401, 401, 401, 403, 403, 403, 200)),
    "schedules":     ("GET",    "/v1/schedules",            None,  (401, 401, 401, 403, 403, 403, 200)),
    "healthz":       ("GET",    "/healthz",                 None,  (200, 200, 200, 200, 200, 200, 200)),
    "readyz":        ("GET",    "/readyz",                  None,  (200, 200, 200, 200, 200, 200, 200)),
    "openapi":       ("GET",    "/openapi.json",            None,  (200, 200, 200, 200, 200, 200, 200)),
    "asyncapi":      ("GET",    "/asyncapi.json",           None,  (200, 200, 200, 200, 200, 200, 200)),
    "metrics":       ("GET",    "/metrics",                 None,  (200, 200, 200, 200, 200, 200, 200)),
    "dashboard":     ("GET",    "/dashboard",               None,  (200, 200, 200, 200, 200, 200, 200)),
    "dashboard-js":  ("GET",    "/dashboard/app.js",        None,  (200, 200, 200, 200, 200, 200, 200)),
}

UNAUTH = ("unauthorized", "unauthorized", "token_expired")
WS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    #                     frame                                                 none..expired  scope        owner         other        admin
    "subscribe-job":     ({"op": "subscribe", "channel": "job:{job}"},          (*UNAUTH, "not_found", "subscribed", "not_found", "subscribed")),
    "subscribe-orders":  ({"op": "subscribe", "channel": "topic:orders.#"},     (*UNAUTH, "forbidden", "subscribed", "subscribed", "forbidden")),
    "subscribe-all":     ({"op": "subscribe", "channel": "topic:#"},            (*UNAUTH, "forbidden", "forbidden",  "forbidden", "forbidden")),
    "subscribe-jobs":    ({"op": "subscribe", "channel": "jobs:*"},             (*UNAUTH, "forbidden", "forbidden",  "forbidden", "subscribed")),
    "subscribe-queues":  ({"op": "subscribe", "channel": "queues"},             (*UNAUTH, "forbidden", "forbidden",  "forbidden", "subscribed")),
    "subscribe-news":    ({"op": "subscribe", "channel": "topic:news.eu.*"},    (*UNAUTH, "subscribed", "forbidden", "forbidden", "forbidden")),
    "submit":            ({"op": "submit", "job": SUBMIT},                      (*UNAUTH, "forbidden", "submitted",  "submitted", "submitted")),
    "publish":           ({"op": "publish", "topic": "orders.eu", "data": 1},   (*UNAUTH, "forbidden", "published",  "published", "forbidden")),
    "unsubscribe":       ({"op": "unsubscribe", "channel": "topic:orders.#"},   (*UNAUTH, "unsubscribed", "unsubscribed", "unsubscribed", "unsubscribed")),
    "ping":              ({"op": "ping"},                                       (*UNAUTH, "pong",      "pong",       "pong",      "pong")),
}
# fmt: on


def make_app() -> App:
    app = App()

    @app.task
    async def add(a: int) -> int:
        return a

    @app.task(max_attempts=1)
    async def broken() -> None:
        raise ValueError("nope")

    return app


def token(principal: str, *, expired: bool = False) -> str:
    exp = time.time() + (-120 if expired else 300)
    return jwt.encode({"sub": principal, "exp": exp, "scope": SCOPES[principal]}, SECRET)


def credentials(column: str) -> str | None:
    if column == "none":
        return None
    if column == "bad":
        return "not-a-token-this-service-issued"
    return token(CALLER[column], expired=column == "expired")


def settings(**auth: Any) -> Settings:
    auth = {"mode": "jwt", "jwt_secret": SECRET, "jwt_leeway": 0.0, **auth}
    return Settings(auth=AuthSettings(**auth), ws=WsSettings(auth_timeout=5.0))


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> Callable[..., Awaitable[Client]]:
    async def start(**auth: Any) -> Client:
        return await serve_in_process(aiohttp_client, make_app(), settings(**auth))

    return start


@pytest.fixture
async def client(serve: Callable[..., Awaitable[Client]]) -> Client:
    return await serve()


async def alices_job(client: Client, kind: str) -> Job:
    """A job of alice's: scheduled for later, or failed."""
    service = client.app[STATE].service
    assert service is not None
    if kind == "job":
        return await service.jobs.submit({**SUBMIT, "delay": 600}, owner="alice")
    job = await service.jobs.submit({"task": "broken"}, owner="alice")
    await service.store.wait_terminal(job.id, 5)
    assert service.store.get(job.id).status == "failed"  # type: ignore[union-attr]
    return job


async def fill(client: Client, text: str) -> str:
    for kind in ("job", "failed"):
        if "{" + kind + "}" in text:
            text = text.replace("{" + kind + "}", (await alices_job(client, kind)).id)
    return text


def headers(column: str) -> dict[str, str]:
    found = credentials(column)
    return {"Content-Type": "application/json"} | (
        {} if found is None else {"Authorization": f"Bearer {found}"}
    )


@pytest.mark.parametrize("row", HTTP)
async def test_http(client: Client, row: str) -> None:
    method, path, body, expected = HTTP[row]
    got = []
    for column in COLUMNS:
        data = None if body is None else orjson.dumps(body)
        response = await client.request(
            method, await fill(client, path), data=data, headers=headers(column)
        )
        got.append(response.status)
        if response.status == 401:
            assert response.headers["WWW-Authenticate"].startswith('Bearer realm="aioqueue"')
    assert dict(zip(COLUMNS, got, strict=True)) == dict(zip(COLUMNS, expected, strict=True))


async def ws_reply(client: Client, column: str, frame: dict[str, Any]) -> str:
    """The first reply to `frame` on a websocket whose first frame authenticates as `column`
    (none: no auth frame); a refused auth frame's reply stands for every op."""
    async with client.ws_connect("/v1/ws") as ws:
        found = credentials(column)
        if found is not None:
            await ws.send_str(orjson.dumps({"op": "auth", "token": found}).decode())
            reply = await receive(ws)
            if reply["type"] == "error":
                return str(reply["code"])
            assert reply == {"type": "authenticated", "principal": CALLER[column]}
        text = orjson.dumps(frame).decode()
        await ws.send_str(await fill(client, text))
        reply = await receive(ws)
        return str(reply["code"] if reply["type"] == "error" else reply["type"])


async def receive(ws: Any) -> dict[str, Any]:
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.TEXT, message
    return dict(orjson.loads(message.data))


@pytest.mark.parametrize("row", WS)
async def test_websocket(client: Client, row: str) -> None:
    frame, expected = WS[row]
    got = [await ws_reply(client, column, frame) for column in COLUMNS]
    assert dict(zip(COLUMNS, got, strict=True)) == dict(zip(COLUMNS, expected, strict=True))


async def test_token_mode_follows_the_same_policy(serve: Callable[..., Awaitable[Client]]) -> None:
    """Static tokens: the same principals, a few cells of each table."""
    tokens = tuple(
        {"token": f"static-{name}-0123456789", "principal": name, "scopes": SCOPES[name].split()}
        for name in SCOPES
    )
    client = await serve(mode="token", tokens=tokens)
    job = await alices_job(client, "job")
    expected = {"alice": 200, "bob": 404, "carol": 404, "root": 200}
    for name, status in expected.items():
        auth = {"Authorization": f"Bearer static-{name}-0123456789"}
        assert (await client.get(f"/v1/jobs/{job.id}", headers=auth)).status == status, name
    bad = await client.get("/v1/jobs", headers={"Authorization": "Bearer static-alice-012345678"})
    assert bad.status == 401
