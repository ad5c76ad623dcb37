"""What aioqueue's handlers share, kept in the aiohttp application under one typed key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from aioqueue.auth import Authenticator, Principal, authenticator
from aioqueue.config import Settings
from aioqueue.errors import NotReady
from aioqueue.metrics import Metrics
from aioqueue.tasks import Registry
from aioqueue.web.connection import Connection
from aioqueue.web.hub import Hub
from aioqueue.web.principals import Limits, authenticate

if TYPE_CHECKING:
    from aioqueue.deadletters import DeadLetters
    from aioqueue.producer import Jobs
    from aioqueue.publisher import Topics
    from aioqueue.queues import QueueStats
    from aioqueue.service import Service

#: Told of the service when it is built, and of None when it is closed (`App.mount` keeps it).
ServiceBinding = Callable[["Service | None"], None]


@dataclass(eq=False)
class State:
    registry: Registry
    settings: Settings
    bind: ServiceBinding | None = None
    hub: Hub = field(init=False)
    service: Service | None = None
    connections: set[Connection] = field(default_factory=set)
    #: Sync tasks' threads still running once the service closed.
    threads_left: int = 0
    #: None with auth off.
    authenticator: Authenticator | None = field(init=False)
    limits: Limits = field(init=False)
    #: What `GET /metrics` serves: the application's, made before the service so that HTTP
    #: requests and websockets are counted from the first, and kept across its restarts.
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        auth = self.settings.auth
        self.hub = Hub(self.settings.topics.max_catch_ups, tracebacks=auth.mode == "none")
        self.authenticator = authenticator(auth)  # ConfigError for a key it cannot use
        self.limits = Limits(auth)
        self.metrics = Metrics(self.registry.tasks)

    def caller(self, request: web.Request) -> Principal:
        """Who sent the request (its `Authorization` header); `Unauthorized` (401) if nobody."""
        return authenticate(self.authenticator, request.headers.get("Authorization"))

    def built(self) -> Service:
        """The service; NotReady (503) before it is built (its own calls say NotReady until its
        store is complete)."""
        if self.service is None:
            raise NotReady("starting")
        return self.service

    def jobs(self) -> Jobs:
        """The producer side of the service."""
        return self.built().jobs

    def topics(self) -> Topics:
        return self.built().topics

    def dead_letters(self) -> DeadLetters:
        return self.built().dead_letters

    def queue_stats(self) -> QueueStats:
        return self.built().queue_stats


STATE = web.AppKey("aioqueue", State)
