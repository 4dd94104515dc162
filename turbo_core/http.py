"""Servers we start (MLflow, a registry, a container, Airflow): a free port to give them,
asking or waiting for an HTTP endpoint to answer 200, and stopping their process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a server we are about to start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ok(url: str, timeout_s: float, alive: Callable[[], str | None] | None = None,
            interval_s: float = 0.5) -> float:
    """Poll ``url`` until it answers 200; returns the seconds it took.

    Args:
        alive: called between polls; a returned message means the server died (e.g. its
            process exited) and is raised at once instead of waiting for the timeout.
    Raises:
        TimeoutError: no 200 within ``timeout_s`` (the message names the URL).
        RuntimeError: ``alive`` reported the server gone.
    """
    start = time.monotonic()
    while True:
        last = probe(url)
        if last is None:
            return time.monotonic() - start
        problem = alive() if alive is not None else None
        if problem:
            raise RuntimeError(f"{url} will not come up: {problem}")
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g} s "
                               f"(last: {last})")
        time.sleep(interval_s)


def probe(url: str, timeout_s: float = 5.0) -> str | None:
    """One GET of ``url``: None when it answers 200, else what it answered or why it did not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}"
    except OSError as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"


def stop_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Stop a server started in its own process group (``start_new_session=True``): SIGTERM to
    the whole group, then SIGKILL when it has not exited within ``timeout_s``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
