"""The file a process keeps its job store in, so that a restart resumes where it stopped.

One file per log (broker URL and prefix), and one process per file: a second process started in
the same directory on the same log finds the file locked and keeps its store in a temporary file
instead (it then starts from a checkpoint or the log, as a fresh process does). A file that is
not a sound store (cut short, corrupt, of another schema) is moved aside, never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import tempfile
from urllib.parse import urlsplit

from aioqueue.store import MAX_BYTES, JobStore

logger = logging.getLogger(__name__)


def file_name(broker_url: str, prefix: str) -> str:
    """`<prefix>-<digest of host, port and vhost>.sqlite3`: one file per log, no credentials."""
    parts = urlsplit(broker_url)
    where = f"{parts.hostname}:{parts.port}{parts.path or '/'}"
    return f"{prefix}-{hashlib.sha256(where.encode()).hexdigest()[:12]}.sqlite3"


class StoreFile:
    """A claimed store file: `path`, locked for this process until `release()`."""

    def __init__(self, path: str, lock: int | None, temporary: bool) -> None:
        self.path = path
        self._lock = lock
        self.temporary = temporary

    @classmethod
    def claim(cls, directory: str, name: str) -> StoreFile:
        path = os.path.join(directory, name)
        try:
            os.makedirs(directory, exist_ok=True)
            lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            logger.warning(
                "cannot keep the job store in %s (%s): using a temporary file", path, exc
            )
            return cls._temporary()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            logger.warning("%s is in use by another process: using a temporary file", path)
            return cls._temporary()
        return cls(path, lock, temporary=False)

    @classmethod
    def _temporary(cls) -> StoreFile:
        handle, path = tempfile.mkstemp(prefix="aioqueue-store-", suffix=".sqlite3")
        os.close(handle)
        os.unlink(path)  # SQLite creates it; an empty file would be a valid, empty database
        return cls(path, None, temporary=True)

    def open(self, result_ttl: float, max_bytes: int = MAX_BYTES) -> JobStore:
        """The store in this file; a file that fails its check is moved aside, and a new one
        started (the log or a checkpoint then rebuilds the state)."""
        try:
            return JobStore(result_ttl, self.path, max_bytes=max_bytes)
        except sqlite3.DatabaseError as exc:
            aside = self.path + ".corrupt"
            logger.error("the job store %s is unsound (%s): moved to %s", self.path, exc, aside)
            self.discard(aside)
            return JobStore(result_ttl, self.path, max_bytes=max_bytes)

    def discard(self, aside: str | None = None) -> None:
        """Remove the store's files (or move the database to `aside`)."""
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                if aside is not None and not suffix:
                    os.replace(self.path, aside)
                else:
                    os.unlink(self.path + suffix)

    def release(self) -> None:
        if self.temporary:
            self.discard()
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None
