"""What cannot run here (Docker) is checked for structure; the README keeps its promises."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_runs_aioqueue_against_the_rabbitmq_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    rabbit, app = compose["services"]["rabbitmq"], compose["services"]["aioqueue"]
    assert rabbit["image"].startswith("rabbitmq:") and "management" in rabbit["image"]
    assert "rabbitmq-diagnostics" in rabbit["healthcheck"]["test"]
    url = urlsplit(app["environment"]["AIOQUEUE_BROKER__URL"])
    env = rabbit["environment"]
    assert (url.scheme, url.hostname) == ("amqp", "rabbitmq")
    assert (url.username, url.password) == (
        env["RABBITMQ_DEFAULT_USER"],
        env["RABBITMQ_DEFAULT_PASS"],
    )
    assert app["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert app["environment"]["AIOQUEUE_HTTP__HOST"] == "0.0.0.0"
    assert "8080:8080" in app["ports"] and app["build"] == "."


def test_dockerfile_serves_the_examples_and_checks_health() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"aioqueue", "serve", "examples.tasks:app"' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "USER " in dockerfile


def test_ci_and_the_readme_use_the_same_test_command() -> None:
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "scripts/test" in readme and "scripts/serve" in readme


def test_every_package_folder_has_an_init_so_a_plain_install_ships_it() -> None:
    """setuptools' find_packages skips folders without __init__.py (Docker's `pip install .`)."""
    folders = [
        p for p in (ROOT / "src" / "aioqueue").rglob("*") if p.is_dir() and p.name != "__pycache__"
    ]
    assert folders and all((folder / "__init__.py").exists() for folder in folders)
