"""Run as a script (a fresh process: nothing compiled or set by other tests):
``python batch_invariance.py MODEL_DIR VARIANT`` prints JSON — the tokens of six requests run
one at a time and run together, and how many ran together."""

import json
import sys
import threading

from turbo_core.serving.engine import Engine, Limits, Sampling
from turbo_core.serving.scheduler import Scheduler


def run_together(scheduler: Scheduler, jobs: list) -> list:
    """``scheduler.generate(*job)`` for every job at once, one thread each; results in order."""
    out = [None] * len(jobs)

    def run(i: int) -> None:
        out[i] = scheduler.generate(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def main(model_dir: str, variant: str) -> None:
    engine = Engine.from_files(model_dir, variant, None)
    # lengths around the 64-token chunk: some sequences hold pages and buffer rows, some not
    prompts = [engine.encode("The attention heads " * (3 + 4 * k))[: 11 + 23 * k] for k in range(6)]
    greedy = Sampling(max_tokens=40)
    sampled = Sampling(max_tokens=40, temperature=0.8, top_p=0.9, seed=7)
    jobs = [(p, greedy if i % 2 else sampled) for i, p in enumerate(prompts)]
    # the same prompt chunks alone and together: a packed cache compresses between chunks, so
    # chunking (not batching) changes what later prompt tokens see
    chunks = {"prefill_chunk": 16, "prefill_per_step": 32}
    alone = []
    for job in jobs:
        s = Scheduler(engine, Limits(max_batch=1, **chunks))
        alone.append(s.generate(*job))
        s.close()
    s = Scheduler(engine, Limits(max_batch=8, **chunks))
    together = run_together(s, jobs)
    s.close()
    print(json.dumps({"alone": alone, "together": together, "max_running": s.max_running,
                      "kv_bytes_after": s.kv_bytes, "compiled": engine.compiled}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
