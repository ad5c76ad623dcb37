"""Summarise a py-spy profile in collapsed form (`bench/e2e.py --py-spy FILE` writes one).

Prints the share of samples by stage of the job path (each stack counted once, in the first
stage of STAGES that any of its frames matches: so the order of STAGES is a priority), then
the functions with the most samples of their own, and by package.

    python bench/profile_summary.py FILE [--top 20]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

#: (stage, substrings of a frame): the first stage with a matching frame gets the sample.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("websocket frames out (hub writer, aiohttp ws writer)", ("_write_forever",)),
    ("AMQP publish with confirm", ("AmqpBroker._publish", "basic_publish", "Exchange.publish")),
    ("submit checks (build_spec)", ("build_spec",)),
    ("store: apply events, notify, build job frames", ("JobStore.", "job_frame", "to_dict")),
    ("event log: apply entries", ("EventLog.on_log", "_on_log_message")),
    ("runner: job deliveries, run, ack", ("aioqueue/runner.py",)),
    ("event log: write batches", ("_write_and_settle", "_write_batches", "EventLog._write")),
    ("websocket ops in (subscribe, unsubscribe)", ("aioqueue/web/ws.py",)),
    ("HTTP handler (rest of submit_job)", ("submit_job", "problem_middleware")),
    ("aiohttp HTTP cycle (parse, route, write)", ("aiohttp/web_", "aiohttp/http_")),
    ("aiormq reading frames (pamqp)", ("Connection.__reader", "FrameReceiver", "Channel._")),
    ("aiormq writing frames", ("Connection.__writer",)),
    ("aiohttp websocket reader", ("aiohttp/_websocket",)),
    ("asyncio timeouts", ("asyncio/timeouts.py",)),
]
LOOP = "event loop itself (uvloop C code, callback dispatch)"
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def read(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def stage_of(frames: list[str]) -> str:
    for stage, patterns in STAGES:
        if any(pattern in frame for frame in frames for pattern in patterns):
            return stage
    leaf = frames[-1]
    return LOOP if leaf.startswith("Runner.run ") or "uvloop" in leaf else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    stacks = read(args.file)
    total = sum(count for _, count in stacks)
    if not total:
        raise SystemExit(f"{args.file}: no samples")
    stages: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        stages[stage_of(frames)] += count
        match = FRAME.match(frames[-1])
        function, file = (match["function"], match["file"]) if match else (frames[-1], "?")
        own[f"{function} ({file})"] += count
        packages[file.split("/")[0]] += count

    def show(title: str, counter: collections.Counter[str], top: int) -> None:
        print(f"\n{title}")
        for name, count in counter.most_common(top):
            print(f"{100 * count / total:5.1f}%  {name}")

    print(f"{total} samples of the serve process")
    show("by stage of the job path:", stages, len(STAGES) + 2)
    show("functions, own samples:", own, args.top)
    show("packages, own samples:", packages, 10)


if __name__ == "__main__":
    main()
