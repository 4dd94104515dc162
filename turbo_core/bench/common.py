"""Shared benchmark plumbing: timing, environment description, atomic JSON/Markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from turbo_core.fileio import write_atomic


def time_call(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` timed; milliseconds per call."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def describe_device(device: torch.device) -> dict[str, object]:
    """What ran the benchmark: device name, threads, library versions."""
    info: dict[str, object] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
        info["torch_threads"] = torch.get_num_threads()
    return info


def write_json(path: str | os.PathLike[str], payload: dict) -> Path:
    return write_atomic(path, json.dumps(payload, indent=2) + "\n")
