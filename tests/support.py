"""Running the real `aioqueue serve` in a subprocess, and talking to it, for end-to-end tests;
and an app served in the test's own process (`serve_in_process`)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from aioqueue import App, Settings
from aioqueue.web.app import create_app
from aioqueue.web.state import STATE

InProcess = TestClient[web.Request, web.Application]

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"aioqueue serving \S+ on (http://\S+)")
TERMINAL = {"succeeded", "failed", "dead", "cancelled"}
#: Where served processes keep their job stores (one file per prefix); removed after the session.
STORE_DIR = Path(tempfile.gettempdir()) / f"aioqueue-test-stores-{os.getpid()}"


class ServeProcess:
    """`aioqueue serve tests.apps:app` with its own environment; `url` once it listens."""

    def __init__(
        self,
        broker_url: str,
        prefix: str,
        env: dict[str, str] | None = None,
        *,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.prefix = prefix
        self.extra_env = env or {}
        self.nofile = nofile  # the (soft, hard) RLIMIT_NOFILE to start it with
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path: Path | None = None

    def environ(self) -> dict[str, str]:
        # A clean environment: the developer's AIOQUEUE_* variables must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            AIOQUEUE_BROKER__URL=self.broker_url,
            AIOQUEUE_BROKER__PREFIX=self.prefix,
            AIOQUEUE_BROKER__CONFIRM_TIMEOUT="3",
            AIOQUEUE_HTTP__PORT="0",
            AIOQUEUE_APP="tests.apps:app",
            AIOQUEUE_STORE__DIR=str(STORE_DIR),
        )
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        serve = [sys.executable, "-m", "aioqueue", "serve", "--log-level", "debug"]
        if self.nofile is None:
            return serve
        # Set in a process that then becomes `aioqueue serve` (same pid), not in a preexec_fn,
        # which is unsafe in a test process that runs threads.
        limit = (
            f"import os, resource; resource.setrlimit(resource.RLIMIT_NOFILE, {self.nofile!r});"
            f" os.execv({sys.executable!r}, {serve!r})"
        )
        return [sys.executable, "-c", limit]

    def start(self, log_dir: Path, deadline: float = 30.0) -> ServeProcess:
        self.log_path = log_dir / f"serve-{self.prefix}-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=self.environ(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        end = time.monotonic() + deadline
        while time.monotonic() < end and self.proc.poll() is None:
            match = SERVING.search(self.log())
            if match:
                self.url = match.group(1)
                return self
            time.sleep(0.05)
        raise AssertionError(f"aioqueue serve did not start; its log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"serve did not stop on SIGTERM; log:\n{self.log()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


async def eventually(check: Callable[[], bool], deadline: float) -> None:
    """Poll `check` every 10 ms until it holds; TimeoutError at the deadline."""
    async with asyncio.timeout(deadline):
        while not check():  # noqa: ASYNC110 - what is checked has no event to wait on
            await asyncio.sleep(0.01)


async def serve_in_process(
    aiohttp_client: Callable[[web.Application], Awaitable[InProcess]],
    app: App,
    settings: Settings,
) -> InProcess:
    """`app` served in this process (aiohttp's test client), once its service is ready. Read
    from the service, not /readyz: a test's Host check may refuse the test client's Host."""
    client = await aiohttp_client(create_app(app, settings))

    def ready() -> bool:
        service = client.app[STATE].service
        return service is not None and service.problem() is None

    await eventually(ready, 10)
    return client


async def client_ready(client: InProcess, deadline: float = 30.0) -> InProcess:
    """An in-process application's test client, once its /readyz answers 200."""
    end = time.monotonic() + deadline
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < end, "not ready in time"
        await asyncio.sleep(0.01)
    return client


async def wait_ready(session: aiohttp.ClientSession, url: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    last = ""
    while time.monotonic() < end:
        try:
            async with session.get(url + "/readyz") as response:
                if response.status == 200:
                    return
                last = await response.text()
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not ready after {deadline} s: {last}")


async def submit(session: aiohttp.ClientSession, url: str, body: Any) -> dict[str, Any]:
    async with session.post(url + "/v1/jobs", data=orjson.dumps(body), headers=JSON) as response:
        data = await response.json()
        assert response.status == 202, (response.status, data)
        return dict(data)


async def wait_terminal(
    session: aiohttp.ClientSession, url: str, job_id: str, deadline: float = 20.0
) -> dict[str, Any]:
    """Long-poll the job until it is terminal; fails at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        wait = max(0.1, min(5.0, end - time.monotonic()))
        async with session.get(f"{url}/v1/jobs/{job_id}", params={"wait": str(wait)}) as response:
            assert response.status == 200, await response.text()
            job = dict(await response.json())
        if job["status"] in TERMINAL:
            return job
    raise AssertionError(f"job {job_id} not terminal after {deadline} s: {job}")


JSON = {"Content-Type": "application/json"}
