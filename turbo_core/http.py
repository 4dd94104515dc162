"""Servers we start (MLflow, a registry, a container, Airflow): a free port to give them, and
waiting for an HTTP endpoint to answer 200."""

from __future__ import annotations

import socket
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
    last = "no answer yet"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        problem = alive() if alive is not None else None
        if problem:
            raise RuntimeError(f"{url} will not come up: {problem}")
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g} s "
                               f"(last: {last})")
        time.sleep(interval_s)
