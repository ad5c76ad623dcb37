"""The aiohttp application: routes, and the service's life tied to the application's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from aioqueue.config import Settings
from aioqueue.service import Service
from aioqueue.tasks import Registry
from aioqueue.web import handlers
from aioqueue.web.asyncapi import asyncapi_json
from aioqueue.web.browsers import HTTP, cors_middleware, host_middleware
from aioqueue.web.dashboard import add_dashboard
from aioqueue.web.metrics import HttpRequests, WebGauges, metrics
from aioqueue.web.openapi import openapi_json
from aioqueue.web.problems import problem_middleware
from aioqueue.web.state import STATE, ServiceBinding, State
from aioqueue.web.ws import websocket

logger = logging.getLogger(__name__)


def create_app(registry: Registry, settings: Settings) -> web.Application:
    """A standalone aiohttp application serving an App's tasks (what `aioqueue serve` runs)."""
    web_app = web.Application(
        client_max_size=settings.http.max_body_bytes,
        middlewares=[host_middleware, cors_middleware, problem_middleware],
    )
    web_app[HTTP] = settings.http
    install(web_app, registry, settings, standalone=True)
    web_app.on_response_prepare.append(_server_header)
    return web_app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # Not aiohttp's "Python/3.11 aiohttp/3.x": versions tell a prober what to try.
    response.headers["Server"] = "aioqueue"


def install(
    web_app: web.Application,
    registry: Registry,
    settings: Settings,
    bind: ServiceBinding | None = None,
    *,
    standalone: bool = False,
) -> None:
    """Add aioqueue's routes and lifecycle to an aiohttp application (`App.mount`); `bind` is
    told of the service once it is built, and of None once it is closed. `standalone`: the
    application is aioqueue's alone (`create_app`), so its every response is counted."""
    state = web_app[STATE] = State(registry=registry, settings=settings, bind=bind)
    before = set(web_app.router.resources())
    web_app.router.add_post("/v1/jobs", handlers.submit_job)
    web_app.router.add_get("/v1/jobs", handlers.list_jobs)
    web_app.router.add_get("/v1/jobs/{id}", handlers.get_job)
    web_app.router.add_delete("/v1/jobs/{id}", handlers.cancel_job)
    web_app.router.add_post("/v1/jobs/{id}/retry", handlers.retry_job)
    web_app.router.add_post("/v1/topics/{topic}", handlers.publish)
    web_app.router.add_get("/v1/tasks", handlers.list_tasks)
    web_app.router.add_get("/v1/queues", handlers.list_queues)
    web_app.router.add_post("/v1/dead/retry", handlers.retry_dead)
    web_app.router.add_post("/v1/dead/purge", handlers.purge_dead)
    web_app.router.add_get("/v1/schedules", handlers.list_schedules)
    web_app.router.add_get("/v1/ws", websocket)
    web_app.router.add_get("/healthz", handlers.healthz)
    web_app.router.add_get("/readyz", handlers.readyz)
    web_app.router.add_get("/openapi.json", openapi_json)
    web_app.router.add_get("/asyncapi.json", asyncapi_json)
    web_app.router.add_get("/metrics", metrics)
    if settings.dashboard.enabled:
        add_dashboard(web_app.router, settings.dashboard.path)
    web_app.cleanup_ctx.append(_lifecycle)
    web_app.on_shutdown.append(_close_websockets)
    # Last, so that every route added above is counted as aioqueue's own.
    requests = HttpRequests(state.metrics, standalone)
    requests.resources.update(set(web_app.router.resources()) - before)
    web_app.on_response_prepare.append(requests.on_response_prepare)
    state.metrics.registry.register(WebGauges(state))


async def _lifecycle(web_app: web.Application) -> AsyncIterator[None]:
    state = web_app[STATE]
    service = Service(state.registry, state.settings, state.metrics)
    service.jobs.on_change(state.hub.on_job_change)
    service.topics.log.listen(state.hub.topics.on_message)
    _bind(state, service)
    # Start in the background: the HTTP server answers at once (/readyz says 503 until the
    # broker is reached and the job store complete).
    starting = asyncio.create_task(service.start(), name="aioqueue-start")
    starting.add_done_callback(_report_start_failure)
    pushing = asyncio.create_task(
        state.hub.push_queues(lambda: state.queue_stats().report()), name="aioqueue-queues-push"
    )
    yield
    pushing.cancel()
    starting.cancel()
    with contextlib.suppress(BaseException):
        await pushing
    with contextlib.suppress(BaseException):
        await starting
    await service.close()
    state.threads_left = service.runner.busy_threads
    _bind(state, None)


def _bind(state: State, service: Service | None) -> None:
    state.service = service
    if state.bind is not None:
        state.bind(service)


async def shutdown(web_app: web.Application) -> int:
    """G4, before the HTTP server stops: /readyz and submits answer 503, websockets close with
    1001, running jobs get `jobs.shutdown_grace` seconds and the rest are requeued."""
    state = web_app[STATE]
    connections = list(state.connections)
    for conn in connections:
        conn.close(WSCloseCode.GOING_AWAY, "server shutting down")
    try:
        if state.service is None:
            return 0
        return await state.service.shutdown(state.settings.jobs.shutdown_grace)
    finally:
        # The close handshakes ran beside the grace; the HTTP server that comes down next must
        # outlive them, or it drops connections before their clients' close frames come back.
        await asyncio.gather(*(conn.wait_closed() for conn in connections))


async def _close_websockets(web_app: web.Application) -> None:
    # on_shutdown, for an application aioqueue is mounted in (`aioqueue serve` calls
    # `shutdown()` itself, earlier): aiohttp waits for open handlers before the cleanup above.
    await shutdown(web_app)


def _report_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("aioqueue could not start: %s", task.exception(), exc_info=task.exception())
