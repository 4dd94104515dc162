"""Continuous batching on a tiny model: batched tokens equal one-at-a-time tokens, requests
join and leave mid-run, KV-budget admission and its queue, cancellation frees sequences, the
KV gauge sums what the sequences hold."""

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serving.batch_invariance import run_together

from turbo_core.serving.engine import Engine, Limits, Sampling, parse_bytes
from turbo_core.serving.scheduler import QueueFull, Scheduler, TooLarge


@pytest.fixture(scope="module", params=["fp16", "turbo-int4"])
def engine(request, tiny_dir):
    return Engine.from_files(str(tiny_dir), request.param, None)


def _prompts(engine, n):
    # lengths around the 64-token chunk so some sequences hold pages and buffers, some not
    return [engine.encode("The attention heads " * (3 + 4 * k))[: 11 + 23 * k] for k in range(n)]


def _alone(engine, prompt, sampling, **limits):
    s = Scheduler(engine, Limits(max_batch=1, **limits))
    try:
        return s.generate(prompt, sampling)
    finally:
        s.close()


def test_batched_tokens_equal_one_at_a_time(engine, tiny_dir):
    """Greedy and seeded-sampled tokens of six requests decoded together equal the same requests
    one at a time, through the compiled decode step. The cache and kernels are batch-invariant
    by construction (fixed context splits, merges in order), and so are the step's linear
    layers (``turbo.linear``: a row's result does not depend on the other rows, checked bit for
    bit in kernels/tests/test_cpu_linear.py) — before them, MKL's one-row GEMV rounded ~1 ulp
    apart from its batched GEMM and this check ran under ``MKL_CBWR=AVX2,STRICT``; now it runs
    as production does, in a fresh process without it."""
    script = Path(__file__).with_name("batch_invariance.py")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, str(script), str(tiny_dir), engine.variant.name],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["max_running"] >= 4  # they really ran together
    assert got["compiled"]  # through the compiled step, as turbo serve runs
    assert got["together"] == got["alone"]
    assert got["kv_bytes_after"] == 0


def test_requests_join_and_leave_mid_run(engine):
    long, short = _prompts(engine, 3)[2], _prompts(engine, 1)[0]
    want_long = _alone(engine, long, Sampling(max_tokens=60))
    want_short = _alone(engine, short, Sampling(max_tokens=3))
    s = Scheduler(engine, Limits(max_batch=4))
    try:
        events: queue.Queue = queue.Queue()
        s.submit(long, Sampling(max_tokens=60), events.put)
        for _ in range(5):  # the long one is decoding
            assert events.get(timeout=60)[1] is None
        shorts = run_together(s, [(short, Sampling(max_tokens=3))] * 3)
        assert shorts == [want_short] * 3
        rest = []
        while True:  # the long request was still running when the short ones left
            delta, finish = events.get(timeout=120)
            rest.append((delta, finish))
            if finish:
                break
        assert len(rest) > 1 and rest[-1][1] == want_long[1]
        assert s.max_running == 4
    finally:
        s.close()


def test_kv_budget_queues_and_refuses(engine):
    text = engine.encode("Budgets admit requests while their bytes fit. " * 20)
    prompts = [text[i: i + 50] for i in (0, 7, 19, 31)]  # one length: one need each
    sampling = Sampling(max_tokens=8)
    need = engine.bytes_for(50 + 8)
    s = Scheduler(engine, Limits(max_batch=8, kv_budget=2 * need, max_queue=8))
    try:
        peak = []
        seen = threading.Event()

        def watch():
            while not seen.is_set():
                peak.append((s.running, s.waiting, s.kv_bytes))
                time.sleep(0.002)

        w = threading.Thread(target=watch)
        w.start()
        got = run_together(s, [(p, sampling) for p in prompts])
        seen.set()
        w.join()
        assert all(g[1] in ("length", "stop") for g in got)
        assert s.max_running == 2  # the budget, not max_batch, held the rest back
        assert max(w for _, w, _ in peak) >= 1
        assert max(b for _, _, b in peak) <= 2 * need
        with pytest.raises(TooLarge, match="KV budget"):
            s.submit(prompts[0], Sampling(max_tokens=10**6), lambda e: None)
    finally:
        s.close()
    tight = Scheduler(engine, Limits(max_batch=1, max_queue=1))
    try:
        hold: queue.Queue = queue.Queue()
        tight.submit(prompts[3], Sampling(max_tokens=200), hold.put)
        hold.get(timeout=60)  # running
        tight.submit(prompts[0], sampling, lambda e: None)  # waits
        with pytest.raises(QueueFull, match="queue bound 1"):
            tight.submit(prompts[1], sampling, lambda e: None)
    finally:
        tight.close()


def _until(cond, seconds=30):
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_cancel_frees_the_sequence(engine):
    prompts = _prompts(engine, 3)
    s = Scheduler(engine, Limits(max_batch=4))
    try:
        streams = [queue.Queue() for _ in prompts]
        reqs = [s.submit(p, Sampling(max_tokens=400), q.put) for p, q in zip(prompts, streams, strict=True)]
        for q in streams:
            assert q.get(timeout=60)[1] is None
        assert _until(lambda: s.kv_bytes > 0) and s.running == 3
        slot = reqs[1].slot
        reqs[1].cancel()
        while streams[1].get(timeout=60)[1] is None:
            pass
        assert reqs[1].slot is None and reqs[1].done
        assert s.running == 2 and reqs[0].slot is not None and reqs[2].slot is not None
        assert slot not in s.cache.sequences  # its pages and buffer rows went back
    finally:
        s.close()
    assert s.running == 0 and s.cache.nbytes() == 0


def test_cache_bytes_of_a_batch_are_the_sum_of_its_sequences(engine):
    prompts = _prompts(engine, 4)
    together = engine.new_cache()
    seqs = [together.add_sequence() for _ in prompts]
    alone = []
    for seq, p in zip(seqs, prompts, strict=True):
        engine.forward(together, [seq], [p], [0])
        own = engine.new_cache()
        engine.forward(own, [own.add_sequence()], [p], [0])
        alone.append(own.nbytes())
    assert together.nbytes() == sum(alone) > 0
    for seq, p, b in zip(seqs, prompts, alone, strict=True):
        assert b <= together.bytes_for(len(p))  # admission's reservation covers what it holds
        together.release(seq)
    assert together.nbytes() == 0


@pytest.mark.parametrize(("text", "value"), [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                             ("1048576", 1048576), ("1.5 KiB", 1536)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_nonsense():
    with pytest.raises(ValueError, match="'lots' is not a size"):
        parse_bytes("lots")
