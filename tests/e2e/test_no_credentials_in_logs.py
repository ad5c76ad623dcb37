"""Credentials never appear in logs, problem documents or error frames (issue 9).

The real `aioqueue serve`, at DEBUG, with `[auth] mode = "token"`: every way a token reaches the
service, good and bad (headers, the websocket subprotocol, auth frames, a malformed request that
carries one, a bad config), and then the whole log, every answer's body and every frame are
searched for each token.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import JSON, ROOT, ServeProcess, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

GOOD = "good-token-9f8e7d6c5b4a3f2e"
#: Refused tokens, each its own string, one of them a near miss of the good one.
BAD = [GOOD[:-1] + "X", "bad-token-1a2b3c4d5e6f", "bad.jwt.looking-token", "bad-subproto-7c6b5a4d"]
ENV = {
    "AIOQUEUE_AUTH__MODE": "token",
    "AIOQUEUE_AUTH__TOKENS": json.dumps(
        [{"token": GOOD, "principal": "alice", "scopes": ["jobs:submit", "jobs:read"]}]
    ),
}


async def raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_no_token_is_logged_or_echoed(
    prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = ServeProcess("memory://", prefix, ENV).start(tmp_path)
    answers: list[bytes] = []
    try:
        await wait_ready(http, server.url)
        for token in [GOOD, *BAD]:
            headers = {"Authorization": f"Bearer {token}", **JSON}
            for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/x")):
                body = orjson.dumps({"task": "echo", "args": {"value": 1}})
                async with http.request(method, server.url + path, data=body, headers=headers) as r:
                    answers.append(await r.read())
            # The websocket: in the handshake's header, in a subprotocol, in an auth frame.
            for handshake in (
                {"headers": {"Authorization": f"Bearer {token}"}},
                {"protocols": ("aioqueue", f"bearer.{token}")},
                {"protocols": (f"bearer.{token}",)},
            ):
                try:
                    async with http.ws_connect(server.url + "/v1/ws", **handshake) as ws:
                        await ws.send_str(orjson.dumps({"op": "ping"}).decode())
                        answers.append((await ws.receive(timeout=5)).data.encode())
                except aiohttp.WSServerHandshakeError as exc:
                    answers.append(exc.message.encode())
            async with http.ws_connect(server.url + "/v1/ws") as ws:
                await ws.send_str(orjson.dumps({"op": "auth", "token": token}).decode())
                answers.append(str((await ws.receive(timeout=5)).data).encode())
            # A malformed request that carries the token: aiohttp refuses it before the API.
            answers.append(
                await raw(
                    server.url,
                    f"GET /v1/jobs HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\x00"
                    "\r\n\r\n".encode(),
                )
            )
            answers.append(
                await raw(
                    server.url,
                    f"GET /v1/jobs HTTP/1.1\r\nHost: localhost\r\nX-{token}: {'y' * 9000}\r\n\r\n".encode(),
                )
            )
        assert any(b"authenticated" in answer for answer in answers)  # the good one was used
    finally:
        assert server.stop() == 0
    log = server.log()
    for token in [GOOD, *BAD]:
        assert token not in log, f"{token} is in the server's log"
        for answer in answers:
            assert token.encode() not in answer, answer[:500]


def test_a_bad_token_config_is_reported_without_the_token(tmp_path: Path) -> None:
    secret = "cfg-secret-token-1234567890"
    tokens = json.dumps([{"token": secret, "principal": "a", "scopes": ["jobs:nope"]}])
    env = {"AIOQUEUE_AUTH__MODE": "token", "AIOQUEUE_AUTH__TOKENS": tokens, "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "aioqueue", "serve", "tests.apps:app"],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT / "src") + ":" + str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "auth.tokens = <hidden>" in done.stderr
    assert secret not in done.stderr + done.stdout
