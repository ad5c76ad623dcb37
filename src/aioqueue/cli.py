"""The `aioqueue` command: serve, submit, jobs, job, cancel, retry, queues, dead, purge, check.

Exit codes: 0 success, 1 the job or the check failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from aioqueue import client, logs
from aioqueue.config import TOKEN_VAR, Settings, describe, load
from aioqueue.errors import AioqueueError, ConfigError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aioqueue",
        description="Background jobs over HTTP and websockets, on RabbitMQ.",
        epilog="Configuration: config.toml and AIOQUEUE_* variables; see `aioqueue serve --help`."
        f" The client commands send ${TOKEN_VAR}, if set, as their bearer token.",
    )
    parser.add_argument(
        "--config", help="path of config.toml (default: $AIOQUEUE_CONFIG, ./config.toml)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = "\n".join(f"  {key:<26} {env:<34} {default!r}" for key, env, default in describe())
    serve = commands.add_parser(
        "serve",
        help="run the service (HTTP API, websockets, consumers)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Settings (config.toml key, environment variable, default):\n{keys}",
    )
    serve.add_argument(
        "app", nargs="?", help="the App to serve, as module:attribute (default: `app` in config)"
    )
    serve.add_argument("--host", help="address to listen on (http.host)")
    serve.add_argument("--port", type=int, help="port to listen on, 0 for any free one (http.port)")
    serve.add_argument(
        "--broker", metavar="URL", help="memory:// or amqp://user:pass@host:5672/vhost (broker.url)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    submit = commands.add_parser("submit", help="submit a job over HTTP; --wait shows its progress")
    submit.add_argument("task", help="the task's name")
    submit.add_argument(
        "--args", default="null", help='arguments as JSON: an object {"x": 1} or an array [1, 2]'
    )
    submit.add_argument("--max-attempts", type=int)
    submit.add_argument("--priority", type=int, help="0 (the default) to 9 (runs first)")
    submit.add_argument("--ttl", type=float, help="seconds it may wait to start, then dead")
    submit.add_argument("--timeout", type=float, help="seconds the task may run")
    submit.add_argument(
        "--wait", action="store_true", help="follow the job to its end and print its result"
    )

    jobs = commands.add_parser("jobs", help="list recent jobs as a table")
    jobs.add_argument("--status", help="one or several statuses, comma-separated")
    jobs.add_argument("--task", help="only jobs of this task")
    jobs.add_argument("--limit", type=int, default=20)

    job = commands.add_parser("job", help="show one job")
    job.add_argument("id")
    cancel = commands.add_parser("cancel", help="cancel a job that has not finished")
    cancel.add_argument("id")
    retry = commands.add_parser(
        "retry",
        help="run a failed, dead or cancelled job again; with --all, every dead letter that"
        " matches",
    )
    retry.add_argument("id", nargs="?", help="the job (or --all)")
    retry.add_argument(
        "--all", action="store_true", help="every failed and dead job (that the filters match)"
    )
    purge = commands.add_parser(
        "purge",
        help="forget the dead letters that match, and take them out of the dead-letter queue",
    )
    purge.add_argument("--all", action="store_true", help="every failed and dead job")
    for sub in (retry, purge):
        _dead_filters(sub)
        sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    queues = commands.add_parser(
        "queues", help="each queue: depth per band, consumers, rates, oldest job, dead letters"
    )
    dead = commands.add_parser("dead", help="list dead letters (failed and dead jobs) as a table")
    _dead_filters(dead)
    dead.add_argument("--limit", type=int, default=20)

    commands.add_parser("check", help="validate the config, reach the broker, declare the topology")
    for sub in (submit, jobs, job, cancel, retry, purge, queues, dead):
        sub.add_argument(
            "--url", help="the service's base URL (default: from http.host and http.port)"
        )
    return parser


def _dead_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help="only dead letters of this task")
    parser.add_argument("--error-type", help="only those whose error has this type")
    parser.add_argument(
        "--before", metavar="TIME", help="only those that finished before TIME (RFC 3339)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("retry", "purge"):
        _check_dead_usage(parser, args)
    try:
        settings = load(args.config, overrides=_overrides(args))
        if args.command == "serve":
            logs.configure(args.log_level, settings.log.format)
            return _run(_serve(settings))
        if args.command == "check":
            logs.configure("error")
            return asyncio.run(_check(settings))
        return asyncio.run(_client_command(args, settings))
    except ConfigError as exc:
        print(f"aioqueue: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run the service on uvloop where it is installed (a dependency on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    if args.command != "serve":
        return {}
    return {
        "app": args.app,
        "http.host": args.host,
        "http.port": args.port,
        "broker.url": args.broker,
    }


def load_app(spec: str | None) -> Any:
    """Import `module:attribute`; the current directory is importable, as with `python -m`."""
    from aioqueue.app import App

    if not spec:
        raise ConfigError(
            "no app to serve: pass module:attribute, or set `app` in config.toml or AIOQUEUE_APP"
        )
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"app = {spec!r}: cannot import it: {exc}") from None
    if not isinstance(target, App):
        raise ConfigError(f"app = {spec!r}: expected an aioqueue.App, got {type(target).__name__}")
    return target


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _connection_cap(settings: Settings) -> int:
    """Raise the open-files limit, and say it; `http.max_connections`, lowered to fit it."""
    from aioqueue import fdlimit

    limit = fdlimit.raise_fd_limit()
    if limit is None:
        return settings.http.max_connections
    if limit.error is not None:
        logger.warning(
            "open files limit: %d; could not raise it to %d: %s",
            limit.soft,
            limit.hard,
            limit.error,
        )
    elif limit.before != limit.soft:
        logger.info("open files limit: %d (raised from %d)", limit.soft, limit.before)
    else:
        logger.info("open files limit: %d (the hard limit)", limit.soft)
    cap = fdlimit.connection_cap(settings.http.max_connections, limit)
    if cap < settings.http.max_connections:
        # Lowered, not only said: past the limit the broker's reconnects and the job store
        # would fail too, not just the connections over it.
        logger.warning(
            "http.max_connections = %d is more than the open files limit (%d) allows: at most"
            " %d connections at once; raise the limit (ulimit -n, LimitNOFILE=) to have more",
            settings.http.max_connections,
            limit.soft,
            cap,
        )
    return cap


async def _serve(settings: Settings) -> int:
    from aiohttp import web

    from aioqueue.service import check_timeouts
    from aioqueue.web.app import create_app, shutdown
    from aioqueue.web.browsers import is_loopback
    from aioqueue.web.guard import ConnectionGuard
    from aioqueue.web.state import STATE

    app = load_app(settings.app)
    check_timeouts(app, settings)  # before listening: a one-line start-up error
    max_connections = _connection_cap(settings)
    web_app = create_app(app, settings)
    # Long polls still open once the jobs are drained are cut after a second. The keep-alive
    # timeout reaches each connection's RequestHandler through the runner's keyword arguments.
    runner = web.AppRunner(
        web_app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=settings.http.keepalive_timeout,
    )
    # Before listening: a SIGTERM as soon as the port answers must stop it cleanly, not kill it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    assert runner.server is not None
    # Not web.TCPSite, which listens with aiohttp's protocol factory itself: the guard wraps
    # it with the header timeout and the connection cap (as TCPSite does, backlog 128).
    guard = ConnectionGuard(
        runner.server,
        header_timeout=settings.http.header_timeout,
        max_connections=max_connections,
    )
    listener = await asyncio.get_running_loop().create_server(
        guard, settings.http.host, settings.http.port, backlog=128
    )
    host, port = listener.sockets[0].getsockname()[:2]
    # The warnings before the line that says it serves (what a supervisor, or a test, waits
    # for), so that whoever reads up to that line has read them.
    if settings.auth.mode == "none" and not is_loopback(settings.http.host):
        print(
            f"WARNING: auth is off ([auth] mode = 'none') and {settings.http.host} is not a"
            " loopback address: anyone who reaches the port can submit, read and cancel every"
            " job. Set [auth] mode = 'token' or 'jwt'.",
            flush=True,
        )
    if settings.broker.url.startswith("memory:"):
        print(
            "WARNING: memory:// is the embedded broker: one process, and NOTHING survives a"
            " restart. Use amqp:// (RabbitMQ) for anything real.",
            flush=True,
        )
    print(
        f"aioqueue serving {settings.app} on http://{host}:{port}\n"
        f"  broker: {redact(settings.broker.url)}; tasks: {', '.join(sorted(app.tasks))}",
        flush=True,
    )
    await stop.wait()
    # A supervisor may send SIGTERM again while we drain: the shutdown is under way, so ignore it
    # (the event loop would otherwise restore the default action on its way out, and die by it).
    loop.remove_signal_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logger.info("stopping: no new jobs; running jobs get %.0f s", settings.jobs.shutdown_grace)
    await shutdown(web_app)  # HTTP still answers meanwhile: 503 to submits and /readyz
    listener.close()  # no new connections (what TCPSite.stop does); the cleanup closes the rest
    await runner.cleanup()
    if web_app[STATE].threads_left:
        # A sync task's thread cannot be stopped, and would hold the interpreter's exit; its
        # job was requeued, so leave without it.
        logger.warning("leaving sync tasks' threads behind; their jobs were requeued")
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


async def _check(settings: Settings) -> int:
    from aioqueue.service import Service

    app = load_app(settings.app)
    service = Service(app, settings)
    try:
        async with asyncio.timeout(settings.broker.heartbeat * 3):
            await service.start()
    except (AioqueueError, TimeoutError) as exc:
        reason = str(exc) or service.problem() or "no answer in time"
        print(f"aioqueue check: FAILED: {reason}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        with contextlib.suppress(Exception):
            await service.close()
    print(f"aioqueue check: ok: config valid, broker {redact(settings.broker.url)} reached,")
    print(f"  topology declared for queues {', '.join(sorted(app.queues))};")
    print(f"  {len(service.store)} jobs in the store; tasks: {', '.join(sorted(app.tasks))}")
    return EXIT_OK


def _check_dead_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`retry ID` or `retry --all [filters]`; `purge` with filters or --all (exit 2 if not)."""
    filtered = any(f is not None for f in (args.task, args.error_type, args.before))
    if args.command == "retry" and args.id is not None:
        if args.all or filtered or args.yes:
            parser.error("retry: give a job's id, or --all with filters, not both")
    elif args.command == "retry" and not args.all:
        parser.error("retry: give a job's id, or --all (with --task, --error-type, --before)")
    elif args.command == "purge" and not (args.all or filtered):
        parser.error("purge: give --task, --error-type or --before, or --all for every one")


async def _client_command(args: argparse.Namespace, settings: Settings) -> int:
    base = args.url or client.default_url(settings)
    async with client.Client(base, os.environ.get(TOKEN_VAR)) as api:
        try:
            if args.command == "submit":
                return await _submit(api, args)
            if args.command == "jobs":
                page = await api.list_jobs(
                    status=_statuses(args.status), task=args.task, limit=args.limit
                )
                print(client.jobs_table(page["jobs"]))
                return EXIT_OK
            if args.command == "queues":
                print(client.queues_table(await api.queues()))
                return EXIT_OK
            if args.command == "dead":
                page = await api.list_jobs(
                    "failed,dead",
                    args.task,
                    args.limit,
                    error_type=args.error_type,
                    finished_before=args.before,
                )
                print(client.dead_table(page["jobs"]))
                return EXIT_OK
            if args.command == "purge" or (args.command == "retry" and args.id is None):
                return await _dead_letters(api, args)
            calls = {"job": api.get_job, "cancel": api.cancel, "retry": api.retry}
            record = await calls[args.command](args.id)
            print(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
            return EXIT_OK
        except client.ApiError as exc:
            print(f"aioqueue: {exc}", file=sys.stderr)
            return EXIT_USAGE if exc.status in (400, 404, 409, 413, 415) else EXIT_FAILED


async def _submit(api: client.Client, args: argparse.Namespace) -> int:
    try:
        job_args = orjson.loads(args.args)
    except orjson.JSONDecodeError as exc:
        print(f"aioqueue: --args is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    body: dict[str, Any] = {"task": args.task, "args": job_args}
    if args.max_attempts is not None:
        body["max_attempts"] = args.max_attempts
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if args.priority is not None:
        body["priority"] = args.priority
    if args.ttl is not None:
        body["ttl"] = args.ttl
    if not args.wait:
        job = await api.submit(body)
        print(job["id"])
        return EXIT_OK
    job = await api.submit_and_follow(body, client.ProgressBar(sys.stderr))
    print(
        orjson.dumps(
            job["result"] if job["status"] == "succeeded" else job, option=orjson.OPT_INDENT_2
        ).decode()
    )
    return EXIT_OK if job["status"] == "succeeded" else EXIT_FAILED


async def _dead_letters(api: client.Client, args: argparse.Namespace) -> int:
    """`retry --all` or `purge`: count what matches, ask (unless --yes), then do it."""
    found = {"task": args.task, "error_type": args.error_type, "before": args.before}
    body: dict[str, Any] = {key: value for key, value in found.items() if value is not None}
    if not body:
        body["all"] = True
    action = args.command
    matching = (await api.dead(action, {**body, "dry_run": True}))["count"]
    what = ", ".join(f"{key} {value}" for key, value in body.items() if key != "all")
    what = f"dead letters ({what})" if what else "dead letters (all)"
    if not matching:
        print(f"no {what} to {action}")
        return EXIT_OK
    if not args.yes and not await _confirm(f"{action} {matching} {what}? [y/N] "):
        print("aioqueue: nothing done", file=sys.stderr)
        return EXIT_FAILED
    done = await api.dead(action, body)
    if action == "purge":
        print(
            f"purged {done['count']} {what}; {done['removed']} messages taken out of the"
            " dead-letter queue"
        )
        return EXIT_OK
    print(f"retried {done['count']} {what}")
    if done["left"]:
        print(
            f"aioqueue: {done['left']} left, not retried: a full queue or job store, or the"
            " broker away, stopped it; try again later",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


async def _confirm(prompt: str) -> bool:
    """Whether the user answers yes; no input (end of file) is a no."""
    print(prompt, end="", file=sys.stderr, flush=True)
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


def _statuses(text: str | None) -> str | None:
    """`--status "failed, dead"` as the API takes it: names, comma-separated, no spaces."""
    return None if text is None else ",".join(name.strip() for name in text.split(","))
