"""``turbo bench load``: N concurrent clients send a fixed number of completion requests to a
running server; p50/p95 latency, tokens/s, errors — printed and written as JSON."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from turbo_core.stats import percentile


async def _client(url: str, queue: asyncio.Queue, body: dict, out: list, timeout: float) -> None:
    async with httpx.AsyncClient(timeout=timeout) as http:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/completions", json=body)
                ok = r.status_code == 200
                tokens = r.json()["usage"]["completion_tokens"] if ok else 0
                out.append({"latency_s": time.perf_counter() - t0, "status": r.status_code,
                            "tokens": tokens})
            except httpx.HTTPError as exc:
                out.append({"latency_s": time.perf_counter() - t0, "status": 0, "tokens": 0,
                            "error": f"{type(exc).__name__}: {exc}"})


def run(url: str, *, clients: int = 4, requests: int = 32, max_tokens: int = 16,
        prompt: str = "The capital of France is", timeout: float = 300.0) -> dict:
    if clients < 1 or requests < 1:
        raise ValueError("clients and requests must be >= 1")
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    results: list[dict] = []

    async def main() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(url.rstrip("/"), queue, body, results, timeout)
                               for _ in range(clients)))
        return time.perf_counter() - t0

    wall = asyncio.run(main())
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok] or [float("nan")]
    return {
        "benchmark": "load", "url": url, "clients": clients, "requests": requests,
        "max_tokens": max_tokens, "wall_s": wall, "ok": len(ok), "errors": len(results) - len(ok),
        "status_counts": {str(s): sum(r["status"] == s for r in results)
                          for s in sorted({r["status"] for r in results})},
        "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95), "mean_s": statistics.fmean(lat),
        "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
    }
