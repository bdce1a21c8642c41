"""Run a command and measure its wall time and peak resident memory summed over its whole process tree.

Shared by the benchmarks: a Dask LocalCluster's scheduler and workers are child processes, so the memory a user
needs is the sum over the tree, not the client's own RSS.
"""

from __future__ import annotations

import subprocess
import threading
import time


def tree_rss(proc) -> int:
    """Resident bytes of a psutil process and all its descendants."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], *, interval: float = 0.05) -> dict:
    """Run ``cmd``; return returncode, stdout, stderr, seconds and peak_rss (bytes, whole process tree)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak = max(peak, tree_rss(root))
            except psutil.Error:
                pass
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    return {"returncode": proc.returncode, "stdout": out, "stderr": err, "seconds": time.perf_counter() - t0,
            "peak_rss": peak}
