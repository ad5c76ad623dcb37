"""Every error aioqueue raises on purpose.

```
AioqueueError
├── ConfigError (also ValueError)      a bad config key or value; stops start-up
├── TaskDefinitionError (also TypeError) a task function aioqueue cannot check
├── RequestError                       the caller's fault; maps to a 4xx
│   ├── InvalidRequest                 400: bad JSON, bad fields, bad task arguments
│   ├── Unauthorized                   401: no credentials, or bad ones
│   │   └── TokenExpired               401: a JWT past its `exp`
│   ├── Forbidden                      403: the principal lacks the scope
│   ├── NotFound                       404: unknown job or task (or another principal's job)
│   ├── RequestTimeout                 408: the body did not arrive in http.body_timeout
│   ├── Conflict                       409: the job is in the wrong state
│   ├── PayloadTooLarge                413
│   └── UnsupportedMediaType           415
├── QueueFull                          429: the queue is at broker.max_queue_length
├── RateLimited                        429: the principal is over auth.max_submits_per_second
│   └── StoreFull                      429: unfinished jobs fill store.max_bytes
├── BrokerUnavailable                  503: the broker is down or did not confirm in time
└── NotReady                           503: the service is starting or stopping
```

`web/problems.py` turns each into a problem document; handlers never build status codes.
"""

from __future__ import annotations

from dataclasses import dataclass


class AioqueueError(Exception):
    """Base of every error aioqueue raises on purpose."""


class ConfigError(AioqueueError, ValueError):
    """A configuration key has a bad value, or is unknown. The message is one line."""


class TaskDefinitionError(AioqueueError, TypeError):
    """A task function has a signature aioqueue cannot check at submit time."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One bad field of a request: `field` is a dotted path (`args.width`, `args[0]`)."""

    field: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RequestError(AioqueueError):
    """The request is at fault; nothing was changed."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, detail={self.detail!r})"


class InvalidRequest(RequestError):
    """400. `errors` names each bad field, when the fault is in named fields."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class Unauthorized(RequestError):
    """No credentials, or credentials that do not authenticate. The detail never repeats them."""

    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str, *, given: bool = True) -> None:
        super().__init__(detail)
        #: Whether credentials were given (and are bad), or missing.
        self.given = given


class TokenExpired(Unauthorized):
    """A JWT whose `exp` has passed (beyond `auth.jwt_leeway`)."""


class Forbidden(RequestError):
    """The principal is known, and its scopes do not allow this."""

    status = 403
    title = "Forbidden"


class NotFound(RequestError):
    status = 404
    title = "Not found"


class Conflict(RequestError):
    status = 409
    title = "Conflict"


class RequestTimeout(RequestError):
    status = 408
    title = "Request timeout"


class PayloadTooLarge(RequestError):
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(RequestError):
    status = 415
    title = "Unsupported media type"


class QueueFull(AioqueueError):
    """The job's queue holds `broker.max_queue_length` jobs already: the job was not accepted."""

    retry_after = 1


class RateLimited(AioqueueError):
    """The caller is over a rate; `retry_after` is the seconds until it may try again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreFull(QueueFull):
    """The job store holds `store.max_bytes` of jobs that are not finished (finished ones are
    forgotten first): the job was not accepted. A full queue's kin: the same 429 and
    `queue_full`, since a client does the same about either (try later), and the service is
    not unavailable (it serves every other request, and runs what it holds)."""


class BrokerUnavailable(AioqueueError):
    """The broker is unreachable, or did not confirm in time: the job was not accepted."""

    retry_after = 1


class NotReady(AioqueueError):
    """The service is replaying its event log at start-up, or shutting down."""

    retry_after = 1
