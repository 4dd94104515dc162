"""``turbo bench agreement``: does the serving engine's cache path give the model's own logits?

Per variant, a held-out prompt runs through :class:`~turbo_core.hf.runner.CacheRunner` — the
server's path: one slotted cache, the prompt in chunks, then decode steps fed the text's next
tokens — and the logits at the end of every chunk and at every decode step are compared with
one plain forward of the whole text (SDPA, no cache). The float cache (``fp16``) must match to
rounding; a packed cache shows its quantization error, and any disagreement in masking (a
sliding window, the sinks, the chunk boundaries) shows as a jump far beyond it.
"""

from __future__ import annotations

import sys

import torch
from tabulate import tabulate

from turbo_core.attention.variants import get_variant
from turbo_core.bench.common import describe_device
from turbo_core.hf import calibrate, data, models
from turbo_core.hf.evaluate import token_kl
from turbo_core.hf.features import layer_windows
from turbo_core.hf.runner import CacheRunner

COLUMNS = [("variant", "variant", "{}"), ("positions", "positions", "{}"),
           ("max_logit_diff", "max |Δlogit|", "{:.3f}"), ("top1_agreement", "top-1 agree", "{:.3f}"),
           ("kl_mean", "KL mean", "{:.4f}"), ("kv_bytes", "KV bytes at the end", "{:,}")]


@torch.no_grad()
def run(model: str | None = None, variants: tuple[str, ...] = ("fp16", "turbo-int4"),
        prompt: int = 1536, chunk: int = 512, decode: int = 8, text: str | None = None) -> dict:
    if min(prompt, chunk, decode) < 1:
        raise ValueError(f"prompt, chunk and decode must be >= 1, got {prompt}, {chunk}, {decode}")
    for name in variants:
        get_variant(name)
    lm = models.load(model)
    split = data.load_split(text)
    ids = calibrate.token_ids(lm.tokenizer, split.evaluation)[: prompt + decode]
    if ids.numel() < prompt + decode:
        raise ValueError(f"the text has {ids.numel()} held-out tokens; need {prompt + decode}")
    lm.model.set_attn_implementation("sdpa")
    plain = lm.model(ids[None]).logits[0]
    ends = [min(prompt, s + chunk) - 1 for s in range(0, prompt, chunk)]
    ends += list(range(prompt, prompt + decode))
    rows = []
    for name in variants:
        variant = get_variant(name)
        print(f"agreement: {name}", file=sys.stderr, flush=True)
        plan = calibrate.calibrate(lm, variant, progress=False) if variant.needs_calibration else None
        runner = CacheRunner(lm, variant, plan, lm.model.device)
        cache = runner.new_cache()
        seq = cache.add_sequence()
        got = [runner.forward(cache, [seq], [ids[s: e + 1].tolist()], [s])
               for s, e in zip([0, *[e + 1 for e in ends[:-1]]], ends, strict=True)]
        out, ref = torch.cat(got).float(), plain[ends].float()
        rows.append({"variant": name, "positions": len(ends),
                     "max_logit_diff": float((out - ref).abs().max()),
                     "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                     "kl_mean": float(token_kl(ref, out).mean()), "kv_bytes": cache.nbytes()})
        lm.model.set_attn_implementation("sdpa")
    return {"benchmark": "agreement", "model": lm.name, "weights_sha256": lm.weights_sha256,
            "data_source": split.source, "prompt": prompt, "chunk": chunk, "decode": decode,
            "sliding_windows": [w for w in layer_windows(lm.model.config)],
            "device": describe_device(lm.model.device), "results": rows}


def table(doc: dict, fmt: str = "simple") -> str:
    windows = sorted({w for w in doc["sliding_windows"] if w is not None})
    head = (f"{doc['model']}: a {doc['prompt']}-token prompt in chunks of {doc['chunk']}, then "
            f"{doc['decode']} decode steps through the serving engine's cache, against one plain "
            f"forward (SDPA) of the same {doc['prompt'] + doc['decode']} tokens of "
            f"{doc['data_source']}; sliding windows: {windows or 'none'} "
            f"({sum(w is not None for w in doc['sliding_windows'])} of "
            f"{len(doc['sliding_windows'])} layers); device {doc['device']['type']}")
    body = [[spec.format(r[k]) for k, _, spec in COLUMNS] for r in doc["results"]]
    return head + "\n\n" + tabulate(body, headers=[h for _, h, _ in COLUMNS], tablefmt=fmt,
                                    disable_numparse=True)
