"""The open-files limit of `aioqueue serve`: raised at start-up, and the connections it allows.

Every connection is a file descriptor. Linux starts most processes with a soft RLIMIT_NOFILE of
1024 (256 on macOS) below a hard limit that is often far higher; a process may raise its own
soft limit up to the hard one, so `aioqueue serve` does. Past the limit, accept() fails, and so
do the broker's reconnects and the job store's files, so the connections are capped below it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

#: Descriptors kept out of the connection cap: the broker's connections (three at most), the
#: job store's SQLite files, the listening sockets, the event loop's and the interpreter's own
#: (a served process holds about 20 before its first client), with room to spare.
RESERVED = 128


@dataclass(frozen=True, slots=True)
class FdLimit:
    soft: int  # the soft limit now; -1: none
    hard: int  # -1: none (RLIM_INFINITY)
    before: int  # the soft limit at start-up
    error: str | None = None  # why it could not be raised


def raise_fd_limit() -> FdLimit | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; None where there is none (Windows)."""
    if sys.platform == "win32":
        return None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, error = soft, None
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # macOS refuses an unlimited soft limit
            error = str(exc) or type(exc).__name__

    def number(limit: int) -> int:
        return -1 if limit == resource.RLIM_INFINITY else limit

    return FdLimit(number(soft), number(hard), number(before), error)


def connection_cap(max_connections: int, limit: FdLimit | None) -> int:
    """`max_connections`, lowered to what the limit leaves once `RESERVED` (or half of a small
    limit) is set aside for everything else."""
    if limit is None or limit.soft < 0:
        return max_connections
    return max(1, min(max_connections, limit.soft - min(RESERVED, limit.soft // 2)))
