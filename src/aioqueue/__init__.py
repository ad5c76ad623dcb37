"""aioqueue: from an HTTP request to background work to a live result in the browser."""

from aioqueue.app import App
from aioqueue.config import Settings, load
from aioqueue.context import Context, SyncContext
from aioqueue.errors import (
    AioqueueError,
    BrokerUnavailable,
    ConfigError,
    Conflict,
    InvalidRequest,
    NotFound,
    NotReady,
    TaskDefinitionError,
)
from aioqueue.jobs import JobStatus
from aioqueue.tasks import Task

__all__ = [
    "AioqueueError",
    "App",
    "BrokerUnavailable",
    "ConfigError",
    "Conflict",
    "Context",
    "InvalidRequest",
    "JobStatus",
    "NotFound",
    "NotReady",
    "Settings",
    "SyncContext",
    "Task",
    "TaskDefinitionError",
    "load",
]
