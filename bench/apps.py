"""The app the benchmarks serve: one no-op task."""

from aioqueue import App

app = App()


@app.task
async def noop(n: int = 0) -> int:
    return n
