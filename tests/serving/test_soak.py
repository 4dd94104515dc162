"""The server over real HTTP on 127.0.0.1 (uvicorn in a thread), through the compiled decode
step: a bounded soak of mixed streaming and whole requests with bad input thrown in, a client
that disconnects, 429 when the queue is full; afterwards no errors and no cache bytes left."""

import asyncio
import re
import threading
import time

import httpx
import pytest
import uvicorn

from turbo_core.http import free_port
from turbo_core.serving.app import create_app
from turbo_core.serving.engine import Engine, Limits

pytestmark = pytest.mark.slow  # a soak over real HTTP


@pytest.fixture(scope="module")
def server(tiny_dir):
    engine = Engine.from_files(str(tiny_dir), "turbo-int4", None)
    assert engine.compiled  # the soak runs the compiled decode step, as turbo serve does
    app = create_app(engine, Limits(max_prompt_tokens=1024, max_new_tokens=4000, max_batch=6,
                                    max_queue=4, prefill_chunk=32))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=30)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


async def _soak(url: str, clients: int, rounds: int) -> dict:
    counts = {"ok": 0, "bad": 0, "overloaded": 0, "errors": []}
    words = ["The", "scheduler", "admits", "requests", "while", "their", "bytes", "fit", "the", "budget", "."]

    async def one(c: httpx.AsyncClient, i: int, r: int):
        n = 8 + (i * 7 + r * 13) % 90
        body = {"prompt": " ".join(words[(i + k) % len(words)] for k in range(n)),
                "max_tokens": 4 + (i + r) % 24, "temperature": 0.7 * (r % 2), "seed": i}
        if (i + r) % 5 == 4:  # bad input under load
            resp = await c.post("/v1/completions", json=body | {"top_p": 0})
            if resp.status_code == 422 and "top_p" in resp.json()["error"]["message"]:
                counts["bad"] += 1
            else:
                counts["errors"].append(resp.status_code)
            return
        for attempt in range(100):
            if (i + r) % 2:
                async with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
                    status = s.status_code
                    lines = [x async for x in s.aiter_lines() if x.startswith("data: ")]
                ok = status == 200 and lines[-1] == "data: [DONE]"
            else:
                resp = await c.post("/v1/completions", json=body)
                status, ok = resp.status_code, resp.status_code == 200 and "usage" in resp.json()
            if status != 429:
                break
            counts["overloaded"] += 1
            await asyncio.sleep(0.05 * (attempt + 1))
        if ok:
            counts["ok"] += 1
        else:
            counts["errors"].append(status)

    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        for r in range(rounds):
            await asyncio.gather(*(one(c, i, r) for i in range(clients)))
    return counts


def test_soak_disconnect_and_no_leaked_bytes(server):
    url, app = server
    clients, rounds = 12, 4
    counts = asyncio.run(_soak(url, clients, rounds))
    bad = sum((i + r) % 5 == 4 for i in range(clients) for r in range(rounds))
    assert counts["errors"] == [] and counts["bad"] == bad
    assert counts["ok"] == clients * rounds - bad  # 429s (batch 6 + queue 4 full) were retried

    async def disconnect():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            body = {"prompt": "The attention " * 30, "max_tokens": 4000, "stream": True,
                    "ignore_eos": True}  # far longer than the test: only a cancel ends it
            async with c.stream("POST", "/v1/completions", json=body) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: {"):
                        break  # one token arrived; the client goes away mid-generation
            return (await c.get("/metrics")).text

    during = asyncio.run(disconnect())
    assert _metric(during, "turbo_sequences_running") <= 1
    scheduler = app.state.scheduler
    deadline = time.monotonic() + 30
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.02)
    text = httpx.get(f"{url}/metrics").text
    assert _metric(text, "turbo_sequences_running") == 0
    assert _metric(text, "turbo_sequences_waiting") == 0
    assert _metric(text, "turbo_kv_cache_bytes") == 0 and scheduler.cache.nbytes() == 0
    assert 'turbo_requests_finished_total{reason="cancelled"} 1.0' in text
    assert _metric(text, "turbo_kv_cache_bytes_peak") > 0
    assert _metric(text, "turbo_decode_batch_size_count") > 0
    assert _metric(text, "turbo_time_to_first_token_seconds_count") >= 33
    assert 'status="500"' not in text
    pools = [p for layer in scheduler.cache.layers for p in layer.store._pools.values()]
    free = [len(layer.store._free_pages) for layer in scheduler.cache.layers]
    assert free == [pools[0].capacity] * len(free)  # every page is back on the free list


def test_verify_load_gates_on_p95_latency(server, monkeypatch):
    """The pipeline's verify step after deployment: a bounded load through the same transport,
    p95 request latency against the bound; a bound the server cannot meet fails the task
    (which the DAG answers with its rollback)."""
    from turbo_core.pipeline import tasks
    from turbo_core.rollout import verify as vf

    url, app = server
    model = app.state.engine.model_id
    ok = vf.verify(vf.http_request(url), vf.VerifyConfig(expected_model=model, max_p95_latency_s=120))
    assert ok["ok"], ok["failed"]
    load = ok["load"]
    assert (load["requests"], load["clients"], load["errors"]) == (8, 4, 0)
    assert 0 < load["p50_latency_s"] <= load["p95_latency_s"] <= 120 and load["tokens_per_s"] > 0
    tight = vf.verify(vf.http_request(url), vf.VerifyConfig(max_p95_latency_s=1e-4))
    assert not tight["ok"] and len(tight["failed"]) == 1
    assert re.fullmatch(r"load: AssertionError: p95 latency \d+\.\d\d s > bound 0\.0001 s "
                        r"\(8 requests, 4 concurrent, 16 tokens each\)", tight["failed"][0])
    port = int(url.rsplit(":", 1)[1])
    name, variant = model.split(":")
    prep = {"deploy_target": "docker", "serve_port": port, "model_name": name,
            "max_p95_latency_s": 1e-4}
    with pytest.raises(RuntimeError, match=r"verification failed: load: .*p95 latency"):
        tasks.verify(prep, {"variant": variant}, {})
    assert tasks.verify(prep | {"max_p95_latency_s": 120.0}, {"variant": variant}, {})["ok"]
