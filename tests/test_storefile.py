"""The job store's file: one process per file, and a file that is unsound is never trusted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aioqueue.storefile import StoreFile, file_name
from tests.support import ROOT
from tests.test_store import spec

#: A process that writes one job and its offset per transaction, for ever (until killed).
WRITER = """
import sys
from aioqueue.store import JobStore
from tests.test_store import spec
store = JobStore(60, sys.argv[1])
n = 0
while True:
    store.create(spec(n))
    store.write(offset=n)
    if n == 200:
        print("writing", flush=True)
    n += 1
"""


def test_the_file_is_named_by_the_log_without_credentials() -> None:
    one = file_name("amqp://alice:secret@rabbit:5672/prod", "app")
    assert one == file_name("amqp://bob:other@rabbit:5672/prod", "app")
    assert "secret" not in one and one.startswith("app-") and one.endswith(".sqlite3")
    assert one != file_name("amqp://alice:secret@rabbit:5672/test", "app")
    assert one != file_name("amqp://alice:secret@rabbit:5672/prod", "other")


def test_a_restart_resumes_from_the_saved_offset(tmp_path: Path) -> None:
    file = StoreFile.claim(str(tmp_path), "s.sqlite3")
    store = file.open(result_ttl=60)
    store.create(spec(1))
    store.write(offset=41)
    store.close()
    file.release()
    again = StoreFile.claim(str(tmp_path), "s.sqlite3").open(result_ttl=60)
    assert again.offset == 41 and again.get("job1") is not None


def test_a_second_process_on_the_same_file_gets_a_temporary_one(tmp_path: Path) -> None:
    first = StoreFile.claim(str(tmp_path), "s.sqlite3")
    second = StoreFile.claim(str(tmp_path), "s.sqlite3")
    assert not first.temporary and second.temporary and second.path != first.path
    store = second.open(result_ttl=60)
    store.create(spec(1))
    store.write(offset=0)
    store.close()
    second.release()
    assert not os.path.exists(second.path)
    first.release()
    assert not StoreFile.claim(str(tmp_path), "s.sqlite3").temporary  # free again


@pytest.mark.parametrize("damage", ["cut short", "garbage", "empty header"])
def test_an_unsound_file_is_moved_aside_and_never_loaded(tmp_path: Path, damage: str) -> None:
    file = StoreFile.claim(str(tmp_path), "s.sqlite3")
    store = file.open(result_ttl=60)
    for n in range(3000):  # several pages of rows
        store.create(spec(n))
    store.write(offset=2999)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = Path(file.path).read_bytes()
    if damage == "cut short":
        Path(file.path).write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        Path(file.path).write_bytes(data[:4096] + os.urandom(len(data) - 4096))
    else:
        Path(file.path).write_bytes(b"\0" * len(data))
    store = file.open(result_ttl=60)
    assert store.offset is None and len(store) == 0  # a fresh store: the log rebuilds it
    assert Path(file.path + ".corrupt").exists()


def test_a_process_killed_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    """SIGKILL while a store writes a transaction a few microseconds apart: on reopening, its
    offset and its jobs agree (each transaction is whole or absent)."""
    path = tmp_path / "s.sqlite3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
        time.sleep(0.3)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer.stdout.close()  # type: ignore[union-attr]
    store = StoreFile.claim(str(tmp_path), "s.sqlite3").open(result_ttl=60)
    assert store.offset is not None and store.offset >= 200
    assert len(store) == store.offset + 1
    page, _ = store.list(limit=1)
    assert page[0].id == f"job{store.offset}"
