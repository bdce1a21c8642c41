"""Real `dask scheduler` / `dask worker` processes for the tests that need a separate cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def spawn(log, *args) -> subprocess.Popen:
    """Start ``python -m dask ARGS...`` with its output in the open file `log`."""
    return subprocess.Popen([sys.executable, "-m", "dask", *map(str, args)], stdout=log, stderr=subprocess.STDOUT)


def start_scheduler(log, sched_file: Path, *extra, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start a scheduler on 127.0.0.1 (a free port, no dashboard); return it and its address."""
    proc = spawn(log, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                 "--scheduler-file", sched_file, *extra)
    # The scheduler creates its file before the JSON is in it (not atomically), so a file that exists can
    # still be empty or half-written: wait until it parses.
    deadline = time.time() + timeout
    while True:
        try:
            return proc, json.loads(Path(sched_file).read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"the test scheduler did not start; see {log.name}") from None
            time.sleep(0.1)
