"""aioqueue.config: defaults < config.toml < environment < overrides, and one-line errors."""

import dataclasses
import re
import tomllib
from pathlib import Path

import orjson
import pytest

from aioqueue.config import Settings, describe, env_name, load
from aioqueue.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory, so no ./config.toml is picked up by accident."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, toml: str | None = None, **kwargs: object) -> str:
    """The message of the ConfigError that load() raises; asserts it is one line."""
    path = write(tmp_path, toml) if toml is not None else None
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


def test_defaults_without_file_or_env() -> None:
    settings = load(environ={})
    assert settings == Settings()
    assert settings.http.port == 8080 and settings.broker.url == "memory://"
    assert settings.jobs.retry_backoff_max == 300.0 and settings.auth.mode == "none"
    assert settings.app is None and settings.source is None


def test_toml_overrides_defaults_and_records_source(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'app = "pkg.tasks:app"\n[http]\nport = 9000\n[jobs]\ntimeout = 10\n'
        '[broker]\nurl = "amqp://guest:guest@rabbit:5672/"\n',
    )
    settings = load(path, environ={})
    assert settings.app == "pkg.tasks:app"
    assert settings.http.port == 9000 and settings.http.host == "127.0.0.1"
    assert settings.jobs.timeout == 10.0 and isinstance(settings.jobs.timeout, float)
    assert settings.broker.url == "amqp://guest:guest@rabbit:5672/"
    assert settings.source == str(path)


def test_env_overrides_toml_and_overrides_beat_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[http]\nport = 9000\nhost = '0.0.0.0'\n[jobs]\nretry_backoff = 2\n")
    env = {"AIOQUEUE_HTTP__PORT": "9100", "AIOQUEUE_JOBS__RETRY_BACKOFF": "2.5e0"}
    settings = load(path, environ=env)
    assert (settings.http.port, settings.http.host) == (9100, "0.0.0.0")
    assert settings.jobs.retry_backoff == 2.5
    settings = load(path, environ=env, overrides={"http.port": 9200, "http.host": None})
    assert (settings.http.port, settings.http.host) == (9200, "0.0.0.0")


def test_string_override_is_parsed_like_env() -> None:
    assert load(environ={}, overrides={"http.port": "0"}).http.port == 0


def test_empty_app_from_env_means_unset(tmp_path: Path) -> None:
    path = write(tmp_path, 'app = "pkg:app"\n')
    assert load(path, environ={"AIOQUEUE_APP": ""}).app is None


def test_aioqueue_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[ws]\nsend_buffer = 8\n")
    settings = load(environ={"AIOQUEUE_CONFIG": str(path)})
    assert settings.ws.send_buffer == 8 and settings.source == str(path)


def test_config_toml_in_cwd_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "[broker]\nprefetch = 4\n")
    monkeypatch.chdir(tmp_path)
    assert load(environ={}).broker.prefetch == 4


def test_explicit_config_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="AIOQUEUE_CONFIG"):
        load(environ={"AIOQUEUE_CONFIG": str(tmp_path / "nope.toml")})


def test_unknown_toml_key_suggests_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, "[http]\nprot = 1\n")
    message = error_of(tmp_path, path.read_text())
    assert message == f"unknown key 'http.prot' in {path}; did you mean 'http.port'?"


def test_unknown_toml_section_and_non_table_section(tmp_path: Path) -> None:
    assert "unknown section 'htpp'" in error_of(tmp_path, "[htpp]\nport = 1\n")
    assert "did you mean 'http'?" in error_of(tmp_path, "[htpp]\nport = 1\n")
    assert "expected a table [http]" in error_of(tmp_path, "http = 5\n")


def test_unknown_aioqueue_env_var_suggests_close_match(tmp_path: Path) -> None:
    message = error_of(tmp_path, environ={"AIOQUEUE_HTTP__PROT": "1", "OTHER": "x"})
    assert message == (
        "unknown environment variable AIOQUEUE_HTTP__PROT; did you mean AIOQUEUE_HTTP__PORT?"
    )


def test_unknown_override_key_is_an_error(tmp_path: Path) -> None:
    assert "unknown key 'htpp.port'" in error_of(tmp_path, overrides={"htpp.port": 1})


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        pytest.param("[http]\nport = 70000", "http.port = 70000", id="int-out-of-range"),
        pytest.param("[http]\nport = '80'", "http.port = '80'", id="string-as-int"),
        pytest.param("[http]\nport = 80.0", "http.port = 80.0", id="float-as-int"),
        pytest.param("[http]\nport = true", "http.port = True", id="bool-as-int"),
        pytest.param("[jobs]\ntimeout = true", "jobs.timeout = True", id="bool-as-float"),
        pytest.param("[http]\nheader_timeout = 0", "http.header_timeout = 0", id="no-header-time"),
        pytest.param("[http]\nkeepalive_timeout = -1", "http.keepalive_timeout = -1", id="no-idle"),
        pytest.param("[http]\nmax_connections = 0", "http.max_connections = 0", id="no-conns"),
        pytest.param("[jobs]\ntimeout = 0", "jobs.timeout = 0", id="float-not-positive"),
        pytest.param("[jobs]\ntimeout = inf", "jobs.timeout = inf", id="float-infinite"),
        pytest.param("[broker]\nprefetch = 0", "broker.prefetch = 0", id="below-minimum"),
        pytest.param("[broker]\nprefix = 'a b'", "broker.prefix = 'a b'", id="bad-prefix"),
        pytest.param("app = 'nocolon'", "app = 'nocolon'", id="bad-app"),
    ],
)
def test_bad_toml_value(tmp_path: Path, toml: str, expected: str) -> None:
    message = error_of(tmp_path, toml)
    assert message.startswith(f"{expected} (from {tmp_path / 'config.toml'}): expected ")


def test_bad_toml_value_message_format(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nprefetch = 0\n")
    assert error_of(tmp_path, path.read_text()) == (
        f"broker.prefetch = 0 (from {path}): expected an integer from 1 to 65535"
    )


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        pytest.param("AIOQUEUE_HTTP__PORT", "abc", "http.port", id="not-an-int"),
        pytest.param("AIOQUEUE_HTTP__PORT", "80.5", "http.port", id="float-as-int"),
        pytest.param("AIOQUEUE_HTTP__PORT", "-1", "http.port", id="int-below-range"),
        pytest.param("AIOQUEUE_JOBS__TIMEOUT", "soon", "jobs.timeout", id="not-a-float"),
        pytest.param("AIOQUEUE_JOBS__TIMEOUT", "nan", "jobs.timeout", id="float-nan"),
        pytest.param("AIOQUEUE_JOBS__RETRY_BACKOFF", "-1", "jobs.retry_backoff", id="negative"),
        pytest.param("AIOQUEUE_WS__MAX_FRAME_BYTES", "63", "ws.max_frame_bytes", id="too-small"),
    ],
)
def test_bad_env_value(tmp_path: Path, name: str, value: str, key: str) -> None:
    message = error_of(tmp_path, environ={name: value})
    assert message.startswith(f"{key} = {value!r} (from {name}): expected ")


def test_bad_env_value_message_format(tmp_path: Path) -> None:
    assert error_of(tmp_path, environ={"AIOQUEUE_HTTP__PORT": "abc"}) == (
        "http.port = 'abc' (from AIOQUEUE_HTTP__PORT): expected an integer from 0 to 65535"
    )


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis://localhost", id="wrong-scheme"),
        pytest.param("memory://x", id="memory-with-host"),
        pytest.param("amqp://", id="amqp-without-host"),
        pytest.param("amqp://host:notaport/", id="bad-port"),
    ],
)
def test_bad_broker_url(tmp_path: Path, url: str) -> None:
    message = error_of(tmp_path, environ={"AIOQUEUE_BROKER__URL": url})
    assert message.startswith(f"broker.url = {url!r} (from AIOQUEUE_BROKER__URL): expected")


def test_password_in_broker_url_is_hidden_from_errors(tmp_path: Path) -> None:
    message = error_of(tmp_path, environ={"AIOQUEUE_BROKER__URL": "redis://u:s3cret@host"})
    assert "s3cret" not in message and "'redis://u:***@host'" in message


TOKEN = "tok-3f9a8b7c6d5e4f3a2b1c"
SECRET = "secret-5b8e2f0a9c7d4e1b3a6f8c2d0e9b7a5c"


def tokens(*entries: dict[str, object]) -> str:
    return orjson.dumps(list(entries)).decode()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AIOQUEUE_AUTH__MODE": "token"}, "auth.tokens is not set (auth.mode = 'token')"),
        ({"AIOQUEUE_AUTH__MODE": "jwt"}, "auth.jwt_secret is not set (auth.mode = 'jwt')"),
        (
            {"AIOQUEUE_AUTH__MODE": "jwt", "AIOQUEUE_AUTH__JWT_ALGORITHMS": '["RS256"]'},
            "auth.jwt_public_key or auth.jwt_jwks_file is not set",
        ),
        (
            {"AIOQUEUE_AUTH__MODE": "jwt", "AIOQUEUE_AUTH__JWT_SECRET": "short" * 6},
            "auth.jwt_secret = <hidden> (from AIOQUEUE_AUTH__JWT_SECRET): expected a secret of"
            " at least 32 bytes",
        ),
        (
            {"AIOQUEUE_AUTH__JWT_ALGORITHMS": '["HS256", "RS256"]'},
            "HS* (a shared secret) and public-key algorithms cannot be mixed",
        ),
        ({"AIOQUEUE_AUTH__JWT_ALGORITHMS": '["none"]'}, "'none' is not one of"),
        ({"AIOQUEUE_AUTH__JWT_ALGORITHMS": "[]"}, "expected at least one algorithm"),
        ({"AIOQUEUE_AUTH__MODE": "basic"}, "expected 'none', 'token' or 'jwt'"),
    ],
)
def test_auth_modes_need_their_keys(tmp_path: Path, environ: dict[str, str], expected: str) -> None:
    assert expected in error_of(tmp_path, environ=environ)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"token": TOKEN, "principal": "alice"}, "entry 0: expected a table with exactly"),
        ({"token": "short", "principal": "alice", "scopes": []}, "at least 16 printable"),
        ({"token": TOKEN, "principal": "", "scopes": []}, "principal must be 1 to 200"),
        ({"token": TOKEN, "principal": "alice", "scopes": "jobs:read"}, "scopes must be a list"),
        ({"token": TOKEN, "principal": "alice", "scopes": ["jobs:write"]}, "unknown scope"),
        ({"token": TOKEN, "principal": "alice", "scopes": ["topics:publish:a..b"]}, "is empty"),
        ({"token": TOKEN, "principal": "alice", "scopes": ["jobs:submit:"]}, "names no task"),
    ],
)
def test_a_bad_token_entry_is_named_without_its_token(
    tmp_path: Path, entry: dict[str, object], expected: str
) -> None:
    environ = {"AIOQUEUE_AUTH__MODE": "token", "AIOQUEUE_AUTH__TOKENS": tokens(entry)}
    message = error_of(tmp_path, environ=environ)
    assert message.startswith("auth.tokens = <hidden> (from AIOQUEUE_AUTH__TOKENS): ")
    assert expected in message and TOKEN not in message


def test_a_token_given_twice_is_refused(tmp_path: Path) -> None:
    entry: dict[str, object] = {"token": TOKEN, "principal": "alice", "scopes": []}
    environ = {"AIOQUEUE_AUTH__TOKENS": tokens(entry, {**entry, "principal": "bob"})}
    message = error_of(tmp_path, environ=environ)
    assert "entry 1 (principal 'bob'): the same token is given twice" in message
    assert TOKEN not in message


def test_secrets_stay_out_of_the_settings_repr(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[auth]\nmode = "jwt"\njwt_secret = "{SECRET}"\n'
        f'tokens = [{{token = "{TOKEN}", principal = "alice", scopes = ["jobs:read"]}}]\n',
    )
    settings = load(path, environ={})
    assert settings.auth.jwt_secret == SECRET and settings.auth.tokens[0]["token"] == TOKEN
    assert SECRET not in repr(settings) and TOKEN not in repr(settings)


def test_retry_backoff_max_below_retry_backoff(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[jobs]\nretry_backoff = 10\nretry_backoff_max = 5\n")
    assert message.startswith("jobs.retry_backoff_max = 5.0 (from ")
    assert "expected a number >= jobs.retry_backoff (10" in message


def test_toml_syntax_error_names_file_and_tomllib_message(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[http\nport = 1\n")
    assert str(tmp_path / "config.toml") in message and "line 1" in message


def test_long_values_are_truncated(tmp_path: Path) -> None:
    message = error_of(tmp_path, environ={"AIOQUEUE_BROKER__PREFIX": "x" * 500})
    assert len(message) < 200 and "..." in message


def test_env_name_maps_dotted_keys() -> None:
    assert env_name("http.port") == "AIOQUEUE_HTTP__PORT"
    assert env_name("broker.confirm_timeout") == "AIOQUEUE_BROKER__CONFIRM_TIMEOUT"
    assert env_name("app") == "AIOQUEUE_APP"


def test_describe_covers_every_field_with_its_default() -> None:
    rows = {key: (env, default) for key, env, default in describe()}
    expected: dict[str, tuple[str, object]] = {"app": (env_name("app"), None)}
    for section in dataclasses.fields(Settings):
        if dataclasses.is_dataclass(section.type):
            for f in dataclasses.fields(section.type):
                key = f"{section.name}.{f.name}"
                default = list(f.default) if isinstance(f.default, tuple) else f.default
                expected[key] = (env_name(key), default)  # a list as the config takes it
    assert rows == expected
    assert "source" not in rows and len(rows) == 1 + 10 + 8 + 9 + 4 + 2 + 7 + 4 + 13 + 1 + 1 + 2


def test_every_described_key_loads_from_its_env_var_default() -> None:
    """Setting each env var to its own default is accepted and changes nothing."""

    def text(default: object) -> str:  # a list as JSON, as the environment takes it
        if isinstance(default, list):
            return orjson.dumps(default).decode()
        return "" if default is None else str(default)

    env = {name: text(default) for _, name, default in describe()}
    assert load(environ=env) == Settings()


def test_the_repository_config_toml_is_read_by_default_and_holds_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """./config.toml at the repository root is read when no other file is named, and sets every
    key to its built-in default: tests and `aioqueue serve` run from there see no difference."""
    monkeypatch.chdir(ROOT)
    settings = load(environ={})
    assert settings.source == str(ROOT / "config.toml")
    assert dataclasses.replace(settings, source=None) == Settings()


def test_the_repository_config_toml_names_every_key_with_a_comment() -> None:
    """Every key describe() lists is in config.toml, set or (app, which has no default) commented
    out, each with its one-line comment: the file and the settings cannot drift apart."""
    text = (ROOT / "config.toml").read_text()
    data = tomllib.loads(text)
    named = {key for key, value in data.items() if not isinstance(value, dict)}
    named |= {
        f"{name}.{key}" for name, table in data.items() if isinstance(table, dict) for key in table
    }
    top = text.split("\n[", 1)[0]
    commented = set(re.findall(r"(?m)^# (\w+) = ", top))
    assert commented == {"app"}
    assert named | commented == {key for key, _, _ in describe()}
    settings = [line for line in text.splitlines() if re.match(r"(# )?\w+ = ", line)]
    assert len(settings) == len(describe())
    assert all(re.search(r" +# \S", line.split(" = ", 1)[1]) for line in settings), settings


def test_the_readme_shows_the_repository_config_toml_as_it_is() -> None:
    """The configuration section of the README is the file itself, so neither drifts."""
    config = (ROOT / "config.toml").read_text()
    assert f"```toml\n{config}```\n" in (ROOT / "README.md").read_text()


def test_allowed_origins_come_as_a_toml_list_or_json_in_the_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[ws]\nallowed_origins = ["https://app.example", "http://x.test:8080"]\n'
    )
    assert load(path, environ={}).ws.allowed_origins == (
        "https://app.example",
        "http://x.test:8080",
    )
    env = {"AIOQUEUE_WS__ALLOWED_ORIGINS": '["*"]'}
    assert load(environ=env).ws.allowed_origins == ("*",)


@pytest.mark.parametrize(
    "value",
    [
        '"https://app.example"',
        '["app.example"]',
        '["https://app.example/path"]',
        "[1]",
        '["ftp://x"]',
    ],
)
def test_a_bad_allowed_origins_is_a_one_line_error(tmp_path: Path, value: str) -> None:
    message = error_of(tmp_path, f"[ws]\nallowed_origins = {value}\n")
    assert message.startswith("ws.allowed_origins = ")


def test_allowed_origins_in_the_environment_must_be_a_json_list(tmp_path: Path) -> None:
    message = error_of(tmp_path, environ={"AIOQUEUE_WS__ALLOWED_ORIGINS": "https://app.example"})
    assert "AIOQUEUE_WS__ALLOWED_ORIGINS" in message and "expected a list of origins" in message


def test_a_boolean_comes_as_toml_true_or_false_or_those_words_in_the_environment(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "[metrics]\nrequire_admin = true\n")
    assert load(path, environ={}).metrics.require_admin is True
    for word, expected in (("true", True), ("False", False), (" TRUE ", True)):
        settings = load(environ={"AIOQUEUE_METRICS__REQUIRE_ADMIN": word})
        assert settings.metrics.require_admin is expected
    message = error_of(tmp_path, "[metrics]\nrequire_admin = 1\n")
    assert message.startswith("metrics.require_admin = 1 (from")
    message = error_of(tmp_path, environ={"AIOQUEUE_METRICS__REQUIRE_ADMIN": "yes"})
    assert message == (
        "metrics.require_admin = 'yes' (from AIOQUEUE_METRICS__REQUIRE_ADMIN): expected true or"
        " false"
    )


def test_the_dead_letter_queues_bound_is_checked(tmp_path: Path) -> None:
    """RabbitMQ takes a TTL of at most 2^32 - 1 ms: a longer age would stop every connect."""
    settings = load(write(tmp_path, "[dead]\nmax_length = 5\nmax_age_seconds = 60\n"), environ={})
    assert (settings.dead.max_length, settings.dead.max_age_seconds) == (5, 60)
    message = error_of(tmp_path, "[dead]\nmax_age_seconds = 4294968\n")
    assert message.startswith("dead.max_age_seconds = 4294968") and "4294967" in message
    assert "expected an integer from 1" in error_of(tmp_path, "[dead]\nmax_length = 0\n")
