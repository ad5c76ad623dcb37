"""A checkpoint's content: a consistent copy of a job store's database, compressed and checked.

`take()` copies the store with SQLite's `VACUUM INTO` from a connection of its own (the store's
file is in WAL mode, so the copy is one consistent state while the store goes on writing) and
reads the log offset the copy covers from it. `restore()` checks the digest, decompresses, and
moves the database into place only once it is whole. Both block: run them in a thread.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import zlib
from dataclasses import dataclass

#: zlib's fastest level: fast, and a store of JSON rows compresses well at it (bench/replay.py:
#: 110,000 jobs in a 10 MB checkpoint).
COMPRESSION_LEVEL = 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    data: bytes  #: the compressed database
    sha256: str  #: of `data`
    offset: int  #: the last log offset the copy had applied
    jobs: int
    schema: int  #: the store's schema version (a store of another one is not loaded)


def take(store_path: str) -> Snapshot | None:
    """A compressed copy of the store at `store_path`; None if it has applied no log entry."""
    with tempfile.TemporaryDirectory(prefix="aioqueue-snapshot-") as folder:
        copy = os.path.join(folder, "copy.sqlite3")
        source = sqlite3.connect(store_path)
        try:
            source.execute("VACUUM INTO ?", (copy,))
        finally:
            source.close()
        db = sqlite3.connect(copy)
        try:
            offset = db.execute("SELECT value FROM meta WHERE key = 'offset'").fetchone()
            jobs = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
            schema = db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.close()
        if offset is None:
            return None
        with open(copy, "rb") as file:
            data = zlib.compress(file.read(), COMPRESSION_LEVEL)
    return Snapshot(data, hashlib.sha256(data).hexdigest(), int(offset[0]), jobs, schema)


def restore(data: bytes, sha256: str, destination: str) -> None:
    """Write the database of a checkpoint to `destination`; ValueError if it is not whole."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError("its digest does not match: a chunk is missing or damaged")
    try:
        database = zlib.decompress(data)
    except zlib.error as exc:
        raise ValueError(f"it does not decompress: {exc}") from None
    partial = destination + ".part"
    with open(partial, "wb") as file:
        file.write(database)
    os.replace(partial, destination)
