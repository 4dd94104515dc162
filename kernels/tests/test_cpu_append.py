"""``torch.ops.turbo.append`` (``QuantizedKVLayer.update`` on CPU) against the PyTorch store,
byte for byte: two stores fed the same steps — prompt chunks of several sizes, decode steps,
ragged sequences joining late, INT2/INT4/INT8 heads in one layer, sinks, INT2 groups of their
own, a sliding window that releases pages, pre-RoPE and rotation — must hold the same pages
(codes, integer scales and offsets, first-level scales), page tables and INT8 buffer rows."""

import pytest
import torch
from turbo_kernels import cpu_ops

from turbo_core.attention import functional
from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.kvcache import QuantizedKVLayer

CFGS = {
    "plain": (KVQuantConfig(), None),
    "sinks-int2-groups": (KVQuantConfig(sinks=16, int2_k_group=32, int2_v_group=16), None),
    "window": (KVQuantConfig(sinks=4), 100),
    "rotate": (KVQuantConfig(rotate=True), None),
}


def _rope(pos):
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    ang = pos.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def _steps(n_heads, seed):
    """(sequences, k, v) per step: two prompts in chunks, a third joining late, then decode."""
    gen = torch.Generator().manual_seed(seed)

    def kv(n, t):
        return tuple(3 * torch.randn(n, n_heads, t, 64, generator=gen) for _ in range(2))

    yield ([0, 1], *kv(2, 150))
    yield ([0, 1], *kv(2, 70))
    yield ([2], *kv(1, 130))
    for _ in range(70):  # crosses chunk boundaries for every sequence
        yield ([0, 1, 2], *kv(3, 1))
    yield ([1], *kv(1, 64))


def _spy(monkeypatch) -> list:
    """Record the compression jobs of every ``cpu_ops.append`` call (and make the call)."""
    calls, real = [], cpu_ops.append

    def spy(*args):
        calls.append(args[5])
        return real(*args)

    monkeypatch.setattr(cpu_ops, "append", spy)
    return calls


def _held(store: QuantizedKVLayer) -> dict[str, torch.Tensor]:
    """What a reader can see: each sequence's pages (in table order) and buffered rows."""
    view = store.view()
    out = {"n_chunks": view.n_chunks, "chunk_base": view.chunk_base, "buffer_len": view.buffer_len}
    for b in range(view.page_table.shape[0]):
        pages = view.page_table[b, : int(view.n_chunks[b])].long()
        for g in view.groups:
            for name in ("k_packed", "k_scale", "k_low", "k_first", "v_packed", "v_scale", "v_low",
                         "v_first"):
                t = getattr(g, name)
                if t is not None:
                    out[f"{b}/{g.bits}/{name}"] = t.index_select(0, pages)
        n = int(view.buffer_len[b])
        for name, rows in (("k", view.buffer_k), ("v", view.buffer_v)):
            out[f"{b}/buffer_{name}"] = rows.values[b, :, :n]
            out[f"{b}/buffer_{name}_scale"] = rows.scale[b, :, :n]
    return out


@pytest.mark.parametrize("flush", [False, True], ids=["update", "update+flush"])
@pytest.mark.parametrize("name", list(CFGS))
def test_append_op_writes_what_the_pytorch_store_writes(name, flush, monkeypatch):
    """With ``flush``, each write is followed by ``compress_full_chunks`` (what
    ``TurboCache.flush`` runs after a prompt chunk): one op call with no new rows."""
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    cfg, window = CFGS[name]
    bits = [2, 4, 8, 4]
    rope = _rope if cfg.pre_rope else None
    ours, theirs = (QuantizedKVLayer(bits, 64, cfg, rope=rope, window=window) for _ in range(2))
    calls = _spy(monkeypatch)
    for seqs, k, v in _steps(len(bits), seed=len(name)):
        for store in (ours, theirs):
            while len(store.sequences) <= max(seqs):
                store.add_sequence()
        for store, backend in ((theirs, "reference"), (ours, "auto")):  # the PyTorch store, the op
            monkeypatch.setenv(functional.BACKEND_ENV, backend)
            store.update(k, v, seqs=seqs)
            if flush:
                store.compress_full_chunks(seqs)
        a, b = _held(ours), _held(theirs)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after writing {seqs}"
    assert int(ours.view().n_chunks.sum()) >= 6  # pages were really written
    if flush:  # 74 updates, and the flushes that compressed went through the op
        assert len(calls) > 74
        assert max(ours._buf_len) < 64 + cfg.sinks  # at rest: less than a chunk past the sinks
    else:
        assert len(calls) == 74 and sum(n for jobs in calls for _, _, n, _ in jobs) >= 6  # by the op
    if window is not None:
        assert int(ours.view().chunk_base.max()) > 0  # and released


def test_pre_rope_store_writes_the_same_bytes(monkeypatch):
    assert cpu_ops.load()
    cfg = KVQuantConfig(pre_rope=True)
    ours, theirs = (QuantizedKVLayer([4, 2], 64, cfg, rope=_rope) for _ in range(2))
    for seqs, k, v in _steps(2, seed=3):
        for store in (ours, theirs):
            while len(store.sequences) <= max(seqs):
                store.add_sequence()
        monkeypatch.setenv(functional.BACKEND_ENV, "reference")
        theirs.update(k, v, seqs=seqs)
        monkeypatch.setenv(functional.BACKEND_ENV, "auto")
        ours.update(k, v, seqs=seqs)
    a, b = _held(ours), _held(theirs)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_append_op_refuses_malformed_input_by_name():
    assert cpu_ops.load()
    store = QuantizedKVLayer([4, 4], 64, KVQuantConfig())
    store.update(torch.randn(1, 2, 70, 64), torch.randn(1, 2, 70, 64))
    k = torch.randn(1, 2, 1, 64)
    buf = store._buf
    with pytest.raises(RuntimeError, match="rows"):  # a write past the buffer
        cpu_ops.append(k, k, [0], [10_000], buf, [], torch.zeros(0, dtype=torch.long),
                       store._pools, store.cfg)
    with pytest.raises(RuntimeError, match="pages"):  # a chunk without a page
        cpu_ops.append(k, k, [0], [6], buf, [(0, 0, 1, 6)], torch.zeros(0, dtype=torch.long),
                       store._pools, store.cfg)
    with pytest.raises(RuntimeError, match="outside the pools"):
        cpu_ops.append(k, k, [0], [6], buf, [(0, 0, 1, 6)], torch.tensor([99_999]),
                       store._pools, store.cfg)
    with pytest.raises(RuntimeError, match="k and v"):
        cpu_ops.append(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64), [0], [6], buf, [],
                       torch.zeros(0, dtype=torch.long), store._pools, store.cfg)
