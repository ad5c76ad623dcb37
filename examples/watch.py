"""Follow one job over the websocket: `python examples/watch.py JOB_ID [BASE_URL]`.

Prints every event as it happens and exits when the job is finished.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp

TERMINAL = {"succeeded", "failed", "dead", "cancelled"}


async def watch(job_id: str, base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{base_url}/v1/ws") as ws:
        await ws.send_json({"op": "subscribe", "channel": f"job:{job_id}"})
        async for message in ws:
            frame = json.loads(message.data)
            if frame["type"] == "error":
                raise SystemExit(f"{frame['code']}: {frame['message']}")
            if frame["type"] != "job":
                continue
            job = frame["job"]
            print(frame["event"], job["status"], job["progress"] or "", job["result"] or "")
            if job["status"] in TERMINAL:
                return


if __name__ == "__main__":
    asyncio.run(watch(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8080"))
