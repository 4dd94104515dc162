"""Small measurement sizes for tests on the tiny model (the defaults take minutes)."""

from turbo_core.hf.evaluate import EvalSettings
from turbo_core.hf.retrieval import RetrievalSettings
from turbo_core.hf.speed import SpeedSettings

SPEED = SpeedSettings(context=64, batch=2, new_tokens=4, repeats=5)
RECALL = RetrievalSettings(lengths=(384,), samples=1, needles=2, max_new_tokens=4)
EVAL = EvalSettings(max_tokens=256, window=128, speed=SPEED, retrieval=RECALL)
# the same for `turbo evaluate`
EVAL_ARGS = ["--max-tokens", "256", "--window", "128", "--speed-context", "64", "--speed-batch", "2",
             "--retrieval-lengths", "384", "--retrieval-samples", "1"]
# the pipeline's parameters at these sizes; the tiny random model's speed and drift are not
# what the tests on it check, so those two gates are opened
PIPELINE_CONF = {"eval_tokens": 256, "eval_window": 128, "calib_tokens": 256, "speed_context": 64,
                 "speed_batch": 2, "retrieval_lengths": [384], "retrieval_samples": 1,
                 "max_kl": 10.0, "min_decode_speedup": 0.0}
