"""Run a module under tracemalloc; SIGUSR1 writes a snapshot (`tracemalloc.Snapshot.dump`).

    python bench/traced.py FILE_PREFIX -m aioqueue serve APP

Each SIGUSR1 writes FILE_PREFIX.N (N = 1, 2, ...), once the handler runs between two bytecodes
of the main thread, and then creates FILE_PREFIX.N.done. `idle_ws.py --tracemalloc` uses it to
say which allocations grow with the connections.
"""

from __future__ import annotations

import itertools
import os
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

#: Frames kept of each allocation's traceback.
FRAMES = 12


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit("usage: traced.py FILE_PREFIX -m MODULE [ARGS...]")
    prefix, module = sys.argv[1], sys.argv[3]
    numbers = itertools.count(1)

    def dump(signum: int, frame: FrameType | None) -> None:
        path = Path(f"{prefix}.{next(numbers)}")
        tracemalloc.take_snapshot().dump(str(path))
        Path(f"{path}.done").touch()

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [module, *sys.argv[4:]]
    sys.path.insert(0, os.getcwd())
    tracemalloc.start(FRAMES)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
