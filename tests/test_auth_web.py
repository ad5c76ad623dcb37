"""Auth beyond the matrix: how a websocket authenticates and expires, what one principal may take,
what a principal sees of jobs (its own, tracebacks), CORS and the Host check.

Served in-process on memory:// with `[auth] mode = "jwt"` (HS256) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from aioqueue import App, Context, Settings
from aioqueue.config import AuthSettings, HttpSettings, WsSettings
from aioqueue.web.state import STATE
from tests.support import serve_in_process

Client = TestClient[web.Request, web.Application]
SECRET = "web-secret-0123456789abcdef0123456789ab"
USER = "jobs:submit jobs:read topics:subscribe:orders.#"
JSON = {"Content-Type": "application/json"}


def token(sub: str, scope: str = USER, seconds: float = 300) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + seconds, "scope": scope}, SECRET)


def bearer(sub: str, scope: str = USER) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, scope)}", **JSON}


def admin() -> dict[str, str]:
    """Made when used: a token made when the module is collected expires in a long run."""
    return bearer("root", "jobs:admin")


def make_app() -> App:
    app = App()

    @app.task
    async def add(a: int) -> int:
        return a

    @app.task(max_attempts=1)
    async def broken() -> None:
        raise ValueError("nope")

    @app.task
    async def parent(ctx: Context) -> str:
        child = await ctx.submit("add", {"a": 1})
        return str(child["id"])

    return app


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> Callable[..., Awaitable[Client]]:
    async def start(
        auth: dict[str, Any] | None = None,
        ws: dict[str, Any] | None = None,
        http: dict[str, Any] | None = None,
    ) -> Client:
        settings = Settings(
            auth=AuthSettings(
                **{"mode": "jwt", "jwt_secret": SECRET, "jwt_leeway": 0.0, **(auth or {})}
            ),
            ws=WsSettings(**{"auth_timeout": 0.5, **(ws or {})}),
            http=HttpSettings(**(http or {})),
        )
        return await serve_in_process(aiohttp_client, make_app(), settings)

    return start


@pytest.fixture
async def client(serve: Callable[..., Awaitable[Client]]) -> Client:
    return await serve()


async def send(ws: Any, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send_str(orjson.dumps(frame).decode())
    return await receive(ws)


async def receive(ws: Any) -> dict[str, Any]:
    message = await ws.receive(timeout=5.0)
    assert message.type is WSMsgType.TEXT, message
    return dict(orjson.loads(message.data))


async def closed_with(ws: Any) -> int:
    message = await ws.receive(timeout=5.0)
    assert message.type is WSMsgType.CLOSE, message
    return int(message.data)


async def submit(client: Client, who: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", data=orjson.dumps(body), headers=who)
    assert response.status in (200, 202), await response.text()
    return dict(await response.json())


# How a websocket authenticates ------------------------------------------------------------------


async def test_the_handshake_may_carry_the_token_in_a_header_or_a_subprotocol(
    client: Client,
) -> None:
    async with client.ws_connect("/v1/ws", headers={"Authorization": f"Bearer {token('a')}"}) as ws:
        assert await send(ws, {"op": "ping"}) == {"type": "pong"}
    protocols = ("aioqueue", "bearer." + token("a"))
    async with client.ws_connect("/v1/ws", protocols=protocols) as ws:
        assert ws.protocol == "aioqueue"
        assert await send(ws, {"op": "ping"}) == {"type": "pong"}


@pytest.mark.parametrize(
    "handshake",
    [
        {"headers": {"Authorization": "Bearer not-a-token"}},
        {"headers": {"Authorization": "Basic YTpi"}},
        {"protocols": ("bearer.not-a-token", "aioqueue")},
        {
            "protocols": ("bearer.x",)
        },  # without `aioqueue` to select: refused before aiohttp logs it
    ],
)
async def test_a_bad_token_in_the_handshake_is_a_401(
    client: Client, handshake: dict[str, Any]
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/ws", **handshake)
    assert info.value.status == 401


async def test_without_auth_in_time_the_socket_closes_with_1008(client: Client) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        assert (await send(ws, {"op": "ping"}))["code"] == "unauthorized"
        started = time.monotonic()
        assert await closed_with(ws) == 1008
        assert 0.3 < time.monotonic() - started < 3


async def test_auth_frame_then_ops_and_the_socket_stays(client: Client) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        assert await send(ws, {"op": "auth", "token": token("a"), "id": 1}) == {
            "type": "authenticated",
            "principal": "a",
            "id": 1,
        }
        await asyncio.sleep(0.8)  # past auth_timeout
        assert await send(ws, {"op": "ping"}) == {"type": "pong"}
        assert (await send(ws, {"op": "auth", "token": 7}))["code"] == "bad_frame"


async def test_an_expiring_jwt_is_told_and_renewed_or_closed(client: Client) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        await send(ws, {"op": "auth", "token": token("a", seconds=1.5)})
        assert (await send(ws, {"op": "subscribe", "channel": "topic:orders.#"}))["type"] == (
            "subscribed"
        )
        expired = await receive(ws)
        assert expired["code"] == "token_expired"
        assert (await send(ws, {"op": "ping"}))["code"] == "unauthorized"
        # Renewed as someone else: refused; as itself: the socket and its subscription stay.
        assert (await send(ws, {"op": "auth", "token": token("b")}))["code"] == "forbidden"
        renewed = await send(ws, {"op": "auth", "token": token("a")})
        assert renewed == {"type": "authenticated", "principal": "a"}
        await asyncio.sleep(0.8)
        assert await send(ws, {"op": "ping"}) == {"type": "pong"}
    async with client.ws_connect("/v1/ws") as ws:
        await send(ws, {"op": "auth", "token": token("a", seconds=1.2)})
        assert (await receive(ws))["code"] == "token_expired"
        assert await closed_with(ws) == 1008


async def test_a_refused_auth_frame_closes_an_unauthenticated_socket(client: Client) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        reply = await send(ws, {"op": "auth", "token": "guess-1"})
        assert reply["code"] == "unauthorized" and "guess-1" not in reply["message"]
        assert await closed_with(ws) == 1008
    async with client.ws_connect("/v1/ws") as ws:  # an authenticated one keeps its principal
        await send(ws, {"op": "auth", "token": token("a")})
        assert (await send(ws, {"op": "auth", "token": "guess-2"}))["code"] == "unauthorized"
        assert await send(ws, {"op": "ping"}) == {"type": "pong"}


# What one principal may take --------------------------------------------------------------------


async def test_websockets_per_principal(serve: Callable[..., Awaitable[Client]]) -> None:
    client = await serve(auth={"max_websockets": 2})
    header = {"Authorization": f"Bearer {token('a')}"}
    first = await client.ws_connect("/v1/ws", headers=header)
    second = await client.ws_connect("/v1/ws", headers=header)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/ws", headers=header)
    assert info.value.status == 429
    async with client.ws_connect("/v1/ws") as third:
        reply = await send(third, {"op": "auth", "token": token("a")})
        assert reply["code"] == "too_many_connections"
        assert await closed_with(third) == 1013
    async with client.ws_connect("/v1/ws", headers={"Authorization": f"Bearer {token('b')}"}):
        pass  # another principal is not counted with a
    await first.close()
    await asyncio.sleep(0.05)
    async with client.ws_connect("/v1/ws", headers=header) as again:
        assert await send(again, {"op": "ping"}) == {"type": "pong"}
    await second.close()


async def test_subscriptions_per_principal_over_its_sockets(
    serve: Callable[..., Awaitable[Client]],
) -> None:
    client = await serve(auth={"max_subscriptions": 3})
    header = {"Authorization": f"Bearer {token('a')}"}
    async with (
        client.ws_connect("/v1/ws", headers=header) as one,
        client.ws_connect("/v1/ws", headers=header) as two,
    ):
        for pattern in ("orders.a", "orders.b"):
            assert (await send(one, {"op": "subscribe", "channel": f"topic:{pattern}"}))[
                "type"
            ] == ("subscribed")
        assert (await send(two, {"op": "subscribe", "channel": "topic:orders.c"}))["type"] == (
            "subscribed"
        )
        refused = await send(two, {"op": "subscribe", "channel": "topic:orders.d"})
        assert (
            refused["code"] == "too_many_subscriptions"
            and "auth.max_subscriptions" in (refused["message"])
        )
        # Subscribing again to a channel it has is no new subscription.
        again = await send(two, {"op": "subscribe", "channel": "topic:orders.c"})
        assert again["type"] == "subscribed"


async def test_writes_per_second_per_principal(serve: Callable[..., Awaitable[Client]]) -> None:
    client = await serve(auth={"max_submits_per_second": 3})
    statuses = []
    for _ in range(4):
        response = await client.post(
            "/v1/jobs", data=b'{"task":"add","args":[1]}', headers=bearer("a")
        )
        statuses.append(response.status)
    assert statuses == [202, 202, 202, 429]
    assert int(response.headers["Retry-After"]) >= 1
    assert "auth.max_submits_per_second" in (await response.json())["detail"]
    # Another principal has its own budget; the websocket shares a's.
    assert (
        await client.post("/v1/jobs", data=b'{"task":"add","args":[1]}', headers=bearer("b"))
    ).status == 202
    async with client.ws_connect("/v1/ws", headers=bearer("a")) as ws:
        reply = await send(ws, {"op": "submit", "job": {"task": "add", "args": [1]}})
        assert reply["code"] == "rate_limited" and 0 < reply["retry_after"] <= 1


# What a principal sees --------------------------------------------------------------------------


async def test_listing_shows_a_principal_its_own_jobs_and_admin_all(client: Client) -> None:
    mine = [await submit(client, bearer("alice"), {"task": "add", "args": [i]}) for i in range(3)]
    theirs = await submit(client, bearer("bob"), {"task": "add", "args": [9]})
    assert {job["owner"] for job in mine} == {"alice"} and theirs["owner"] == "bob"

    async def listed(who: dict[str, str]) -> list[str]:
        ids, cursor = [], None
        while True:
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            response = await client.get("/v1/jobs", params=params, headers=who)
            page = await response.json()
            assert response.status == 200, page
            ids += [job["id"] for job in page["jobs"]]
            if not (cursor := page["next"]):
                return ids

    assert set(await listed(bearer("alice"))) == {job["id"] for job in mine}
    assert await listed(bearer("bob")) == [theirs["id"]]
    assert set(await listed(admin())) == {job["id"] for job in [*mine, theirs]}


async def test_tracebacks_are_for_admins_only(client: Client) -> None:
    job = await submit(client, bearer("alice"), {"task": "broken"})
    url = f"/v1/jobs/{job['id']}?wait=5"
    own = await (await client.get(url, headers=bearer("alice"))).json()
    assert own["status"] == "failed" and own["error"]["message"] == "nope"
    assert own["error"]["traceback"] is None
    seen = await (await client.get(url, headers=admin())).json()
    assert "ValueError" in seen["error"]["traceback"]
    listed = await (await client.get("/v1/jobs", headers=bearer("alice"))).json()
    assert listed["jobs"][0]["error"]["traceback"] is None
    async with client.ws_connect("/v1/ws", headers=admin()) as ws:  # frames go to many: none
        await send(ws, {"op": "subscribe", "channel": f"job:{job['id']}"})
        snapshot = await receive(ws)
        assert snapshot["job"]["error"]["traceback"] is None


async def test_idempotency_keys_are_per_principal(client: Client) -> None:
    body = {"task": "add", "args": [1], "idempotency_key": "order-7"}
    alice = await submit(client, bearer("alice"), body)
    bob = await submit(client, bearer("bob"), body)
    assert alice["id"] != bob["id"] and bob["owner"] == "bob"
    again = await client.post("/v1/jobs", data=orjson.dumps(body), headers=bearer("alice"))
    assert again.status == 200 and (await again.json())["id"] == alice["id"]


async def test_a_tasks_child_jobs_belong_to_its_owner(client: Client) -> None:
    job = await submit(client, bearer("alice"), {"task": "parent"})
    done = await (await client.get(f"/v1/jobs/{job['id']}?wait=5", headers=bearer("alice"))).json()
    child = await client.get(f"/v1/jobs/{done['result']}", headers=bearer("alice"))
    assert child.status == 200 and (await child.json())["owner"] == "alice"
    assert (await client.get(f"/v1/jobs/{done['result']}", headers=bearer("bob"))).status == 404


async def test_app_submit_takes_an_owner(client: Client) -> None:
    service = client.app[STATE].service
    assert service is not None
    job = await service.jobs.submit({"task": "add", "args": [1]}, owner="alice")
    assert (await client.get(f"/v1/jobs/{job.id}", headers=bearer("alice"))).status == 200
    assert (await client.get(f"/v1/jobs/{job.id}", headers=bearer("bob"))).status == 404


# Browsers: CORS and the Host check -------------------------------------------------------------


async def test_cors_preflight_and_answers(serve: Callable[..., Awaitable[Client]]) -> None:
    client = await serve(http={"cors_origins": ("https://app.example",)})
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    response = await client.options("/v1/jobs", headers=preflight)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    other = await client.options(
        "/v1/jobs", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert other.status == 403
    answer = await client.get("/v1/jobs", headers={**bearer("a"), "Origin": "https://app.example"})
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Retry-After" in answer.headers["Access-Control-Expose-Headers"]
    foreign = await client.get(
        "/v1/jobs", headers={**bearer("a"), "Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in foreign.headers


async def test_no_cors_by_default(client: Client) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    assert (await client.options("/v1/jobs", headers=preflight)).status == 403
    answer = await client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in answer.headers


@pytest.mark.parametrize(
    ("allowed", "host", "status"),
    [
        ((), "localhost:8080", 200),
        ((), "127.0.0.1", 200),
        ((), "[::1]:8080", 200),
        ((), "app.localhost", 200),
        ((), "evil.example:8080", 400),  # a rebinding name for 127.0.0.1
        ((), "127.0.0.1.evil.example", 400),
        (("api.example.com",), "api.example.com", 200),
        (("api.example.com",), "localhost", 400),
        ((".example.com",), "a.b.example.com:443", 200),
        ((".example.com",), "example.com", 200),
        ((".example.com",), "badexample.com", 400),
        (("*",), "anything.example", 200),
    ],
)
async def test_the_host_check(
    serve: Callable[..., Awaitable[Client]], allowed: tuple[str, ...], host: str, status: int
) -> None:
    client = await serve(auth={"mode": "none"}, http={"allowed_hosts": allowed})
    response = await client.get("/healthz", headers={"Host": host})
    assert response.status == status, await response.text()


async def test_a_rebinding_page_cannot_open_the_websocket(client: Client) -> None:
    """Same origin as far as the browser knows: its Origin names the Host it sent."""
    page = {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/ws", headers=page)
    assert info.value.status == 400
