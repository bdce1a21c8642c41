"""An advisory lock that stops two l2l-scale runs from writing the same output at once.

Design
------
The lock is a small JSON file ``<output>.lock`` beside the output, created with ``O_CREAT | O_EXCL`` (atomic on
local filesystems and on NFSv3+ / Lustre / GPFS), holding who wrote it: pid, host, start time and command. It
sits *beside* the output rather than inside it because the output directory itself is written under a temporary
name and renamed at the end.

A crashed run must not block the output forever, so a lock is **stale** when

- its host is this host and its pid is not running, or is running but was started after the lock was taken
  (the pid was reused); or
- its host is another machine and the file has not been refreshed for ``stale_after`` seconds (default 15
  minutes, ``L2L_SCALE_LOCK_STALE_AFTER``). The holder refreshes the file's mtime from a background thread every
  ``stale_after / 4`` seconds (at most every minute), so a live run on another node is never taken for dead,
  however long it runs.

A stale lock is removed by whoever finds it, under a short-lived ``<output>.lock.break`` file (also ``O_EXCL``) so
that two runs breaking the same stale lock cannot remove each other's fresh lock; the lock's inode and mtime are
re-checked under it.

While the lock is held, SIGTERM (what ``scancel``, a SLURM time limit or ``kubectl delete`` send first) raises
``SystemExit(143)`` in the main thread instead of killing the process outright, so the lock is released on the
way out and a resubmitted job on another node does not have to wait for it to go stale.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from l2l_scale.errors import OutputError

LOCK_SUFFIX = ".lock"
DEFAULT_STALE_AFTER = 15 * 60.0
STALE_AFTER_ENV = "L2L_SCALE_LOCK_STALE_AFTER"
_CREATE_GRACE = 60.0  # a lock file still empty after this long was left by a crash between create and write
_BREAK_GRACE = 30.0  # a .break file older than this was left by a crashed breaker
_PID_START_SLACK = 2.0  # seconds of clock granularity when comparing a process start with the lock's start


def lock_path(output: str | Path) -> Path:
    """The lock file of ``output``: ``<output>.lock`` beside it."""
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


def _stale_after(value: float | None) -> float:
    if value is not None:
        return float(value)
    env = os.environ.get(STALE_AFTER_ENV)
    if env:
        try:
            return float(env)
        except ValueError:
            from l2l_scale.errors import ConfigError

            raise ConfigError(f"{STALE_AFTER_ENV}={env!r} is not a number of seconds; set e.g. "
                              f"{STALE_AFTER_ENV}=900") from None
    return DEFAULT_STALE_AFTER


def _read(path: Path) -> tuple[dict | None, os.stat_result | None]:
    """The lock's contents (``{}`` if empty or unreadable) and stat, or ``(None, None)`` if it does not exist."""
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except OSError:
        return {}, None
    try:
        info = json.loads(text) if text.strip() else {}
    except ValueError:
        info = {}
    return (info if isinstance(info, dict) else {}), st


def _pid_alive_since(pid: int, started: float) -> bool:
    """Whether ``pid`` runs on this host and is the same process that took a lock at time ``started``."""
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= started + _PID_START_SLACK
    except ImportError:  # pragma: no cover - psutil is a dependency; plain POSIX fallback
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except Exception:  # NoSuchProcess, AccessDenied on an exited pid, ...
        return False


def _is_stale(info: dict, st: os.stat_result | None, stale_after: float) -> bool:
    now = time.time()
    if not info:  # empty or corrupt: a crash between O_EXCL create and write, unless it is brand new
        return st is None or now - st.st_mtime > _CREATE_GRACE
    if info.get("host") == socket.gethostname():
        try:
            return not _pid_alive_since(int(info["pid"]), float(info.get("started_ts", 0.0)))
        except (KeyError, TypeError, ValueError):
            return True
    return st is None or now - st.st_mtime > stale_after


def describe(info: dict) -> str:
    """``pid N on HOST, started TIME`` for messages."""
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
            if info else "a run that is still creating its lock")


def _busy_error(output: Path, lock: Path, info: dict) -> OutputError:
    return OutputError(f"{output} is being written by another l2l-scale run ({describe(info)}); wait for it or "
                       f"remove the stale lock {lock} if that run is gone")


def check_unlocked(output: str | Path, *, stale_after: float | None = None) -> None:
    """Raise :class:`OutputError` if a live run holds the lock of ``output`` (a stale lock is ignored here)."""
    output = Path(output)
    lock = lock_path(output)
    info, st = _read(lock)
    if info is not None and not _is_stale(info, st, _stale_after(stale_after)):
        raise _busy_error(output, lock, info)


class OutputLock:
    """The write lock of one output path; use as a context manager.

    Parameters
    ----------
    output : path
        The output being written (the lock is ``<output>.lock``).
    stale_after : float, optional
        Seconds without a refresh after which a lock held from another host counts as stale (default 900 or
        ``L2L_SCALE_LOCK_STALE_AFTER``).
    """

    def __init__(self, output: str | Path, *, stale_after: float | None = None) -> None:
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.stale_after = _stale_after(stale_after)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_term: Any = None
        self.held = False

    def _info(self) -> dict[str, Any]:
        now = time.time()
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
                "started_ts": now, "token": self.token, "command": " ".join(sys.argv)}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the output lock ({exc.strerror}); check free space "
                              "and permissions of the output folder") from None
        try:
            os.write(fd, json.dumps(self._info(), indent=1).encode())
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: cannot write the output lock ({exc.strerror}); check free space "
                              "and permissions of the output folder") from None
        os.close(fd)
        return True

    def _break(self, st: os.stat_result | None) -> None:
        """Remove the stale lock last seen with stat ``st``, unless someone else got there first."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - breaker.stat().st_mtime > _BREAK_GRACE:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        except OSError:
            return
        try:
            os.close(fd)
            try:
                now = self.path.stat()
            except FileNotFoundError:
                return
            if st is None or (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def acquire(self) -> "OutputLock":
        """Take the lock, breaking a stale one; raise :class:`OutputError` if a live run holds it."""
        for _ in range(50):
            if self._try_create():
                self.held = True
                self._start_heartbeat()
                self._catch_sigterm()
                return self
            info, st = _read(self.path)
            if info is None:
                continue  # released meanwhile
            if not _is_stale(info, st, self.stale_after):
                raise _busy_error(self.output, self.path, info)
            self._break(st)
        info, _ = _read(self.path)
        raise _busy_error(self.output, self.path, info or {})

    def _start_heartbeat(self) -> None:
        interval = max(0.05, min(60.0, self.stale_after / 4))

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="l2l-output-lock", daemon=True)
        self._thread.start()

    def _catch_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit while held, if nobody else handles it and this is the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def _terminate(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _terminate)
        self._previous_term = signal.SIG_DFL

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self._previous_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_term)
            self._previous_term = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            info, _ = _read(self.path)
            if info and info.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
