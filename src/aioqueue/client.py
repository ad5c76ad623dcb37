"""A small HTTP and websocket client of the aioqueue API, used by the CLI."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TextIO

import aiohttp
import orjson

from aioqueue.config import Settings

TERMINAL = {"succeeded", "failed", "dead", "cancelled"}


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status


def default_url(settings: Settings) -> str:
    host = settings.http.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{settings.http.port}"


class Client:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        """`token`: a bearer token, sent on every request and the websocket's handshake."""
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._session = aiohttp.ClientSession(
            headers=headers, json_serialize=lambda v: orjson.dumps(v).decode()
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self._session.request(method, self.base_url + path, **kwargs) as response:
                data = orjson.loads(await response.read() or b"null")
                if response.status >= 400:
                    detail = data.get("detail") if isinstance(data, dict) else None
                    errors = data.get("errors") if isinstance(data, dict) else None
                    if errors:
                        detail = f"{detail}: " + "; ".join(
                            f"{e['field']}: {e['message']}" for e in errors
                        )
                    raise ApiError(response.status, detail or response.reason or "error")
                return data
        except aiohttp.ClientConnectionError as exc:
            raise ApiError(0, f"cannot reach {self.base_url}: {exc}") from None

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/v1/jobs", json=body)
        return result

    async def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}")
        return result

    async def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("DELETE", f"/v1/jobs/{job_id}")
        return result

    async def retry(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/retry")
        return result

    async def queues(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/queues")
        return result

    async def dead(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/dead/retry` or `/v1/dead/purge` (`action`) with a filter body."""
        result: dict[str, Any] = await self._call("POST", f"/v1/dead/{action}", json=body)
        return result

    async def list_jobs(
        self, status: str | None, task: str | None, limit: int, **filters: str | None
    ) -> dict[str, Any]:
        """Up to `limit` jobs, newest first: `{"jobs", "next"}`; `filters` are more query
        parameters (error_type, finished_before, ...). A page ends early at the server's
        `http.max_list_bytes`, so this follows `next` until it has `limit` jobs."""
        params = {"limit": str(limit)}
        if status:
            params["status"] = status
        if task:
            params["task"] = task
        params |= {key: value for key, value in filters.items() if value is not None}
        jobs: list[Any] = []
        while True:
            page: dict[str, Any] = await self._call("GET", "/v1/jobs", params=params)
            jobs += page["jobs"]
            if page["next"] is None or len(jobs) >= limit:
                return {"jobs": jobs, "next": page["next"]}
            params |= {"limit": str(limit - len(jobs)), "cursor": page["next"]}

    async def submit_and_follow(self, body: dict[str, Any], bar: ProgressBar) -> dict[str, Any]:
        """Submit, then follow the job's events over the websocket until it is terminal."""
        async with self._session.ws_connect(self.base_url + "/v1/ws") as ws:
            job = await self.submit(body)
            await ws.send_str(
                orjson.dumps({"op": "subscribe", "channel": f"job:{job['id']}"}).decode()
            )
            async for message in ws:
                frame = orjson.loads(message.data)
                if frame.get("type") == "error":
                    raise ApiError(0, f"{frame['code']}: {frame['message']}")
                if frame.get("type") != "job":
                    continue
                job = dict(frame["job"])
                bar.update(job)
                if job["status"] in TERMINAL:
                    bar.finish()
                    return job
        raise ApiError(0, "the websocket closed before the job finished")


class ProgressBar:
    """A one-line progress bar on a terminal; plain lines when the output is not one."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last: tuple[Any, ...] | None = None

    def update(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        value = progress.get("value")
        state = (job["status"], value, progress.get("message"))
        if state == self._last:
            return
        self._last = state
        message = progress.get("message") or ""
        if value is None:
            line = f"{job['status']:<10} {message}"
        else:
            width = max(10, min(40, shutil.get_terminal_size().columns - 40))
            filled = int(width * value)
            bar = "#" * filled + "-" * (width - filled)
            line = f"{job['status']:<10} [{bar}] {value * 100:5.1f}% {message}"
        if self._tty:
            self._out.write("\r\x1b[2K" + line)
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def finish(self) -> None:
        if self._tty:
            self._out.write("\n")
            self._out.flush()


def table(rows: Sequence[tuple[str, ...]], empty: str) -> str:
    """A header row and rows as fixed-width columns; `empty` under the header if no rows."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    if len(rows) == 1:
        lines.append(empty)
    return "\n".join(line.rstrip() for line in lines)


def jobs_table(jobs: list[dict[str, Any]]) -> str:
    """Jobs as a fixed-width table, newest first."""
    rows = [("ID", "TASK", "STATUS", "ATTEMPT", "CREATED", "FINISHED")]
    for job in jobs:
        attempt = f"{job['attempt']}/{job['max_attempts']}"
        created = (job["created_at"] or "")[:19]
        finished = (job["finished_at"] or "")[:19]
        rows.append((job["id"], job["task"], job["status"], attempt, created, finished))
    return table(rows, "(no jobs)")


#: Characters of an error message a table shows.
MESSAGE_WIDTH = 60


def dead_table(jobs: list[dict[str, Any]]) -> str:
    """Dead letters (failed and dead jobs) as a table, newest first."""
    rows = [("ID", "TASK", "STATUS", "ERROR", "FINISHED", "MESSAGE")]
    for job in jobs:
        error = job["error"] or {}
        message = " ".join(str(error.get("message") or "").split())
        if len(message) > MESSAGE_WIDTH:
            message = message[: MESSAGE_WIDTH - 3] + "..."
        finished = (job["finished_at"] or "")[:19]
        rows.append(
            (job["id"], job["task"], job["status"], error.get("type") or "", finished, message)
        )
    return table(rows, "(no dead letters)")


QUEUE_COLUMNS: tuple[str, ...] = ("QUEUE", "DEPTH", "0-3", "4-6", "7-9", "CONSUMERS", "RUNNING")
QUEUE_COLUMNS += ("IN/S", "OUT/S", "OLDEST", "DEAD")


def queues_table(report: dict[str, Any]) -> str:
    """`GET /v1/queues` as a table, and a line about the dead-letter queue."""
    rows = [QUEUE_COLUMNS]
    for queue in report["queues"]:
        bands = queue["bands"] or {}
        oldest = queue["oldest_age_s"]
        rows.append(
            (
                queue["name"],
                _shown(queue["depth"]),
                *(_shown(bands.get(name, {}).get("depth")) for name in ("0-3", "4-6", "7-9")),
                _shown(queue["consumers"]),
                str(queue["running"]),
                f"{queue['in_per_s']:.2f}",
                f"{queue['out_per_s']:.2f}",
                "-" if oldest is None else f"{oldest:.1f}s",
                str(queue["dead"]),
            )
        )
    dlq = report["dead_letter_queue"]
    return table(rows, "(no queues)") + (
        f"\ndead-letter queue: {_shown(dlq['messages'])} messages (kept: at most"
        f" {dlq['max_length']}, for {dlq['max_age_seconds']} s)"
    )


def _shown(value: int | None) -> str:
    """A broker's figure, or `-` when the broker could not be asked."""
    return "-" if value is None else str(value)
