"""What authentication costs a request: `GET /v1/jobs/{id}` of the real `aioqueue serve`, with
`[auth] mode` none (the baseline, in the same run), token, JWT HS256 and JWT RS256.

Each mode serves a fresh process on memory:// (the broker plays no part in a read); a client in
this process keeps `--concurrency` requests in flight for `--seconds` after a warm-up, and the
table gives requests per second, p50/p99 latency and the served process's CPU per request, and
the rate as a ratio of the run's own `none`.

    python bench/auth.py [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "src")]
sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

import aiohttp  # noqa: E402
import jwt  # noqa: E402
import psutil  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from bench.common import cpu_seconds, machine, percentile, print_table, revision  # noqa: E402
from bench.e2e import Server, wait_ready  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123456789"
TOKEN = "bench-token-0123456789abcdef"
SCOPES = ["jobs:submit", "jobs:read"]
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def modes() -> dict[str, tuple[dict[str, str], str | None]]:
    """Each mode's settings, and the token its client sends."""
    claims = {"sub": "bench", "exp": int(time.time()) + 3600, "scope": " ".join(SCOPES)}
    tokens = [{"token": TOKEN, "principal": "bench", "scopes": SCOPES}]
    return {
        "none": ({}, None),
        "token": (
            {"AIOQUEUE_AUTH__MODE": "token", "AIOQUEUE_AUTH__TOKENS": json.dumps(tokens)},
            TOKEN,
        ),
        "jwt HS256": (
            {"AIOQUEUE_AUTH__MODE": "jwt", "AIOQUEUE_AUTH__JWT_SECRET": SECRET},
            jwt.encode(claims, SECRET, algorithm="HS256"),
        ),
        "jwt RS256": (
            {
                "AIOQUEUE_AUTH__MODE": "jwt",
                "AIOQUEUE_AUTH__JWT_ALGORITHMS": '["RS256"]',
                "AIOQUEUE_AUTH__JWT_PUBLIC_KEY": PUBLIC_PEM,
            },
            jwt.encode(claims, RSA_KEY, algorithm="RS256"),
        ),
    }


async def measure(
    env: dict[str, str], token: str | None, seconds: float, concurrency: int
) -> tuple[float, float, float, float]:
    """Requests per second, p50 and p99 in ms, served-process CPU ms per request."""
    env = {**env, "AIOQUEUE_AUTH__MAX_SUBMITS_PER_SECOND": "100000"}
    with tempfile.TemporaryFile() as log:
        server = await Server("memory://", "bench-auth", 32, log, env).start()
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
                await wait_ready(http, server.url)
                async with http.post(
                    server.url + "/v1/jobs", json={"task": "noop", "args": {}}
                ) as response:
                    assert response.status == 202, await response.text()
                    url = f"{server.url}/v1/jobs/{(await response.json())['id']}"
                assert server.proc is not None
                process = psutil.Process(server.proc.pid)
                await load(http, url, 1.0, concurrency)  # warm-up
                cpu = cpu_seconds(process)
                latencies, elapsed = await load(http, url, seconds, concurrency)
                cpu = cpu_seconds(process) - cpu
        finally:
            await server.stop()
    count = len(latencies)
    return (
        count / elapsed,
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        cpu / count * 1e3,
    )


async def load(
    http: aiohttp.ClientSession, url: str, seconds: float, concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    started = time.perf_counter()
    end = started + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            sent = time.perf_counter()
            async with http.get(url) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(
        f"# {machine()}; {revision()}; GET /v1/jobs/{{id}}, memory://, {args.concurrency} in flight"
    )
    rows = [["mode", "req/s", "× none", "p50 ms", "p99 ms", "server CPU ms/req"]]
    baseline = None
    for name, (env, token) in modes().items():
        rate, p50, p99, cpu = await measure(env, token, args.seconds, args.concurrency)
        baseline = baseline or rate
        rows.append(
            [
                name,
                f"{rate:,.0f}",
                f"{rate / baseline:.2f}",
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{cpu:.3f}",
            ]
        )
    print_table(rows)


if __name__ == "__main__":
    asyncio.run(main())
