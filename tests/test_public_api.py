"""The public surface: what `import aioqueue` offers is exactly `__all__`."""

from __future__ import annotations

import inspect

import aioqueue


def test_the_public_names_are_exactly_all() -> None:
    public = {
        name
        for name, value in vars(aioqueue).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(aioqueue.__all__)


def test_errors_can_be_caught_by_their_builtin_base() -> None:
    assert issubclass(aioqueue.ConfigError, ValueError)
    assert issubclass(aioqueue.TaskDefinitionError, TypeError)
    assert issubclass(aioqueue.InvalidRequest, aioqueue.AioqueueError)
