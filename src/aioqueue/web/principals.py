"""Who is calling, and how much each principal may take (CONTRACT §6).

`authenticate()` reads a request's `Authorization: Bearer` header (every principal is
`ANONYMOUS` with auth off). `Limits` holds what each principal may take from the others, per
process: writes per second, open websockets, subscriptions. With auth off there are no
principals to tell apart, and only the per-connection limits apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aioqueue.auth import ANONYMOUS, Authenticator, Principal, bearer
from aioqueue.config import AuthSettings
from aioqueue.errors import RateLimited, Unauthorized
from aioqueue.ratelimit import Buckets

if TYPE_CHECKING:
    from aioqueue.web.connection import Connection


def authenticate(authenticator: Authenticator | None, header: str | None) -> Principal:
    """The principal of an `Authorization` header; `Unauthorized` if it is missing or bad."""
    if authenticator is None:
        return ANONYMOUS
    token = bearer(header)
    if token is None:
        raise Unauthorized("no credentials: send 'Authorization: Bearer TOKEN'", given=False)
    return authenticator.authenticate(token)


class Limits:
    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._writes = Buckets(settings.max_submits_per_second)
        #: Each principal's open websockets (authenticated ones).
        self.connections: dict[str, set[Connection]] = {}

    def check_write(self, who: Principal) -> None:
        """A submit, cancel, retry or publish: `RateLimited` (429) past the principal's rate."""
        if who.name is None:
            return
        wait = self._writes.take(who.name)
        if wait:
            rate = self._settings.max_submits_per_second
            raise RateLimited(
                f"at most {rate} submits, cancels, retries and publishes per second per principal"
                f" (auth.max_submits_per_second); try again in {wait:.2f} s",
                wait,
            )

    def websocket_refused(self, who: Principal, conn: Connection) -> str | None:
        """Why `conn` may not be one of `who`'s websockets (there are as many as allowed
        already), or None, and then it counts as one until `forget`."""
        if who.name is None:
            return None
        mine = self.connections.setdefault(who.name, set())
        if conn not in mine and len(mine) >= self._settings.max_websockets:
            return (
                f"{who.name!r} has {len(mine)} websockets open already; at most"
                f" {self._settings.max_websockets} (auth.max_websockets)"
            )
        mine.add(conn)
        return None

    def forget(self, name: str | None, conn: Connection) -> None:
        """`conn` is no longer one of `name`'s websockets (it closed)."""
        if name is None or (mine := self.connections.get(name)) is None:
            return
        mine.discard(conn)
        if not mine:
            del self.connections[name]

    def subscriptions_left(self, who: Principal) -> int | None:
        """How many more channels `who` may subscribe to over all its websockets; None: no
        per-principal bound (auth off)."""
        if who.name is None:
            return None
        mine = self.connections.get(who.name, ())
        return self._settings.max_subscriptions - sum(len(c.subscriptions) for c in mine)
