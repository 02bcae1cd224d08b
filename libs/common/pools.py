"""What every process pool of ours needs from its workers (kept light: spawned workers
import it before any work)."""

from __future__ import annotations

import os
import threading
import time
from typing import Final

#: How often a pool worker checks that the process that started it still runs (seconds).
PARENT_CHECK_S: Final = 1.0


def watch_parent(parent: int) -> None:
    """End this pool worker when ``parent`` (the process that started the pool) is gone.

    A parent killed with SIGKILL never stops its pool, and the pool's queue gives its
    workers no end-of-file (each holds both ends of the pipe): without this they would idle
    on forever, holding their memory. Usable as a ``ProcessPoolExecutor`` initializer."""
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)
