"""A private RabbitMQ node for tests: own name, ports, data folder, cookie and epmd.

The recipe of DESIGN.md: the scripts in /usr/lib/rabbitmq/bin are called directly (the /usr/sbin
wrappers switch to the rabbitmq user and lose HOME and the cookie). Fault tests use `kill()`,
`stop()`, `restart()` and `ctl()`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port(*, also_free_at: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (and port + `also_free_at` free too, when asked)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if also_free_at == 0:
            return port
        if port + also_free_at < 65536:
            with socket.socket() as other:
                try:
                    other.bind(("127.0.0.1", port + also_free_at))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


class RabbitNode:
    def __init__(
        self, base_dir: Path, name: str = "aioqueue-test", port: int | None = None
    ) -> None:
        self.dir = base_dir
        self.port = port or free_port(also_free_at=20000)
        self.epmd_port = free_port()
        self.nodename = f"{name}-{self.port}@localhost"
        self.pid_file = self.dir / "pid"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def environ(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "HOME": str(d / "home"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "plugins"),
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
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nlog.file.level = warning\n"
        )

    def start(self, timeout: float = 120.0) -> RabbitNode:
        self._write_config()
        subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"],
            env=self.environ(),
            check=True,
            capture_output=True,
            timeout=30,
        )
        try:
            self.ctl(
                "wait", "--timeout", str(int(timeout)), str(self.pid_file), timeout=timeout + 10
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"RabbitMQ node did not start: {exc}\n{self.log_tail()}") from exc
        return self

    def stop(self) -> None:
        """A clean stop; returns once the node is gone."""
        if self.pid_file.exists():
            self.ctl("stop", str(self.pid_file), timeout=60)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, as far as clients can tell."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"RabbitMQ node {pid} still alive after SIGKILL")

    def restart(self, timeout: float = 120.0) -> RabbitNode:
        """Start again on the same data folder: durable queues and messages survive."""
        return self.start(timeout)

    @property
    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
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
        return self.ctl("eval", expression)

    def log_tail(self, lines: int = 30) -> str:
        logs = sorted((self.dir / "log").glob("*.log"))
        if not logs:
            return "(no log)"
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])
