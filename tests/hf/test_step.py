"""The decode step through the step op (``turbo_core.hf.step``), eager and compiled, on tiny
random models: Llama with GQA 3, Qwen2 with sliding layers, Gemma-3 with sliding and full
layers mixed (windows of 40, shorter than the sequences), two ragged sequences decoded together
past a page boundary (chunk 64, 16 sinks).

* Eager through the op == transformers' forward over the ``TurboCache``, bit for bit (logits
  and every cache tensor): the op runs the same store code and kernels.
* Compiled: the float cache to 1e-4 (Inductor's fused norms round differently); a packed cache
  quantizes those roundings again (a code flips now and then), so compiled and eager are held
  to each other by top-1 and KL, against the quantization's own KL from the float cache.
* The compiled forward is one graph without a break.
"""

from pathlib import Path

import pytest
import torch
import transformers as tf

from turbo_core.attention.rotation import rotation
from turbo_core.attention.variants import get_variant
from turbo_core.hf.models import LoadedModel, shape_of
from turbo_core.hf.runner import CacheRunner, compile_default
from turbo_core.hf.step import StepContext, _model_forward, active, attend, compile_options

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=192, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=4096)
FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, use_sliding_window=True,
                                                        sliding_window=40, max_window_layers=1)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **COMMON, sliding_window=40, query_pre_attn_scalar=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}
LENGTHS = (70, 37)  # prompts; 60 steps take both past a page (16 sinks + 64)
STEPS = 60


def tiny(family: str, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    return LoadedModel(model, None, f"tiny-{family}", Path("."), shape_of(model.config, family))


@pytest.fixture(scope="module", params=list(FAMILIES))
def lm(request):
    return tiny(request.param)


def decode(runner: CacheRunner, forward, steps: int = STEPS):
    """Logits ``(steps, 2, vocab)`` of two prompts prefilled, then decoded together by
    ``forward`` on fixed tokens (teacher forcing: both paths see the same inputs), and the cache."""
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (n + steps,), generator=gen).tolist() for n in LENGTHS]
    runner.activate()
    cache = runner.new_cache()
    seqs = [cache.add_sequence() for _ in LENGTHS]
    for s, n, x in zip(seqs, LENGTHS, ids, strict=True):
        runner.forward_cache(cache, [s], [x[:n]], [0])
    out = []
    for i in range(steps):
        at = [n + i for n in LENGTHS]
        out.append(forward(cache, seqs, [[x[p]] for x, p in zip(ids, at, strict=True)], at))
    return torch.stack(out), cache


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


@pytest.mark.parametrize("variant", ["fp16", "turbo-int4", "turbo-mix"])
def test_eager_step_is_the_transformers_forward_bit_for_bit(lm, variant, monkeypatch):
    """The step op's one-call path (``turbo.decode_step`` / ``float_decode_step``, taken by most
    layers' steps, counted) and its Python-planned steps in between give transformers' forward."""
    from turbo_kernels import cpu_ops

    v = get_variant(variant)
    plan = None
    if v.needs_calibration:
        from tests.hf.test_sliding_window import _plan

        plan = _plan(lm, v)
    runner = CacheRunner(lm, v, plan, torch.device("cpu"), compile=False)
    name = "decode_step" if v.quantized_cache else "float_decode_step"
    calls, real = [], getattr(cpu_ops, name)
    monkeypatch.setattr(cpu_ops, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    got, cache = decode(runner, runner.forward)
    assert len(calls) >= STEPS * len(cache.layers) // 2, len(calls)  # most layer-steps: one call
    want, ref = decode(runner, runner.forward_cache)
    assert torch.equal(got, want), (got - want).abs().max()
    cache.flush()
    ref.flush()  # at rest: the step path compresses in its next append, the reference after each forward
    for a, b in zip(cache.layers, ref.layers, strict=True):  # what each sequence holds
        assert a.store.seq_lens() == b.store.seq_lens()
        assert a.store.nbytes() == b.store.nbytes()
        for s in cache.sequences:
            assert torch.equal(a.store.positions(s), b.store.positions(s))
            for x, y in zip(a.store.keys_values(s), b.store.keys_values(s), strict=True):
                assert torch.equal(x, y)


@pytest.mark.parametrize("variant", ["fp16", "turbo-int4"])
def test_compiled_step_matches_the_eager_step(lm, variant):
    runner = CacheRunner(lm, get_variant(variant), None, torch.device("cpu"), compile=True)
    compiled, _ = decode(runner, runner.forward)
    eager_runner = CacheRunner(lm, get_variant(variant), None, torch.device("cpu"), compile=False)
    eager, _ = decode(eager_runner, eager_runner.forward)
    if variant == "fp16":
        assert (compiled - eager).abs().max() <= 1e-4
        return
    floats = CacheRunner(lm, get_variant("fp16"), None, torch.device("cpu"), compile=False)
    exact, _ = decode(floats, floats.forward)
    top1 = (compiled.argmax(-1) == eager.argmax(-1)).float().mean().item()
    drift, quantization = kl(eager, compiled), kl(exact, eager)
    assert top1 >= 0.95 and drift <= 0.25 * quantization, (top1, drift, quantization)


def test_the_compiled_forward_is_one_graph(lm):
    runner = CacheRunner(lm, get_variant("turbo-int4"), None, torch.device("cpu"), compile=False)
    cache = runner.new_cache()
    seqs = [cache.add_sequence() for _ in range(2)]
    for s in seqs:
        runner.forward_cache(cache, [s], [[1, 2, 3]], [0])
    cache.select(seqs)
    torch._dynamo.reset()
    with torch.no_grad(), active(StepContext(cache, runner.variant.math)):
        explained = torch._dynamo.explain(_model_forward(lm.model, rotation(64)))(
            torch.tensor([[4], [5]]), torch.tensor([[3], [3]]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # the runner switched the linear layers: the step's projections are the streaming op
    targets = [n.target for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.turbo.linear) == 7 * 3 + 1, targets


def test_models_sharing_a_process_each_run_their_own_graph():
    """Guards are dropped, so each model's step must hold its own compiled code."""
    models = [tiny("llama", seed) for seed in (0, 1)]
    for lm in models:
        compiled = CacheRunner(lm, get_variant("fp16"), None, torch.device("cpu"), compile=True)
        eager = CacheRunner(lm, get_variant("fp16"), None, torch.device("cpu"), compile=False)
        got, _ = decode(compiled, compiled.forward, steps=3)
        want, _ = decode(eager, eager.forward, steps=3)
        assert (got - want).abs().max() <= 1e-4


def test_the_step_op_outside_a_step_says_so():
    x = torch.zeros(1, 2, 1, 64)
    with pytest.raises(RuntimeError, match="outside a step"):
        attend(x, x, x, 0, 0.125, False)


def test_one_compiled_step_serves_batch_one_then_more(lm):
    """Batch 1 is its own graph, larger batches share a symbolic one; a step never runs a
    graph made for another batch size."""
    compiled = CacheRunner(lm, get_variant("fp16"), None, torch.device("cpu"), compile=True)
    eager = CacheRunner(lm, get_variant("fp16"), None, torch.device("cpu"), compile=False)
    outs = []
    for runner in (compiled, eager):
        cache = runner.new_cache()
        seqs = [cache.add_sequence() for _ in range(3)]
        for s in seqs:
            runner.forward_cache(cache, [s], [[1, 2, 3, s]], [0])
        got = [runner.forward(cache, seqs[:1], [[7]], [4]),  # each at its own length
               runner.forward(cache, seqs[:2], [[7]] * 2, [5, 4]),
               runner.forward(cache, seqs, [[8]] * 3, [6, 5, 4])]
        outs.append(torch.cat(got))
    assert outs[0].shape == (6, VOCAB)
    assert (outs[0] - outs[1]).abs().max() <= 1e-4


def test_without_a_compiler_the_step_runs_eagerly_and_says_why(lm, monkeypatch, tmp_path, caplog):
    from turbo_core.hf.runner import compile_default

    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ here
    assert compile_default(torch.device("cpu")) == (False, (
        "no C++ compiler (g++/clang++) on PATH: decode steps run the step op eagerly (on "
        "SmolLM2 at batch 8 and 2k tokens, 5-10 % slower a step)"))
    with caplog.at_level("WARNING"):
        runner = CacheRunner(lm, get_variant("fp16"), None, torch.device("cpu"))
    assert not runner.compiled
    assert "decode steps not compiled: no C++ compiler" in caplog.text
    got, _ = decode(runner, runner.forward, steps=2)
    assert torch.isfinite(got).all()


def test_a_seeded_compile_cache_is_copied_before_the_first_compile(monkeypatch, tmp_path):
    from turbo_core.hf.step import compile_cache_dir

    seed = tmp_path / "seed"
    (seed / "ab").mkdir(parents=True)
    (seed / "ab" / "entry.so").write_bytes(b"compiled")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TURBO_INDUCTOR_SEED", str(seed))
    assert (compile_cache_dir() / "ab" / "entry.so").read_bytes() == b"compiled"
    (seed / "ab" / "entry.so").write_bytes(b"newer")  # a filled cache is never overwritten
    assert (compile_cache_dir() / "ab" / "entry.so").read_bytes() == b"compiled"


def test_the_compile_cache_goes_under_turbo_home_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from turbo_core.hf.step import compile_cache_dir

    monkeypatch.delenv("TURBO_INDUCTOR_SEED", raising=False)
    monkeypatch.setenv("TURBO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch sets itself
    assert compile_cache_dir() == tmp_path / "home" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_runners_sharing_a_model_switch_its_math_back_and_forth():
    """activate() after the first only resets each attention module's math: a prompt chunk run
    right after another runner's must use this runner's math, as a fresh model would."""
    lm = tiny("llama")
    sas = CacheRunner(lm, get_variant("turbo-int4"), None, torch.device("cpu"), compile=False)
    exact = CacheRunner(lm, get_variant("fp16"), None, torch.device("cpu"), compile=False)
    prompt = [[int(t) for t in torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(2))]]

    def prefill(runner):
        runner.activate()
        cache = runner.new_cache()
        return runner.forward_cache(cache, [cache.add_sequence()], prompt, [0])

    first_sas, first_exact = prefill(sas), prefill(exact)
    assert not torch.equal(first_sas, first_exact)  # the two maths differ on this prompt
    for _ in range(2):
        assert torch.equal(prefill(sas), first_sas) and torch.equal(prefill(exact), first_exact)
    lm.model.set_attn_implementation("sdpa")  # someone else switched the model away
    assert torch.equal(prefill(sas), first_sas)


def test_on_cuda_the_step_op_runs_outside_cuda_graphs():
    """What can be checked without a GPU (none is lent: issue 26): the CUDA step compiles with
    CUDA graphs, and the step op carries the tag that makes Inductor partition the graph around
    it — its Python planning must run every step, which a captured graph would not replay.
    CPU compiles without CUDA graphs; CUDA is not compiled unless asked."""
    assert torch._C.Tag.cudagraph_unsafe in attend.default.tags
    assert compile_options(torch.device("cuda"))["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in compile_options(torch.device("cpu"))
    on, why = compile_default(torch.device("cuda"))
    assert not on and "--compile" in why
