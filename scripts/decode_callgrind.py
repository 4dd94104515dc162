"""A fixed decode workload for instruction counts of the C++ CPU op under callgrind (which
repeats exactly whatever else the machine does):

    valgrind --tool=callgrind --toggle-collect='*decode_attention*' \
        .venv/bin/python scripts/decode_callgrind.py

SmolLM2's head shape (9 query / 3 KV heads, head_dim 64), turbo-int4 layout with 16 sinks, two
sequences of 1024 tokens, three calls of one new token each; one thread."""

import sys

import torch
from turbo_kernels import cpu_ops

from turbo_core.attention.config import TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.kvcache import QuantizedKVLayer

torch.set_num_threads(1)
if not cpu_ops.load():
    sys.exit("the C++ ops are not built: python -m turbo_kernels.cpu_ops")
B, L = 2, 1024
store = QuantizedKVLayer([4, 4, 4], 64, KVQuantConfig(sinks=16))
gen = torch.Generator().manual_seed(0)
store.append(torch.randn(B, 3, L, 64, generator=gen), torch.randn(B, 3, L, 64, generator=gen))
store.append(torch.randn(B, 3, 1, 64, generator=gen), torch.randn(B, 3, 1, 64, generator=gen),
             compress=False)
view, q = store.view(), torch.randn(B, 9, 1, 64, generator=gen)
for _ in range(3):
    cpu_ops.decode_attention(q, view, math_cfg=TURBO_DEFAULT)
print(f"{int(view.n_chunks.sum()) * 3 * 3} page x KV-head reads", file=sys.stderr)
