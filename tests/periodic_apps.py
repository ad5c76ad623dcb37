"""The app the periodic fault test serves (`aioqueue serve tests.periodic_apps:app`): apart from
tests/apps.py, whose app every other served test runs, so that no other test gets its ticks."""

from __future__ import annotations

import os

from aioqueue import App, Context
from tests.apps import _record

app = App()

#: The schedule's period in seconds (a test sets it in the served process's environment).
PERIOD = float(os.environ.get("AQ_TEST_PERIOD", "0.5"))


@app.periodic(every=PERIOD)
async def beat(ctx: Context) -> None:
    """Notes each run (job id, attempt, pid) in $AQ_TEST_TASK_LOG."""
    _record(ctx)
