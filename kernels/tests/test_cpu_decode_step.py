"""``torch.ops.turbo.decode_step`` / ``float_decode_step`` (``QuantizedKVLayer.step`` /
``FloatKVLayer.step``, the compiled step's one call per layer) against the path they replace —
the store's ``update`` then ``turbo_attention`` over it —, bit for bit: two stores fed the same
prompts and decode steps, one taking the one-call step whenever it offers itself, must give the
same attention output every step and hold the same pages, tables and rows. The steps cross
chunk boundaries (the one-call path must step aside for the compression), a sliding window
releases pages (moves rows), a sequence leaves and a new one takes its slot, and the batch
names its slots out of order."""

import pytest
import torch
from turbo_kernels import cpu_ops

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.floatcache import FloatKVLayer
from turbo_core.attention.functional import turbo_attention
from turbo_core.attention.kvcache import QuantizedKVLayer

from .test_cpu_append import _held

CFGS = {
    "plain": (KVQuantConfig(), None),
    "sinks-int2-groups": (KVQuantConfig(sinks=16, int2_k_group=32, int2_v_group=16), None),
    "window": (KVQuantConfig(sinks=4), 100),
    "rotate": (KVQuantConfig(rotate=True), None),
}
MATH = TURBO_DEFAULT  # SAS and INT8 Q·Kᵀ: the quantized variants' math
BITS = [2, 4, 8, 4]
GROUP = 2  # query heads per KV head


def _general(store, q, k, v, seqs, rotated):
    if isinstance(store, FloatKVLayer):
        store.update(k, v, seqs=seqs)
        return turbo_attention(q, None, None, math_cfg=EXACT, kv_store=store, kv_seqs=seqs).out
    store.update(k, v, seqs=seqs, rotated=rotated)
    return turbo_attention(q, None, None, math_cfg=MATH, kv_store=store, kv_seqs=seqs,
                           kv_rotated=rotated).out


def _float_held(store: FloatKVLayer) -> dict[str, torch.Tensor]:
    out = {}
    for s in store.sequences:
        out[f"{s}/k"], out[f"{s}/v"] = store.keys_values(s)
        out[f"{s}/positions"] = store.positions(s)
    return out


@pytest.mark.parametrize("name", [*CFGS, "float", "float-window"])
def test_one_call_step_equals_update_then_attention(name):
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    gen = torch.Generator().manual_seed(7)
    if name.startswith("float"):  # the window moves rows down once 256 of them are dead
        window = 100 if name == "float-window" else None
        ours, theirs = (FloatKVLayer(len(BITS), 64, window=window) for _ in range(2))
        math, rotated, held = EXACT, False, _float_held
    else:
        cfg, window = CFGS[name]
        ours, theirs = (QuantizedKVLayer(BITS, 64, cfg, window=window) for _ in range(2))
        math, rotated, held = MATH, cfg.rotate, _held

    def rand(n, heads, t):
        return 3 * torch.randn(n, heads, t, 64, generator=gen)

    def prompt(seq, t):
        k, v, q = rand(1, len(BITS), t), rand(1, len(BITS), t), rand(1, GROUP * len(BITS), t)
        for store in (ours, theirs):
            _general(store, q, k, v, [seq], rotated)

    for store in (ours, theirs):
        for _ in range(3):
            store.add_sequence()
    # the float store's rows grow past 512 (float) or move down (float-window) along the way
    prompt(0, {"float": 480, "float-window": 300}.get(name, 150))
    prompt(1, 70)
    prompt(2, 5)  # shorter than the sinks of one configuration
    one_call = general = 0
    for i in range(150):
        if i == 60:  # sequence 1 leaves; a new one takes its slot with a prompt of its own
            for store in (ours, theirs):
                store.release(1)
                assert store.add_sequence() == 1
            prompt(1, 90)
        seqs = [2, 0] if i % 3 else [1, 2, 0]  # some steps leave a sequence out
        k, v, q = rand(len(seqs), len(BITS), 1), rand(len(seqs), len(BITS), 1), \
            rand(len(seqs), GROUP * len(BITS), 1)
        out = ours.step(q, k, v, seqs, torch.tensor(seqs), math, None, rotated)
        if out is None:
            general += 1
            out = _general(ours, q, k, v, seqs, rotated)
        else:
            one_call += 1
        want = _general(theirs, q, k, v, seqs, rotated)
        assert torch.equal(out, want), f"{name}: step {i} attends differently"
        a, b = held(ours), held(theirs)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after step {i}"
    # most steps took the one call, and it stepped aside at the chunk boundaries (and moves)
    assert one_call > 100 and general >= (1 if name.startswith("float") else 4), (one_call, general)
    if window is not None and name.startswith("float"):
        assert max(ours._moved) > 0  # rows moved out of the window meanwhile
    elif window is not None:
        assert int(ours.view().chunk_base.max()) > 0  # pages left the window meanwhile


def test_one_call_step_refuses_bad_slots_and_writes_nothing():
    assert cpu_ops.load()
    store = QuantizedKVLayer([4, 4], 64, KVQuantConfig())
    for _ in range(2):
        store.add_sequence()
    store.update(torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64))
    args = store._fast.args
    before = {key: t.clone() for key, t in _held(store).items()}
    lens = args[0].clone()
    k, q = torch.randn(2, 2, 1, 64), torch.randn(2, 4, 1, 64)
    with pytest.raises(RuntimeError, match="named twice"):
        cpu_ops.decode_step(q, k, k, torch.tensor([0, 0]), args, math_cfg=MATH)
    with pytest.raises(RuntimeError, match="outside"):
        cpu_ops.decode_step(q, k, k, torch.tensor([0, 5]), args, math_cfg=MATH)
    with pytest.raises(RuntimeError, match="k and v"):  # k of the wrong width
        cpu_ops.decode_step(q, torch.randn(2, 2, 1, 32), k, torch.tensor([0, 1]), args, math_cfg=MATH)
    assert torch.equal(args[0], lens)
    after = _held(store)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_a_rotated_store_takes_only_rotated_input_in_one_call():
    """Unrotated ``k, v`` for a rotated store must go the planned way (``update`` rotates them)."""
    assert cpu_ops.load()
    store = QuantizedKVLayer([4, 4], 64, KVQuantConfig(rotate=True))
    for _ in range(2):
        store.add_sequence()
    store.update(torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64))
    k, q, seqs = torch.randn(2, 2, 1, 64), torch.randn(2, 4, 1, 64), [0, 1]
    assert store.step(q, k, k, seqs, torch.tensor(seqs), MATH, None, rotated=False) is None
    assert store.step(q, k, k, seqs, torch.tensor(seqs), MATH, None, rotated=True) is not None
