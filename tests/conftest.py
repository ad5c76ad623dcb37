"""Shared fixtures: one private RabbitMQ node per test session, and the broker parameter.

Behaviour both brokers share is tested on both through `broker_url` (memory:// and amqp://);
each test gets its own name `prefix`, so tests share the node without sharing queues.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.rabbitmq import RABBITMQ_BIN, RabbitNode
from tests.support import STORE_DIR

NODE_START_TIMEOUT = 120.0  # its own bound, outside the first test's 60 s (pyproject)


class ExternalBroker:
    """A broker the developer runs (AQ_TEST_AMQP_URL=amqp://...): a URL, no fault injection."""

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        raise RuntimeError(
            f"rabbit.{name} needs the private node that pytest starts: unset AQ_TEST_AMQP_URL"
        )


@contextmanager
def _outside_test_timeout() -> Iterator[None]:
    """pytest-timeout's alarm (SIGALRM) also times fixture setup: pause it, then re-arm it."""
    left, _ = signal.getitimer(signal.ITIMER_REAL)
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if left:
            signal.setitimer(signal.ITIMER_REAL, left)


@pytest.fixture(scope="session", autouse=True)
def _store_dir() -> Iterator[None]:
    """Served processes keep their job stores in `support.STORE_DIR`, removed at the end."""
    yield
    shutil.rmtree(STORE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode | ExternalBroker]:
    """The session's RabbitMQ node, started on first use and stopped at the end."""
    external = os.environ.get("AQ_TEST_AMQP_URL")
    if external:
        yield ExternalBroker(external)
        return
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        pytest.fail("rabbitmq-server is not installed: run scripts/test, which installs it")
    base = Path(tempfile.mkdtemp(prefix="aioqueue-rabbit-"))
    node = RabbitNode(base)
    try:
        with _outside_test_timeout():
            node.start(timeout=NODE_START_TIMEOUT)
        yield node
    finally:
        try:
            node.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def amqp_url(rabbit: RabbitNode | ExternalBroker) -> str:
    return rabbit.url


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.amqp)])
def broker_url(request: pytest.FixtureRequest) -> str:
    """memory:// and the session's RabbitMQ, in turn: behaviour both brokers must share."""
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("amqp_url")
    return url


@pytest.fixture
def prefix() -> str:
    """A name prefix of this test's own: its exchanges and queues are its alone."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP and websocket client for tests of a served aioqueue; every call times out."""
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        yield session
