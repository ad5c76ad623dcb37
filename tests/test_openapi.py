"""`GET /openapi.json` in-process: OpenAPI 3.1, one operation per route the router serves (and
none it does not), and task argument schemas that accept exactly what the submit check accepts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema_rs
import orjson
import pytest
from aiohttp import hdrs, web
from aiohttp.test_utils import TestClient

from aioqueue import Settings, submission
from aioqueue.errors import InvalidRequest
from aioqueue.web.app import create_app
from aioqueue.web.openapi import UNDESCRIBED
from tests.e2e.openapi_app import app as served_app

Client = TestClient[web.Request, web.Application]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
async def client(aiohttp_client: Callable[[web.Application], Awaitable[Client]]) -> Client:
    return await aiohttp_client(create_app(served_app, Settings()))


async def fetch(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert (response.status, response.content_type) == (200, "application/json")
    return dict(await response.json())


def router_operations(web_app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route, less the HEAD twin aiohttp adds to each GET."""
    return {
        (route.method, route.resource.canonical)
        for route in web_app.router.routes()
        if route.resource is not None and route.method != hdrs.METH_HEAD
    }


async def test_it_is_openapi_3_1_and_describes_every_route_and_no_other(client: Client) -> None:
    document = await fetch(client)
    assert document["openapi"].startswith("3.1.")
    described = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    served = router_operations(client.app)
    assert ("GET", "/openapi.json") in served
    assert described == served - UNDESCRIBED
    assert served >= UNDESCRIBED  # what is left out is left out on purpose, and is served


async def test_every_operation_names_its_responses_and_every_ref_resolves(client: Client) -> None:
    document = await fetch(client)
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                assert operation["responses"], (method, path)
                assert operation["operationId"]
    refs = _refs(document)
    assert refs and {ref.removeprefix("#/components/schemas/") for ref in refs} <= set(schemas)


def _refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"]} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value))
    return set()


async def test_the_submit_body_has_one_branch_per_task_with_every_field(client: Client) -> None:
    document = await fetch(client)
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    branches = body["schema"]["oneOf"]
    assert [branch["properties"]["task"]["const"] for branch in branches] == sorted(
        served_app.tasks
    )
    for branch in branches:
        # A field the server takes but the description lacks would be refused by a client that
        # trusts it; one the description has but the server refuses, the fuzz run would find.
        assert set(branch["properties"]) == submission.FIELDS
        assert branch["additionalProperties"] is False


async def test_the_readyz_body_is_the_one_described(client: Client) -> None:
    schema = (await fetch(client))["components"]["schemas"]["Ready"]
    validator = jsonschema_rs.Draft202012Validator(schema)
    deadline = time.monotonic() + 10
    while (response := await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "not ready in time"
        await asyncio.sleep(0.01)
    body = await response.json()
    assert body == {"status": "ready", "stuck_threads": 0}
    assert validator.is_valid(body)
    assert not validator.is_valid({"status": "ready"})  # the count is always there


SAMPLES: list[Any] = [
    None,
    [],
    {},
    [1],
    [1, 2],
    [1, 2, 3],
    [1.5],
    [True],
    {"a": 1},
    {"a": 1, "b": 2},
    {"a": 2**64},
    {"a": 1, "z": 1},
    {"values": [1, 2.5]},
    {"values": [1, "x"]},
    {"values": [], "factor": None},
    {"ctx": 1, "values": []},
    {"name": "n"},
    {"name": "n", "tags": {"k": "v"}, "mode": 3, "flag": True},
    {"name": "n", "tags": {"k": 1}},
    {"name": "n", "mode": "medium"},
    {"name": "n", "mode": None},
    {"name": "n", "mode": True},
    ["n", None, "slow", False],
    [None, 1, 2],
    [None, 1, "x"],
    {"first": 1},
    {"other": True},
    {"other": 1},
    {"key": "k"},
    {"key": "k", "values": {"x": 1}},
    ["k"],
    "text",
    3,
]


@pytest.mark.parametrize("name", sorted(served_app.tasks))
def test_args_schemas_accept_exactly_what_the_submit_check_accepts(name: str) -> None:
    signature = served_app.tasks[name].signature
    validator = jsonschema_rs.Draft202012Validator(signature.args_schema())
    for args in SAMPLES:
        try:
            # As the server reads it: orjson takes an integer past 64 bits as a float.
            signature.bind(orjson.loads(json.dumps(args)))
        except InvalidRequest:
            accepted = False
        else:
            accepted = True
        assert validator.is_valid(args) == accepted, (name, args)
