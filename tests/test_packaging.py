"""What cannot run here (Docker) is checked for structure; the README keeps its promises."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from aioqueue.web.protocol import ERRORS

ROOT = Path(__file__).resolve().parent.parent


def test_compose_runs_aioqueue_against_the_rabbitmq_service() -> None:
    """The aioqueue service waits for a healthy rabbitmq service and logs in with its user."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "version" not in compose  # obsolete in the Compose specification
    rabbit, app = compose["services"]["rabbitmq"], compose["services"]["aioqueue"]
    # Published on this machine only: fixed credentials, and auth "none" by default.
    published = [port for service in (rabbit, app) for port in service["ports"]]
    assert published and all(port.startswith("127.0.0.1:") for port in published)
    assert rabbit["image"].startswith("rabbitmq:") and "management" in rabbit["image"]
    assert "rabbitmq-diagnostics" in rabbit["healthcheck"]["test"]
    assert {"127.0.0.1:5672:5672", "127.0.0.1:15672:15672"} <= set(rabbit["ports"])
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbit["volumes"])
    url = urlsplit(app["environment"]["AIOQUEUE_BROKER__URL"])
    env = rabbit["environment"]
    assert (url.scheme, url.hostname, url.port) == ("amqp", "rabbitmq", 5672)
    # guest may only log in from localhost: the app uses the user the rabbitmq service creates
    assert (url.username, url.password) == (
        env["RABBITMQ_DEFAULT_USER"],
        env["RABBITMQ_DEFAULT_PASS"],
    )
    assert url.username != "guest"
    assert app["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert app["environment"]["AIOQUEUE_HTTP__HOST"] == "0.0.0.0"
    assert "127.0.0.1:8080:8080" in app["ports"] and app["build"] == "."
    assert app["restart"] == "unless-stopped"
    # The job store outlives the container, where the image keeps it (below).
    assert (
        "aioqueue-data:/var/lib/aioqueue" in app["volumes"]
        and "aioqueue-data" in compose["volumes"]
    )


def test_dockerfile_serves_the_examples_and_checks_health() -> None:
    """The image runs `aioqueue serve` as a non-root user and its health check hits /healthz."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"aioqueue", "serve", "examples.tasks:app"' in dockerfile
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :].split("\nCMD")[0]
    assert "/healthz" in healthcheck
    assert "USER " in dockerfile and "EXPOSE 8080" in dockerfile
    # A folder the user may write, for the job store (else it falls back to a temporary file).
    assert "ENV AIOQUEUE_STORE__DIR=/var/lib/aioqueue" in dockerfile
    assert "chown aioqueue /var/lib/aioqueue" in dockerfile


def test_ci_and_the_readme_use_the_same_test_command() -> None:
    """CI runs scripts/test, and the README tells a newcomer about scripts/test and scripts/serve."""
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text()
    readme = ROOT / "README.md"
    assert readme.exists(), "README.md is missing"
    text = readme.read_text()
    assert "scripts/test" in text and "scripts/serve" in text


def test_every_package_folder_has_an_init_so_a_plain_install_ships_it() -> None:
    """setuptools' find_packages skips folders without __init__.py (Docker's `pip install .`)."""
    folders = [
        p for p in (ROOT / "src" / "aioqueue").rglob("*") if p.is_dir() and p.name != "__pycache__"
    ]
    assert folders and all((folder / "__init__.py").exists() for folder in folders)


def test_the_readme_lists_every_websocket_error_code() -> None:
    """The README's table of websocket error codes is protocol.py's `ERRORS`, row for row (the
    codes ws.py sends are that table: tests/test_asyncapi.py checks it)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Websocket") : readme.index("## Topics")]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", section, re.MULTILINE))
    assert rows == ERRORS


def test_the_readme_shows_the_script_of_the_topics_page() -> None:
    """The README's copy-paste page script is examples/topics.html's, line for line (the page
    itself is tested in a browser: tests/e2e/test_browser.py)."""
    page = (ROOT / "examples" / "topics.html").read_text()
    script = page[page.index("<script>\n") + len("<script>\n") : page.index("</script>")]
    readme = (ROOT / "README.md").read_text()
    topics = readme[readme.index("## Topics") : readme.index("## CLI")]
    blocks = re.findall(r"```js\n(.*?)```", topics, re.DOTALL)
    assert len(blocks) == 1, "the Topics section has one js block: the page's script"
    assert blocks[0] == script
    assert "new WebSocket(" in script and "since" in script and "localStorage" in script
