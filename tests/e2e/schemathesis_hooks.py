"""Schemathesis hooks for tests/e2e/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A few rules of the API cannot be written in OpenAPI: they relate two fields, a field to the clock,
or a value to what the server issued earlier. A schema-valid request that breaks one is rightly a
400, which schemathesis's `positive_data_acceptance` check would count as a failure; so before
each call a *positive* case that breaks one is brought within it by dropping the optional part
at fault, or by writing an integral number as an integer: JSON Schema cannot tell `2` from
`2.0`, but the server reads `2.0` as a float, which no integer field or `int` argument takes
(CONTRACT §1). Negative cases are sent as generated. Each rule is in /openapi.json's text.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import schemathesis

from aioqueue import submission
from aioqueue.errors import InvalidRequest
from aioqueue.store import _decode

#: `?wait=` holds a request up to 60 s by design; the fuzz run has no time for that.
MOST_WAIT = 0.2


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    route = (case.operation.method.upper(), case.operation.path)
    if route == ("GET", "/v1/jobs/{id}") and case.query:
        _cap_wait(case.query)
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if route == ("GET", "/v1/jobs") and case.query:
        _drop_foreign_cursor(case.query)
    if route == ("POST", "/v1/jobs") and isinstance(case.body, dict):
        _drop_unsatisfiable_fields(case.body, case.headers or {})
        _unique_key(case.body, case.headers or {}, case.id)
        case.body = _integral_as_int(case.body)


def _cap_wait(query: dict[str, Any]) -> None:
    try:
        seconds = float(query.get("wait", ""))
    except (TypeError, ValueError):
        return
    if math.isfinite(seconds) and seconds > MOST_WAIT:
        query["wait"] = MOST_WAIT


def _drop_foreign_cursor(query: dict[str, Any]) -> None:
    """A cursor is opaque: only a `next` the server returned is one (a link may supply it)."""
    cursor = query.get("cursor")
    if cursor is None:
        return
    try:
        _decode(str(cursor))
    except InvalidRequest:
        del query["cursor"]


def _drop_unsatisfiable_fields(body: dict[str, Any], headers: Any) -> None:
    header = headers.get("Idempotency-Key")
    if header is not None and body.get("idempotency_key") not in (None, header):
        del body["idempotency_key"]  # the header and the field, when both given, must match
    run_at = body.get("run_at")
    if isinstance(run_at, str) and _seconds_ahead(run_at) > submission.MAX_DELAY:
        del body["run_at"]  # further ahead than a broker can delay a message


def _unique_key(body: dict[str, Any], headers: Any, case_id: str) -> None:
    """Make the idempotency key this case's own. Generated keys are short and collide, and a
    key reused with another body is a 409 (rightly): most submits would test only that."""
    for container, name in ((headers, "Idempotency-Key"), (body, "idempotency_key")):
        key = container.get(name)
        if isinstance(key, str):
            container[name] = f"{key[: submission.MAX_KEY_LENGTH - len(case_id) - 1]}-{case_id}"


def _seconds_ahead(moment: str) -> float:
    try:
        return datetime.fromisoformat(moment).timestamp() - datetime.now().timestamp()
    except (ValueError, OverflowError):
        return 0.0


def _integral_as_int(value: Any) -> Any:
    """`value` with every integral float within 64 bits written as an integer (2.0 as 2)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_integral_as_int(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral_as_int(item) for key, item in value.items()}
    return value
