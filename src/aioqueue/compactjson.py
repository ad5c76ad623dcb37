"""JSON bytes that are kept, in an object of their own size.

orjson returns its output in the buffer it wrote it in: at least 4 KiB, and for a long string
more than ten times its length (orjson 3.13: a 5 KB string dumps into 64 KiB; `sys.getsizeof`
does not show it, tracemalloc does: 1,000 dumps of `{"order": 7}` hold 4 MB). Whatever is kept
(a message in the memory broker's queues or topic log, a frame waiting in a websocket's queue, a
channel name) is copied out, so that memory bounded in messages is bounded in bytes too.
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """`orjson.dumps(value)`, copied into a bytes object of its own size."""
    return own(orjson.dumps(value))


def own(data: bytes) -> bytes:
    """`data` in a bytes object of its own size (`bytes(data)` would return `data` itself)."""
    return bytes(memoryview(data))
