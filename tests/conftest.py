"""Shared fixtures: one private RabbitMQ node per test session, and the broker parameter.

Behaviour both brokers share is tested on both through `broker_url` (memory:// and amqp://);
each test gets its own name `prefix`, so tests share the node without sharing queues.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.rabbitmq import RABBITMQ_BIN, RabbitNode


class ExternalBroker:
    """A broker the developer runs (AQ_TEST_AMQP_URL): no fault injection on it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"{name}() needs the private node; unset AQ_TEST_AMQP_URL")


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
        node.start()
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
