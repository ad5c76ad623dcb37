"""End to end: the real `aioqueue serve` process, real HTTP and websocket clients, both brokers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support import ROOT, ServeProcess, submit, wait_ready, wait_terminal

StartServe = Callable[..., ServeProcess]


@pytest.fixture
def serve(broker_url: str, prefix: str, tmp_path: Path) -> Iterator[StartServe]:
    started: list[ServeProcess] = []

    def start(**env: str) -> ServeProcess:
        process = ServeProcess(broker_url, prefix, env).start(tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()


async def next_job_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    while True:
        frame = orjson.loads((await ws.receive(timeout=10)).data)
        if frame["type"] == "job":
            return dict(frame)


async def test_http_submit_to_websocket_result(
    serve: StartServe, http: aiohttp.ClientSession
) -> None:
    """A job submitted over HTTP pushes started, progress and its result to a subscriber."""
    server = serve()
    await wait_ready(http, server.url)
    async with http.ws_connect(server.url + "/v1/ws") as ws:
        job = await submit(
            http, server.url, {"task": "ticker", "args": {"steps": 4, "interval": 0.1}}
        )
        await ws.send_str(orjson.dumps({"op": "subscribe", "channel": f"job:{job['id']}"}).decode())
        events: list[str] = []
        while not events or events[-1] not in ("succeeded", "failed"):
            events.append((await next_job_frame(ws))["event"])
    assert events[0] == "snapshot" and events[-1] == "succeeded"
    assert "progress" in events
    record = await wait_terminal(http, server.url, job["id"])
    assert (record["result"], record["progress"]["value"]) == (4, 1.0)


async def test_retried_then_failed_with_every_attempt_run_once(
    serve: StartServe, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    task_log = tmp_path / "runs.log"
    server = serve(AQ_TEST_TASK_LOG=str(task_log))
    await wait_ready(http, server.url)
    job = await submit(http, server.url, {"task": "always_fail", "args": {"message": "nope"}})
    record = await wait_terminal(http, server.url, job["id"], deadline=30)
    assert (record["status"], record["attempt"]) == ("failed", 3)
    assert record["error"]["message"] == "nope (attempt 3)"
    runs = task_log.read_text().split("\n")[:-1]
    assert [line.split()[:2] for line in runs] == [[job["id"], str(n)] for n in (1, 2, 3)]
    listed = await (
        await http.get(server.url + "/v1/jobs", params={"status": "failed,dead"})
    ).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]


@pytest.mark.parametrize(
    "broker_url", [pytest.param("amqp", marks=pytest.mark.amqp)], indirect=True
)
async def test_finished_jobs_survive_a_restart_on_rabbitmq(
    serve: StartServe, http: aiohttp.ClientSession
) -> None:
    first = serve()
    await wait_ready(http, first.url)
    jobs = [await submit(http, first.url, {"task": "echo", "args": {"value": n}}) for n in range(5)]
    before = [await wait_terminal(http, first.url, job["id"]) for job in jobs]
    assert first.stop() == 0
    second = serve()
    await wait_ready(http, second.url)
    after = [await (await http.get(f"{second.url}/v1/jobs/{job['id']}")).json() for job in jobs]
    assert after == before


async def test_cli_submit_wait_shows_progress_and_prints_the_result(
    serve: StartServe, http: aiohttp.ClientSession
) -> None:
    server = serve()
    await wait_ready(http, server.url)
    done = await run_cli(
        "submit", "ticker", "--args", '{"steps": 3}', "--wait", "--url", server.url
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == 3
    assert "[" in done.stderr and "100.0%" in done.stderr and "succeeded" in done.stderr
    failed = await run_cli("submit", "always_fail", "--wait", "--url", server.url)
    assert failed.returncode == 1
    assert orjson.loads(failed.stdout)["status"] == "failed"
    bad = await run_cli("submit", "echo", "--args", '{"nope": 1}', "--url", server.url)
    assert bad.returncode == 2 and "args.nope" in bad.stderr
    table = await run_cli("jobs", "--url", server.url)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == [
        "ID",
        "TASK",
        "STATUS",
    ]


async def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "aioqueue", *args]
    environ = {**ServeProcess("memory://", "x").environ(), **(env or {})}
    return await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60
    )


#: How long a busy client leaves the server's close frame unread: well within connection.CLOSE_TIMEOUT.
BUSY = 0.3
CLOSED_TYPES = {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}


async def close_code_seen(ws: aiohttp.ClientWebSocketResponse, busy: float = 0.0) -> int | None:
    """Read until the server closes (after `busy` s of reading nothing): the client's close code."""
    await asyncio.sleep(busy)
    while (await ws.receive(timeout=10)).type not in CLOSED_TYPES:
        pass
    return ws.close_code


async def test_sigterm_closes_websockets_with_1001_and_exits_0(
    serve: StartServe, http: aiohttp.ClientSession
) -> None:
    """On SIGTERM the server waits for each client's close frame before it drops the connection
    (RFC 6455 §7.1.1), so an aiohttp client sees 1001, not 1006: one waiting for a frame, one busy
    for a moment when the close frame comes, and one following a running job."""
    server = serve(AIOQUEUE_JOBS__SHUTDOWN_GRACE="0.5")
    await wait_ready(http, server.url)
    job = await submit(
        http, server.url, {"task": "ticker", "args": {"steps": 100, "interval": 0.05}}
    )
    waiting, busy, following = [await http.ws_connect(server.url + "/v1/ws") for _ in range(3)]
    try:
        for ws in (waiting, busy):
            await ws.send_str('{"op": "ping"}')
            assert (await ws.receive(timeout=5)).data == '{"type":"pong"}'
        await following.send_str(
            orjson.dumps({"op": "subscribe", "channel": f"job:{job['id']}"}).decode()
        )
        while (await next_job_frame(following))["event"] != "progress":
            pass
        server.signal(signal.SIGTERM)
        codes = await asyncio.gather(
            close_code_seen(waiting), close_code_seen(busy, BUSY), close_code_seen(following)
        )
    finally:
        for ws in (waiting, busy, following):
            await ws.close()
    assert list(codes) == [1001, 1001, 1001]
    assert server.proc is not None and server.proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        pytest.param({"AIOQUEUE_HTTP__PORT": "eighty"}, "http.port = 'eighty'", id="bad-port"),
        pytest.param({"AIOQUEUE_HTTP__PROT": "1"}, "AIOQUEUE_HTTP__PORT", id="typo"),
        pytest.param({"AIOQUEUE_APP": "tests.nothing:app"}, "cannot import", id="bad-app"),
        pytest.param({"AIOQUEUE_BROKER__URL": "redis://x"}, "broker.url", id="bad-url"),
        pytest.param(
            {
                "AIOQUEUE_BROKER__URL": "amqp://g:g@127.0.0.1:1/",
                "AIOQUEUE_BROKER__CONSUMER_TIMEOUT": "30",
            },
            "may run 300 s, longer than RabbitMQ's consumer_timeout",
            id="task-longer-than-consumer-timeout",
        ),
    ],
)
async def test_a_bad_config_stops_start_up_with_one_line(env: dict[str, str], needle: str) -> None:
    done = await run_cli("serve", env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


async def test_check_passes_on_a_reachable_broker(broker_url: str, prefix: str) -> None:
    done = await run_cli(
        "check", env={"AIOQUEUE_BROKER__URL": broker_url, "AIOQUEUE_BROKER__PREFIX": prefix}
    )
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


async def test_check_fails_clearly_on_an_unreachable_broker() -> None:
    env = {
        "AIOQUEUE_BROKER__URL": "amqp://guest:guest@127.0.0.1:1/",
        "AIOQUEUE_BROKER__CONFIRM_TIMEOUT": "0.5",
    }
    done = await run_cli("check", env=env)
    assert done.returncode == 1 and "FAILED" in done.stderr


MALFORMED = [
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX: a\x00b\r\n\r\n",
    b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
]


@pytest.mark.parametrize("broker_url", ["memory"], indirect=True)
async def test_malformed_requests_cannot_flood_the_log(
    serve: StartServe, http: aiohttp.ClientSession
) -> None:
    """Each gets its 400; the log gets one WARNING line a minute about them, no traceback (it
    was an ERROR with a traceback, about 1 KB, per request)."""
    server = serve()
    await wait_ready(http, server.url)
    host, port = server.url.removeprefix("http://").split(":")
    for request in MALFORMED * 20:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(100), 5)
        assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer
        writer.close()
        await writer.wait_closed()
    async with http.get(server.url + "/healthz") as response:
        assert response.status == 200
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log
    assert log.count("malformed HTTP request") == 1


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"AIOQUEUE_HTTP__HOST": "0.0.0.0"}, True),
        ({"AIOQUEUE_HTTP__HOST": "127.0.0.1"}, False),
        (
            {
                "AIOQUEUE_HTTP__HOST": "0.0.0.0",
                "AIOQUEUE_AUTH__MODE": "token",
                "AIOQUEUE_AUTH__TOKENS": '[{"token": "t-0123456789abcdef", "principal": "a",'
                ' "scopes": []}]',
            },
            False,
        ),
    ],
)
def test_auth_off_on_a_non_loopback_address_is_warned_at_start_up(
    prefix: str, tmp_path: Path, env: dict[str, str], warned: bool
) -> None:
    process = ServeProcess("memory://", prefix, env).start(tmp_path)
    try:
        assert ("WARNING: auth is off" in process.log()) is warned, process.log()
    finally:
        assert process.stop() == 0


async def test_json_logs_carry_the_job_on_every_line_about_it(
    prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """`[log] format = "json"`: every line an object; a task's own lines, async or in a thread,
    and the service's lines about a job name it."""
    process = ServeProcess("memory://", prefix, {"AIOQUEUE_LOG__FORMAT": "json"}).start(tmp_path)
    try:
        await wait_ready(http, process.url)
        jobs = {}
        for task in ("says", "says_sync"):
            job = await submit(http, process.url, {"task": task, "args": {"text": task}})
            assert (await wait_terminal(http, process.url, job["id"]))["status"] == "succeeded"
            jobs[task] = job
    finally:
        assert process.stop() == 0
    lines = [line for line in process.log().splitlines() if line.startswith("{")]
    records = [orjson.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    said_by = {"says": "async says says", "says_sync": "sync says says_sync"}
    for task, job in jobs.items():
        (said,) = [r for r in records if r["message"] == said_by[task]]
        assert said["job_id"] == job["id"], said
        assert (said["task"], said["attempt"], said["queue"]) == (task, 1, "default")
    assert not [
        r for r in records if "job_id" in r and r["job_id"] not in {j["id"] for j in jobs.values()}
    ]
