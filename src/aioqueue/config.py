"""Typed settings for the service, loaded once at start-up by `load()` and validated.

Each key is looked up in four places, and a later one wins:

1. the defaults written in the dataclasses below;
2. `config.toml`: the file passed as `config_path`, else the one named by `AIOQUEUE_CONFIG`,
   else `./config.toml` if the current directory has one. Keys sit in their section
   (`[http]` / `port = 8080`), except `app`, which is top-level;
3. environment variables `AIOQUEUE_<SECTION>__<KEY>` (`AIOQUEUE_HTTP__PORT=8080`; `AIOQUEUE_APP`
   for `app`), parsed from text;
4. `overrides`: dotted keys (`"http.port"`) with values from command-line flags.

Each value is checked where it is read. An unknown key or section, an unknown `AIOQUEUE_*`
variable, a value of the wrong type or out of range all raise `ConfigError`, whose message is one
line naming the key, the value, where it came from and what was expected.
"""

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from aioqueue.errors import ConfigError
from aioqueue.scopes import scope_problem

_PREFIX = "AIOQUEUE_"
_CONFIG_VAR = "AIOQUEUE_CONFIG"
#: The bearer token the CLI's client commands send; not a key of the service's config.
TOKEN_VAR = "AIOQUEUE_TOKEN"
_Ok = Callable[[Any], bool | str]  # True, or False (the value is not `expected`), or a message


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: type  # int, float, bool, str or tuple (of str): what the value must be once parsed
    expected: str  # what a good value looks like
    ok: _Ok
    optional: bool = False  # "" means unset (None)
    secret: bool = False  # never shown in an error message


def _key(
    default: Any,
    kind: type,
    expected: str,
    ok: _Ok = bool,
    optional: bool = False,
    secret: bool = False,
) -> Any:
    """A dataclass field with its rule; `ok=bool` accepts any non-empty string."""
    rule = _Rule(kind, expected, ok, optional, secret)
    return field(default=default, repr=not secret, metadata={"rule": rule})


def _int(default: int, lo: int, hi: int | None = None) -> Any:
    if hi is None:
        return _key(default, int, f"expected an integer >= {lo}", lambda v: v >= lo)
    return _key(default, int, f"expected an integer from {lo} to {hi}", lambda v: lo <= v <= hi)


def _float(default: float, lo: float, above: bool = False) -> Any:
    if above:
        return _key(default, float, f"expected a number > {lo:g}", lambda v: v > lo)
    return _key(default, float, f"expected a number >= {lo:g}", lambda v: v >= lo)


def _pattern(default: str | None, pattern: str, expected: str, *, optional: bool = False) -> Any:
    return _key(default, str, expected, lambda v: bool(re.fullmatch(pattern, v)), optional)


def _choice(default: str, *choices: str) -> Any:
    named = [repr(choice) for choice in choices]
    expected = f"expected {', '.join(named[:-1])} or {named[-1]}"
    return _key(default, str, expected, lambda v: v in choices)


def _bool(default: bool) -> Any:
    return _key(default, bool, "expected true or false", lambda _: True)


def _broker_url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    if parts.scheme == "memory":
        return url == "memory://"
    return parts.scheme in ("amqp", "amqps") and bool(parts.hostname)


def _origins_ok(origins: tuple[object, ...]) -> bool | str:
    for origin in origins:
        if origin != "*" and not (isinstance(origin, str) and normal_origin(origin)):
            return f"{str(origin)[:60]!r} is not an origin like https://example.com[:port]"
    return True


def normal_origin(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case, or None if `origin` is not one (RFC 6454)."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def _hosts_ok(hosts: tuple[object, ...]) -> bool | str:
    for host in hosts:
        if not (isinstance(host, str) and re.fullmatch(r"\*|\.?[A-Za-z0-9_.:\[\]-]+", host)):
            return f"{str(host)[:60]!r} is not a host name, a .suffix or '*'"
    return True


#: A token in `auth.tokens` is at least this long: a short one can be guessed.
MIN_TOKEN_LENGTH = 16
_TOKEN_FIELDS = {"token", "principal", "scopes"}


def _tokens_ok(tokens: tuple[object, ...]) -> bool | str:
    # Messages name the entry by its index and principal, never by its token.
    seen: set[str] = set()
    for index, entry in enumerate(tokens):
        where = f"entry {index}"
        if not isinstance(entry, dict) or set(entry) != _TOKEN_FIELDS:
            return f"{where}: expected a table with exactly token, principal and scopes"
        token, principal, scopes = entry["token"], entry["principal"], entry["scopes"]
        if not isinstance(principal, str) or not principal_ok(principal):
            return f"{where}: principal must be 1 to 200 printable characters"
        where = f"entry {index} (principal {principal!r})"
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH or not token.isprintable():
            return f"{where}: token must be at least {MIN_TOKEN_LENGTH} printable characters"
        if token in seen:
            return f"{where}: the same token is given twice"
        seen.add(token)
        if not isinstance(scopes, list):
            return f"{where}: scopes must be a list of scopes"
        for scope in scopes:
            if (problem := scope_problem(scope)) is not None:
                return f"{where}: {problem}"
    return True


def principal_ok(name: str) -> bool:
    """A principal's name: 1 to 200 printable characters (it is kept with each of its jobs)."""
    return 1 <= len(name) <= 200 and name.isprintable()


JWT_ALGORITHMS = frozenset(
    f"{family}{bits}" for family in ("HS", "RS", "PS", "ES") for bits in (256, 384, 512)
) | {"EdDSA"}


def _algorithms_ok(algorithms: tuple[object, ...]) -> bool | str:
    if not algorithms:
        return "expected at least one algorithm"
    for algorithm in algorithms:
        if algorithm not in JWT_ALGORITHMS:
            return f"{str(algorithm)[:20]!r} is not one of {', '.join(sorted(JWT_ALGORITHMS))}"
    if len({str(a).startswith("HS") for a in algorithms}) > 1:
        # One key cannot be both a shared secret and a public key: mixing them is how an
        # HS256 token signed with the public key passes as an RS256 one.
        return "HS* (a shared secret) and public-key algorithms cannot be mixed"
    return True


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str = _key("127.0.0.1", str, "expected a non-empty host name", bool)
    port: int = _int(8080, 0, 65535)  # 0: any free port
    max_body_bytes: int = _int(1048576, 1024)
    body_timeout: float = _float(10.0, 0, above=True)  # seconds to receive a whole request body
    # Origins whose pages may call the HTTP API (CORS); "*": any. Default: none.
    cors_origins: tuple[str, ...] = _key(
        (), tuple, 'expected a list of origins like ["https://example.com"], or ["*"]', _origins_ok
    )
    # Host headers answered: names, ".example.com" for it and its subdomains, or "*". Default:
    # loopback names only when `host` is a loopback address (against DNS rebinding), else any.
    allowed_hosts: tuple[str, ...] = _key(
        (), tuple, 'expected a list of host names like ["api.example.com"], or ["*"]', _hosts_ok
    )
    # The next three are `aioqueue serve`'s (web/guard.py, cli.py); under `App.mount` the
    # application's own server decides. Seconds to receive a request's headers, from the connect
    # or, on a kept-alive connection, from the request's first byte; then it is closed.
    header_timeout: float = _float(5.0, 0, above=True)
    # Seconds a kept-alive connection may wait after a response for the next request's headers.
    keepalive_timeout: float = _float(15.0, 0, above=True)
    # Open TCP connections at once, websockets included; more are closed at once on accept.
    max_connections: int = _int(4096, 1)
    # A page of GET /v1/jobs stops before its body would pass this (it has one job at least):
    # `limit=1000` of large jobs was a body of hundreds of MiB, built in memory at once.
    max_list_bytes: int = _int(4 * 2**20, 1024)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    url: str = _key(
        "memory://",
        str,
        "expected 'memory://' or an amqp:// or amqps:// URL with a host",
        _broker_url_ok,
    )
    prefetch: int = _int(32, 1, 65535)  # concurrent jobs per queue per process
    confirm_timeout: float = _float(1.0, 0, above=True)  # a submit's wait for a confirm, then 503
    delivery_limit: int = _int(5, 1, 1000)  # x-delivery-limit of the job queues
    prefix: str = _pattern("aioqueue", r"[A-Za-z0-9_-]{1,64}", "expected 1-64 of A-Za-z0-9_-")
    heartbeat: int = _int(10, 1, 600)  # seconds; also the longest wait for an internal confirm
    max_queue_length: int = _int(0, 0)  # ready jobs per queue before submits get 429; 0: no limit
    consumer_timeout: float = _float(1800.0, 0, above=True)  # the broker's, in seconds


@dataclass(frozen=True, slots=True)
class JobsSettings:
    max_attempts: int = _int(3, 1, 1000)
    timeout: float = _float(300.0, 0, above=True)
    retry_backoff: float = _float(1.0, 0)
    retry_backoff_max: float = _float(300.0, 0)  # and >= retry_backoff, checked by load()
    result_ttl: int = _int(86400, 1)  # seconds
    shutdown_grace: float = _float(30.0, 0)
    max_args_bytes: int = _int(262144, 64)  # a job's args as JSON; larger: 413 / `too_large`
    max_error_bytes: int = _int(16384, 256)  # an error's message, and its traceback, cut to this
    # A task's result as JSON; larger: the job fails at once with ResultTooLarge (not retried).
    max_result_bytes: int = _int(2**20, 64)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    # Where a process on RabbitMQ keeps its job store (SQLite), to restart from it in seconds.
    dir: str = _key(".aioqueue", str, "expected a directory path", bool)
    checkpoint_interval: float = _float(300.0, 0, above=True)  # seconds between checkpoints
    log_max_bytes: int = _int(2 * 2**30, 2**20)  # the event log's retention on RabbitMQ, bytes
    # Job state kept (each job's record as JSON, summed): past it, finished jobs are forgotten
    # before their result_ttl, the earliest finished first; if unfinished ones fill it alone,
    # submits get 429. RAM on memory://, disk per process (and in checkpoints) on RabbitMQ.
    max_bytes: int = _int(2**30, 2**16)


#: RabbitMQ's longest TTL is 2^32 - 1 ms: a dead letter's age bound, in whole seconds.
MAX_DEAD_AGE = (2**32 - 1) // 1000


@dataclass(frozen=True, slots=True)
class DeadSettings:
    # The dead-letter queue (P.dlq; memory://'s list) keeps at most so many messages, the oldest
    # dropped first, and none older than max_age_seconds: it is never consumed, and unbounded it
    # would grow for ever. The job records of dead letters are kept by result_ttl, not by this.
    max_length: int = _int(10_000, 1, 2**31 - 1)
    max_age_seconds: int = _int(7 * 86400, 1, MAX_DEAD_AGE)


@dataclass(frozen=True, slots=True)
class WsSettings:
    max_subscriptions: int = _int(100, 1)
    send_buffer: int = _int(256, 1)
    max_frame_bytes: int = _int(1048576, 64)
    heartbeat: float = _float(30.0, 0, above=True)  # seconds between pings; no pong in half: closed
    # Origins a browser may open the websocket from, besides its own and localhost; "*": any.
    allowed_origins: tuple[str, ...] = _key(
        (), tuple, 'expected a list of origins like ["https://example.com"], or ["*"]', _origins_ok
    )
    max_publishes_per_second: int = _int(100, 1)  # topic publishes per connection; bursts of this
    auth_timeout: float = _float(5.0, 0, above=True)  # seconds to send `auth` (also after expiry)


@dataclass(frozen=True, slots=True)
class TopicsSettings:
    retention_seconds: int = _int(604800, 1)  # how long topic messages stay for `since` catch-up
    retention_bytes: int = _int(2**30, 2**16)  # and how many bytes of them, at most
    max_message_bytes: int = _int(65536, 16)  # one published message, as JSON
    max_catch_ups: int = _int(32, 1)  # `since` replays at once per process; more wait their turn


def _optional(expected: str, *, secret: bool = False) -> Any:
    return _key(None, str, expected, bool, optional=True, secret=secret)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    mode: str = _choice("none", "none", "token", "jwt")
    # [{token, principal, scopes}, ...] for mode "token"
    tokens: tuple[dict[str, Any], ...] = _key(
        (), tuple, "expected a list of {token, principal, scopes} tables", _tokens_ok, secret=True
    )
    jwt_algorithms: tuple[str, ...] = _key(
        ("HS256",), tuple, 'expected a list like ["HS256"] or ["RS256"]', _algorithms_ok
    )
    jwt_secret: str | None = _optional("expected the HS* shared secret", secret=True)
    jwt_public_key: str | None = _optional("expected a PEM public key, or a path to one")
    jwt_jwks_file: str | None = _optional("expected the path of a JWKS (JSON) file")
    jwt_audience: str | None = _optional("expected the `aud` tokens must name")  # checked if set
    jwt_issuer: str | None = _optional("expected the `iss` tokens must have")  # checked if set
    jwt_scopes_claim: str = _key("scope", str, "expected a claim name", bool)
    jwt_leeway: float = _float(30.0, 0)  # seconds of clock skew allowed on exp and nbf
    # Per principal and process, with auth on: what one client may take from the others.
    max_submits_per_second: int = _int(50, 1)  # submits and retries, in bursts of as many
    max_websockets: int = _int(20, 1)  # open websockets
    max_subscriptions: int = _int(1000, 1)  # job and topic channels over all its websockets


@dataclass(frozen=True, slots=True)
class LogSettings:
    # `aioqueue serve`'s log lines: "text" for people, "json" (one object a line, with the
    # job's id, task, attempt and queue on every line about a job) for a log pipeline.
    format: str = _choice("text", "text", "json")


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    # GET /metrics needs a principal with jobs:admin (401/403 as the API); else open to all.
    require_admin: bool = _bool(False)


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    enabled: bool = _bool(True)
    # Where the page is served: an absolute path of letters, digits and `-_.`, not under /v1/.
    path: str = _pattern(
        "/dashboard",
        r"(?!/v1(?:/|$))(/[A-Za-z0-9_.-]+)+",
        "expected a path like '/dashboard', not under /v1/",
    )


@dataclass(frozen=True, slots=True)
class Settings:
    app: str | None = _pattern(None, r"[\w.]+:[\w.]+", "expected 'module:attribute'", optional=True)
    http: HttpSettings = field(default_factory=HttpSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    dead: DeadSettings = field(default_factory=DeadSettings)
    ws: WsSettings = field(default_factory=WsSettings)
    topics: TopicsSettings = field(default_factory=TopicsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    source: str | None = None  # the config.toml that was read; not a key


_SECTIONS: dict[str, type[Any]] = {
    f.name: f.type for f in fields(Settings) if isinstance(f.type, type) and is_dataclass(f.type)
}
_KEYS: dict[str, Field[Any]] = {f.name: f for f in fields(Settings) if "rule" in f.metadata}
_KEYS |= {f"{s}.{f.name}": f for s, cls in _SECTIONS.items() for f in fields(cls)}


def env_name(key: str) -> str:
    """The environment variable of a dotted key: `http.port` -> `AIOQUEUE_HTTP__PORT`."""
    return _PREFIX + key.upper().replace(".", "__")


_BY_ENV = {env_name(key): key for key in _KEYS}


def describe() -> list[tuple[str, str, object]]:
    """(dotted key, environment variable, default) of every key, in declaration order."""
    # A list's default as a list: the form a config.toml and (as JSON) the environment take.
    return [
        (key, env_name(key), list(f.default) if isinstance(f.default, tuple) else f.default)
        for key, f in _KEYS.items()
    ]


def _error(message: str) -> ConfigError:
    return ConfigError(message.replace("\r", "\\r").replace("\n", "\\n"))


def _show(value: object, secret: bool = False) -> str:
    if secret:
        return "<hidden>"
    if isinstance(value, str):  # hide the password of a URL
        value = re.sub(r"^([A-Za-z][\w+.-]*://[^:/@]*:)[^/@]*@", r"\1***@", value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(key: str, value: object, where: str, expected: str) -> ConfigError:
    rule: _Rule | None = _KEYS[key].metadata.get("rule") if key in _KEYS else None
    shown = _show(value, secret=rule is not None and rule.secret)
    return _error(f"{key} = {shown} (from {where}): {expected}")


def _hint(word: str, candidates: Iterable[str], quote: str = "'") -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {quote}{match[0]}{quote}?" if match else ""


def _parse(text: str, kind: type) -> object:
    """Env/flag text as `kind`; None when it does not parse (the type check then fails). A list
    is written as JSON (`AIOQUEUE_WS__ALLOWED_ORIGINS='["https://example.com"]'`)."""
    if kind is tuple:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        return tuple(value) if isinstance(value, list) else None
    if kind is int:
        return int(text) if re.fullmatch(r"[+-]?[0-9]+", text.strip()) else None
    if kind is bool:  # TOML's words; any case, as environments often capitalise them
        return {"true": True, "false": False}.get(text.strip().lower())
    try:
        return float(text)
    except ValueError:
        return None


def _convert(key: str, raw: object, where: str, text: bool) -> Any:
    rule: _Rule = _KEYS[key].metadata["rule"]
    value = raw
    if text and isinstance(raw, str) and rule.kind is not str:
        value = _parse(raw, rule.kind)
    if rule.kind is float and type(value) is int:
        value = float(value)
    if rule.kind is tuple and type(value) is list:  # from TOML
        value = tuple(value)
    if rule.optional and value == "":
        return None
    if type(value) is not rule.kind or (isinstance(value, float) and not math.isfinite(value)):
        raise _bad(key, raw, where, rule.expected)
    verdict = rule.ok(value)
    if verdict is not True:
        raise _bad(key, raw, where, verdict or rule.expected)
    return value


def _find_config(config_path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> str | None:
    if config_path is not None:
        path, named_by = os.fspath(config_path), "config_path"
    elif env.get(_CONFIG_VAR):
        path, named_by = env[_CONFIG_VAR], _CONFIG_VAR
    else:
        return os.path.abspath("config.toml") if os.path.exists("config.toml") else None
    if not os.path.isfile(path):
        raise _error(f"config file {path!r} (from {named_by}) does not exist or is not a file")
    return os.path.abspath(path)


Source = Iterator[tuple[str, object, str, bool]]  # (key, raw value, where from, value is text)


def _from_toml(path: str) -> Source:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise _error(f"invalid TOML in {path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(f"cannot read config file {path}: {exc}") from None
    for name, item in data.items():
        if name in _SECTIONS:
            if not isinstance(item, dict):
                raise _bad(name, item, path, f"expected a table [{name}]")
            entries = [(f"{name}.{key}", value) for key, value in item.items()]
        elif name not in _KEYS and isinstance(item, dict):
            raise _error(f"unknown section {name!r} in {path}{_hint(name, _SECTIONS)}")
        else:
            entries = [(name, item)]
        for key, value in entries:
            if key not in _KEYS:
                raise _error(f"unknown key {key!r} in {path}{_hint(key, _KEYS)}")
            yield key, value, path, False


def _from_env(env: Mapping[str, str]) -> Source:
    for name in sorted(env):
        if not name.startswith(_PREFIX) or name in (_CONFIG_VAR, TOKEN_VAR):
            continue
        if name not in _BY_ENV:
            hint = _hint(name, [*_BY_ENV, _CONFIG_VAR, TOKEN_VAR], quote="")
            raise _error(f"unknown environment variable {name}{hint}")
        yield _BY_ENV[name], env[name], name, True


def _from_overrides(overrides: Mapping[str, object]) -> Source:
    for key, value in overrides.items():
        if value is None:  # a flag that was not given
            continue
        if key not in _KEYS:
            raise _error(f"unknown key {key!r} in overrides{_hint(key, _KEYS)}")
        yield key, value, "overrides", True


def load(
    config_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """The settings from defaults < config.toml < environment < overrides, checked."""
    env = os.environ if environ is None else environ
    path = _find_config(config_path, env)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    toml = _from_toml(path) if path else iter(())
    for source in (toml, _from_env(env), _from_overrides(overrides or {})):
        for key, raw, where, text in source:
            values[key], origin[key] = _convert(key, raw, where, text), where
    grouped: dict[str, dict[str, Any]] = {name: {} for name in ["", *_SECTIONS]}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        grouped[section][name] = value
    sections = {name: cls(**grouped[name]) for name, cls in _SECTIONS.items()}
    settings = Settings(**grouped[""], **sections, source=path)
    jobs = settings.jobs
    if jobs.retry_backoff_max < jobs.retry_backoff:
        key, low = "jobs.retry_backoff_max", origin.get("jobs.retry_backoff", "defaults")
        expected = f"expected a number >= jobs.retry_backoff ({jobs.retry_backoff:g}, from {low})"
        raise _bad(key, jobs.retry_backoff_max, origin.get(key, "defaults"), expected)
    _check_auth(settings.auth, origin)
    return settings


#: The shortest HS* secret: RFC 7518 §3.2 asks for a key at least as long as the hash.
MIN_SECRET_BYTES = 32


def _check_auth(auth: AuthSettings, origin: Mapping[str, str]) -> None:
    """What one key alone cannot say: the keys each mode needs."""

    def missing(key: str, why: str) -> ConfigError:
        return _error(f"{key} is not set (auth.mode = {auth.mode!r}): {why}")

    if auth.mode == "token" and not auth.tokens:
        raise missing("auth.tokens", "mode 'token' needs at least one token")
    if auth.mode != "jwt":
        return
    if auth.jwt_algorithms[0].startswith("HS"):
        if auth.jwt_secret is None:
            raise missing("auth.jwt_secret", f"{auth.jwt_algorithms[0]} needs the shared secret")
        if len(auth.jwt_secret.encode()) < MIN_SECRET_BYTES:
            where = origin.get("auth.jwt_secret", "defaults")
            expected = f"expected a secret of at least {MIN_SECRET_BYTES} bytes"
            raise _bad("auth.jwt_secret", auth.jwt_secret, where, expected)
    elif (auth.jwt_public_key is None) == (auth.jwt_jwks_file is None):
        raise missing(
            "auth.jwt_public_key or auth.jwt_jwks_file",
            f"{auth.jwt_algorithms[0]} needs exactly one of them",
        )
