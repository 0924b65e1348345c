"""What every klvae DataLoader worker does first: leave stop signals to the main process.

A scheduler (SLURM, Kubernetes, a terminal's Ctrl-C) signals the whole process group. If the loader
workers died of that signal, the main process would fail with "DataLoader worker ... is killed by signal"
before it could write ``last.ckpt``. Workers therefore ignore SIGTERM, SIGUSR1 and SIGINT; the main
process saves, stops, and shuts them down through the DataLoader's normal protocol (they also exit on
their own when the main process is gone).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal

__all__ = ["STOP_SIGNALS", "ignore_stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every klvae DataLoader (picklable: a module-level function)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _reap_leftover_workers() -> None:
    """At interpreter exit, end daemon children (DataLoader workers of a loader that was never shut down)
    that ignore SIGTERM: multiprocessing's own exit hook would SIGTERM them and then wait forever.

    Registered after multiprocessing's hook, so it runs before it, and does what that hook means to do
    (daemon children are terminated at exit): SIGTERM, and SIGKILL for those still alive a moment later.
    """
    children = [p for p in multiprocessing.active_children() if p.daemon and p.pid is not None]
    if children:
        # torch's SIGCHLD handler would report each ended worker as "killed by signal": we are exiting.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in children:
        process.terminate()
    for process in children:
        process.join(timeout=1)
        if process.is_alive():
            try:
                os.kill(process.pid, signal.SIGKILL)
            except OSError:
                continue
            process.join(timeout=5)


atexit.register(_reap_leftover_workers)
