"""A private RabbitMQ node for tests: own name, ports, data folder, cookie and epmd.

The recipe of DESIGN.md: the scripts in /usr/lib/rabbitmq/bin are called directly (the /usr/sbin
wrappers switch to the rabbitmq user and lose HOME and the cookie). Fault tests use `kill()`,
`stop()`, `restart()`, `close_all_connections()` and `ctl()`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Container, Iterator
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
DIST_OFFSET = 20000  # RabbitMQ's convention: inter-node port = AMQP port + 20000


def free_port(*, offset: int = 0, avoid: Container[int] = ()) -> int:
    """A free TCP port on 127.0.0.1, with port + `offset` free too, outside `avoid`."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port in avoid or port + offset in avoid or port + offset > 65535:
            continue
        if offset:
            with socket.socket() as other:
                try:
                    other.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port found")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class RabbitNode:
    """One RabbitMQ node living in `base_dir`; `restart()` keeps its data (durable queues)."""

    def __init__(
        self, base_dir: Path, name: str = "aioqueue-test", port: int | None = None
    ) -> None:
        self.dir = base_dir
        self.port = port or free_port(offset=DIST_OFFSET)
        self.epmd_port = free_port(avoid={self.port, self.port + DIST_OFFSET})
        self._nodename = f"{name}-{self.port}@localhost"
        self.pid_file = base_dir / "pid"

    @property
    def nodename(self) -> str:
        return self._nodename

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        """The Erlang VM's OS pid (SIGKILL, SIGSTOP/SIGCONT it to inject faults)."""
        return int(self.pid_file.read_text().strip())

    def environ(self) -> dict[str, str]:
        """The environment of every rabbitmq command for this node (and only this node)."""
        d = self.dir
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return inherited | {
            "HOME": str(d / "home"),  # own .erlang.cookie
            "ERL_EPMD_PORT": str(self.epmd_port),  # own epmd: never the system's or the dev's
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + DIST_OFFSET),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "plugins"),  # none: the fastest start
            "RABBITMQ_CONF_ENV_FILE": str(d / "env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
        }

    def _write_config(self) -> None:
        home = self.dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        (self.dir / "env.conf").write_text("")
        (self.dir / "plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "log.console = false\nlog.file.level = warning\n"
        )

    def start(self, timeout: float = 120.0) -> RabbitNode:
        """Start detached and return once AMQP is up; RuntimeError with the log's tail if not."""
        self._write_config()
        self.pid_file.unlink(missing_ok=True)  # `wait` must not read a killed node's pid
        try:
            launch = subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"],
                env=self.environ(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            if launch.returncode != 0:
                raise RuntimeError(f"rabbitmq-server -detached: {launch.stderr or launch.stdout}")
            self.ctl(
                "wait", "--timeout", str(int(timeout)), str(self.pid_file), timeout=timeout + 5
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self.kill()
            raise RuntimeError(
                f"RabbitMQ node {self.nodename} did not start: {exc}\n{self.log_tail()}"
            ) from exc
        return self

    def stop(self) -> None:
        """A clean stop that returns once the node is gone; a no-op on a killed node.

        Also ends the node's own epmd, which would otherwise outlive the session.
        """
        try:
            if self.pid_file.exists() and _alive(pid := self.pid):
                os.kill(pid, signal.SIGCONT)  # a node frozen by a fault test cannot stop
                try:
                    self.ctl("stop", str(self.pid_file), timeout=60)
                except (RuntimeError, subprocess.TimeoutExpired):
                    self.kill()
                    raise
            self.pid_file.unlink(missing_ok=True)
        finally:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ["epmd", "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10
                )

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (a crash, as far as clients can tell); returns once dead.

        Measured on 3.10.8: a quorum queue declared under ~1 s before the SIGKILL comes back
        without a leader (get and consume hang); let a fresh queue settle before killing.
        """
        pid = self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {pid} still alive after SIGKILL")
            time.sleep(0.02)

    def restart(self, timeout: float = 120.0) -> RabbitNode:
        """Start again on the same data folder (stopping it first if it runs): durables survive."""
        self.stop()
        return self.start(timeout)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n NODE ARGS...`: its stdout, or RuntimeError with its stderr."""
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.nodename, *args],
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}"
            )
        return done.stdout

    def close_all_connections(self, reason: str = "fault-test") -> None:
        self.ctl("close_all_connections", reason)

    def eval(self, expression: str) -> str:
        """Evaluate an Erlang expression on the node (e.g. "rabbit_nodes:all_running().")."""
        return self.ctl("eval", expression)

    @contextlib.contextmanager
    def consumer_timeout(self, ms: int, check_every_ms: int = 1000) -> Iterator[None]:
        """RabbitMQ's consumer_timeout at `ms` for the channels opened within, checked every
        `check_every_ms` (each channel's tick, `channel_tick_interval`: 60 s by default, which
        made a test of it last a minute); both are put back after, whatever happened."""
        keys = {"consumer_timeout": ms, "channel_tick_interval": check_every_ms}
        before = {key: self.eval(f"application:get_env(rabbit, {key}).").strip() for key in keys}
        try:
            for key, value in keys.items():
                self.eval(f"application:set_env(rabbit, {key}, {value}).")
            yield
        finally:
            for key, was in before.items():
                match = re.fullmatch(r"\{ok,(\d+)\}", was)
                if match:
                    self.eval(f"application:set_env(rabbit, {key}, {match.group(1)}).")
                else:  # unset before: back to RabbitMQ's default
                    self.eval(f"application:unset_env(rabbit, {key}).")

    def log_tail(self, lines: int = 30) -> str:
        log = self.dir / "log" / f"{self.nodename}.log"
        if not log.exists():
            return f"(no log at {log})"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
