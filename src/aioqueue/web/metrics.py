"""`GET /metrics`, and what the web layer adds to the registry: HTTP requests by route template
and status, and websocket connections, subscriptions, frames and slow-client closes.

The text is prometheus-client's (`generate_latest`), in the Prometheus text format 0.0.4, from the
served application's own registry (`Metrics`), never the process's global one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aioqueue.errors import Forbidden
from aioqueue.metrics import Metrics
from aioqueue.web.problems import problems
from aioqueue.web.state import STATE

if TYPE_CHECKING:
    from prometheus_client import Metric

    from aioqueue.web.state import State

#: The Prometheus text format 0.0.4: spelled out, since prometheus-client's CONTENT_TYPE_LATEST
#: was this in 0.20 and names 1.0.0 in 0.26 (whose text is the same for names like aioqueue's).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The `route` label of a request no route of aioqueue's took (a 404, a 405), when aioqueue is
#: the whole application (`aioqueue serve`).
UNMATCHED = "unmatched"
#: Methods counted by name; any other word a client sends as a method is counted as `other`.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The types of family prometheus-client gives a `_created` sample (see `WithoutCreated`).
TIMESTAMPED = frozenset({"counter", "histogram", "summary"})


class HttpRequests:
    """Counts each response as it is sent (aiohttp's `on_response_prepare`), by the route's
    template (`/v1/jobs/{id}`), never the raw path, its method, and its status.

    A signal rather than a middleware: it sees every response, a middleware's own (the Host
    check's 400s), an aiohttp error page and a websocket handshake (101) alike, and it works
    under `App.mount` too, where the application's middlewares are its owner's. There only
    aioqueue's own routes are counted; the rest is the application's business.
    """

    def __init__(self, metrics: Metrics, standalone: bool) -> None:
        self.requests = Counter(
            "aioqueue_http_requests",
            "HTTP responses sent, by route template, method and status (websocket handshakes"
            " are 101s); requests that are not well-formed HTTP never reach the application",
            ["route", "method", "status"],
            registry=metrics.registry,
        )
        self._standalone = standalone
        #: aioqueue's own routes (`install`), by their resource.
        self.resources: set[web.AbstractResource] = set()
        # Children by label values: a bounded set (routes x methods x statuses), and a dict
        # lookup is cheaper than prometheus-client's own `labels()` on every response.
        self._children: dict[tuple[str, str, int], Counter] = {}

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        resource = request.match_info.route.resource
        if resource is not None and (self._standalone or resource in self.resources):
            route = resource.canonical  # every route of a standalone application is aioqueue's
        elif self._standalone:
            route = UNMATCHED
        else:
            return
        method = request.method if request.method in METHODS else "other"
        key = (route, method, response.status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(route, method, str(response.status))
        child.inc()


class WebGauges(Collector):
    """The websockets of a served application, read when scraped."""

    def __init__(self, state: State) -> None:
        self._state = state

    def describe(self) -> Iterator[Metric]:
        return self._families(read=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(read=True)

    def _families(self, read: bool) -> Iterator[Metric]:
        state = self._state
        tally = state.metrics.ws
        connections = GaugeMetricFamily(
            "aioqueue_ws_connections", "Websockets open on this process"
        )
        subscriptions = GaugeMetricFamily(
            "aioqueue_ws_subscriptions",
            "Channels subscribed to over this process's websockets, by kind: job (job:ID) or"
            " topic (topic:PATTERN)",
            labels=["kind"],
        )
        sent = CounterMetricFamily(
            "aioqueue_ws_frames_sent", "Websocket frames written to clients' sockets"
        )
        coalesced = CounterMetricFamily(
            "aioqueue_ws_frames_coalesced",
            "Progress frames replaced, while still queued for a slow client, by a newer one of"
            " the same job",
        )
        dropped = CounterMetricFamily(
            "aioqueue_ws_frames_dropped",
            "Frames never sent because their connection was closing (a client resubscribes and"
            " gets a snapshot)",
        )
        closes = CounterMetricFamily(
            "aioqueue_ws_slow_closes",
            "Clients closed with 1013 for being slow: their send buffer was full (send_buffer),"
            " or one frame waited 5 s for them to read (send_timeout)",
            labels=["reason"],
        )
        if read:
            hub = state.hub
            connections.add_metric([], len(state.connections))
            subscriptions.add_metric(["job"], sum(map(len, hub.channels.values())))
            topic_subs = sum(len(channel.subs) for channel in hub.topics.channels.values())
            subscriptions.add_metric(["topic"], topic_subs)
            sent.add_metric([], tally.sent)
            coalesced.add_metric([], tally.coalesced)
            dropped.add_metric([], tally.dropped)
            closes.add_metric(["send_buffer"], tally.closes_full)
            closes.add_metric(["send_timeout"], tally.closes_stalled)
        yield from (connections, subscriptions, sent, coalesced, dropped, closes)


@problems
async def metrics(request: web.Request) -> web.StreamResponse:
    """`GET /metrics`: open, unless `[metrics] require_admin` (then 401 without credentials,
    403 without `jobs:admin`)."""
    state = request.app[STATE]
    if state.settings.metrics.require_admin:
        who = state.caller(request)
        if not who.sees_everything:  # jobs:admin (or auth off, where anyone is everything)
            raise Forbidden("reading /metrics needs the scope jobs:admin ([metrics] require_admin)")
    if state.service is not None:
        await state.service.gauges.refresh()
    body = generate_latest(WithoutCreated(state.metrics.registry))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


class WithoutCreated(Collector):
    """A registry's families without their `_created` samples.

    prometheus-client adds one to every counter and histogram (and to each of their labelled
    children): when it was made. The text format 0.0.4 has no place for them, so each becomes a
    gauge family of its own (`aioqueue_jobs_submitted_created`), which doubles the series for
    nothing a query uses. Its switch for that (`disable_created_metrics()`) is for the whole
    process, and so for an application's own metrics too under `App.mount`: filtered here instead.
    """

    def __init__(self, registry: Collector) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            # Each collect() builds its families anew: changing them changes no state.
            if family.type in TIMESTAMPED:
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
