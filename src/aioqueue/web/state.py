"""What aioqueue's handlers share, kept in the aiohttp application under one typed key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from aioqueue.config import Settings
from aioqueue.errors import NotReady
from aioqueue.web.hub import Connection, Hub

if TYPE_CHECKING:
    from aioqueue.app import App
    from aioqueue.service import Service


@dataclass(eq=False)
class State:
    app: App
    settings: Settings
    hub: Hub = field(default_factory=Hub)
    service: Service | None = None
    connections: set[Connection] = field(default_factory=set)
    #: Sync tasks' threads still running once the service closed.
    threads_left: int = 0

    def ready_service(self) -> Service:
        """The service, once its store is rebuilt; NotReady (503) before that."""
        if self.service is None:
            raise NotReady("starting")
        self.service.check_replayed()
        return self.service


STATE = web.AppKey("aioqueue", State)
