"""`topic:PATTERN` subscriptions: live fan-out of topic messages, and catch-up with `since`.

Every process reads the topic log live (`TopicLog.listen`) and hands each message to
`on_message`, which sends it, serialised once per pattern, to every live subscription whose
pattern matches. Topic messages are never coalesced; a client too slow for them is closed with
1013, like any other, and resumes with `since` (see connection.py).

A subscription with `since: N` is not live at first. A task of its own reads the retained
messages from N + 1 (`TopicLog.read`), sends those that match, paced by the client (it waits
while the connection's queue is half full), and after each one compares the offset it reached
with the live reader's `position`. Once it reached the message before `position`, every later
message is one the live reader has yet to hand on: the subscription goes live, in the same step,
with no await in between, so nothing falls between the two. The live side skips what the
catch-up sent already (offsets up to `after`): no gap, no duplicate, under any publishing rate.
At most `topics.max_catch_ups` catch-ups read at once; one whose client has had no room for
`HOLD_ROOM` seconds gives its turn back and reads again from where it was once it has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import orjson

from aioqueue import compactjson
from aioqueue.broker.base import TopicLog
from aioqueue.errors import BrokerUnavailable
from aioqueue.topics import Matcher, compile_pattern
from aioqueue.web.protocol import ErrorCode

if TYPE_CHECKING:
    from aioqueue.web.connection import Connection

logger = logging.getLogger(__name__)

#: Topics whose matching channels are remembered; the memory is dropped when it grows past this.
ROUTES_KEPT = 10_000
#: Seconds between tries of a catch-up that lost the broker.
RETRY_DELAY = 0.5
#: Seconds a catch-up keeps its slot while its client has no room; then it gives it back.
HOLD_ROOM = 0.2


class TopicSub:
    """One connection's subscription to one pattern."""

    __slots__ = ("after", "conn", "live", "task")

    def __init__(self, conn: Connection, after: int) -> None:
        self.conn = conn
        #: Messages up to this offset were sent (or were before the subscription).
        self.after = after
        self.live = False
        self.task: asyncio.Task[None] | None = None


class TopicChannel:
    __slots__ = ("matcher", "name", "name_json", "subs")

    def __init__(self, name: str) -> None:
        self.name = name
        self.name_json = compactjson.dumps(name)
        self.matcher: Matcher = compile_pattern(name.removeprefix("topic:"))
        self.subs: dict[Connection, TopicSub] = {}

    def frame(self, topic: str, offset: int, data: bytes) -> bytes:
        # Built from bytes: `data` is JSON already (checked when it was published).
        return b'{"type":"message","channel":%b,"topic":%b,"offset":%d,"data":%b}' % (
            self.name_json,
            orjson.dumps(topic),
            offset,
            data,
        )


class TopicHub:
    def __init__(self, max_catch_ups: int) -> None:
        self.channels: dict[str, TopicChannel] = {}
        #: A catch-up holds a broker channel and its read-ahead: at most this many at once.
        self._catch_ups = asyncio.Semaphore(max_catch_ups)
        #: topic -> the channels whose pattern matches it.
        self._routes: dict[str, tuple[TopicChannel, ...]] = {}

    def subscribe(
        self, conn: Connection, channel: str, since: int | None, log: TopicLog
    ) -> TopicSub:
        """Subscribe `conn`: live from now if `since` is None, else with a catch-up from
        `since` (run once the caller sent its reply; see the module's docstring)."""
        self.unsubscribe(conn, channel)  # subscribing again starts again
        topic_channel = self.channels.get(channel)
        if topic_channel is None:
            topic_channel = self.channels[channel] = TopicChannel(channel)
            self._routes.clear()
        position = log.position
        live_from = -1 if position is None else position - 1
        sub = TopicSub(conn, since if since is not None else live_from)
        topic_channel.subs[conn] = sub
        conn.subscriptions.add(channel)
        if since is None or (position is not None and since >= position - 1):
            sub.live = True
        else:
            sub.task = asyncio.create_task(self._catch_up(topic_channel, sub, log))
        return sub

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        conn.subscriptions.discard(channel)
        topic_channel = self.channels.get(channel)
        if topic_channel is None:
            return
        sub = topic_channel.subs.pop(conn, None)
        if sub is not None and sub.task is not None:
            sub.task.cancel()
        if not topic_channel.subs:
            del self.channels[channel]
            self._routes.clear()

    def on_message(self, offset: int, topic: str, data: bytes) -> None:
        """The live reader's handler: send a message to every live subscription it matches."""
        routes = self._routes.get(topic)
        if routes is None:
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            routes = tuple(c for c in self.channels.values() if c.matcher.matches(topic))
            self._routes[topic] = routes
        for channel in routes:
            frame = None
            # send() never changes the subscriptions (a connection it closes is dropped later).
            for sub in channel.subs.values():
                if sub.live and offset > sub.after:
                    if frame is None:
                        frame = channel.frame(topic, offset, data)
                    sub.conn.send(frame)

    async def _catch_up(self, channel: TopicChannel, sub: TopicSub, log: TopicLog) -> None:
        """Replay until live, holding one of the catch-up slots only while the client keeps up:
        one that stops reading gives its slot (and its read-ahead) back within `HOLD_ROOM`
        seconds, so that clients that do not read never keep the others waiting."""
        while True:
            await sub.conn.room()
            async with self._catch_ups:
                if await self._replay(channel, sub, log):
                    return

    async def _replay(self, channel: TopicChannel, sub: TopicSub, log: TopicLog) -> bool:
        """Send the retained messages after `sub.after`; True once the subscription is live,
        False when the client has had no room for `HOLD_ROOM` seconds."""
        conn = sub.conn
        while True:
            try:
                async with contextlib.aclosing(log.read(sub.after)) as entries:
                    first = True
                    async for offset, topic, data in entries:
                        # (since -1 asks for whatever is retained: nothing is lost to it)
                        if first and sub.after >= 0 and log.lost(sub.after, offset):
                            conn.send(offset_expired(channel.name, sub.after, offset))
                        first = False
                        if topic is not None and channel.matcher.matches(topic):
                            if not await _room_within(conn, HOLD_ROOM):
                                return False  # read again from sub.after, with room
                            conn.send(channel.frame(topic, offset, data))
                        sub.after = offset
                        position = log.position
                        if position is not None and offset >= position - 1:
                            sub.live = True
                            return True
            except BrokerUnavailable as exc:
                logger.info("topic catch-up from offset %d: %s; trying again", sub.after, exc)
                await asyncio.sleep(RETRY_DELAY)


async def _room_within(conn: Connection, seconds: float) -> bool:
    """Whether the connection's queue has room, or gets it within `seconds`."""
    if conn.has_room():
        return True
    try:
        async with asyncio.timeout(seconds):
            await conn.room()
    except TimeoutError:
        return False
    return True


def offset_expired(channel: str, since: int, first: int) -> bytes:
    code: ErrorCode = "offset_expired"
    return compactjson.dumps(
        {
            "type": "error",
            "code": code,
            "message": f"the messages after offset {since} up to {first} are past the retention;"
            f" going on from {first}",
            "first": first,
            "channel": channel,
        }
    )
