"""Reference attention in pure PyTorch: the ground truth for the Triton kernels.

``attention_reference`` reproduces the approximate TurboAttention math exactly (SAS exponent,
INT8 Q·Kᵀ, INT8 P·V, top-k sparsity) and, with every switch off, is exact softmax attention.
It works on the whole score row at once, i.e. with the final row max; a tiled kernel using a
running max differs from it only by the rounding of its rescales.

Shapes: ``q (B, H_q, L_q, D)``, ``k (B, H_kv, L_k, D)``, ``v (B, H_kv, L_k, D_v)`` with
``H_q % H_kv == 0`` (GQA: query head ``h`` reads KV head ``h // (H_q / H_kv)``).
Causal masking is aligned bottom-right: query ``i`` sees keys ``j <= i + L_k - L_q``; a sliding
``window`` (transformers' ``sliding_window``) also drops keys ``j <= i + L_k - L_q - window``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch

from turbo_core.attention import sas as sas_mod
from turbo_core.attention.config import EXACT, AttentionMath, SASConfig
from turbo_core.attention.packed import PackedKV, int8_rows, positions, visible
from turbo_core.attention.quant import Int8Rows, quantize_int8_blockwise

# int8 x int8 products summed over D stay integers below 2^24 (exact in float32) while
# 127 * 127 * D < 2^24, i.e. D <= 1040.
MAX_INT8_HEAD_DIM = 1024
P_LEVELS = 127  # fixed INT8 grid for probabilities in [0, 1]


@dataclass
class AttentionResult:
    """Output and diagnostics of one reference attention call.

    Attributes:
        out: ``(B, H_q, L_q, D_v)`` in the query dtype.
        probs: normalised weights ``(B, H_q, L_q, L_k)`` float32, when requested.
        sas_dropped: weights SAS set to zero (count over all valid positions).
        candidates: valid (unmasked, kept by top-k) positions.
    """

    out: torch.Tensor
    probs: torch.Tensor | None
    sas_dropped: int
    candidates: int

    @property
    def sas_zero_fraction(self) -> float:
        return self.sas_dropped / self.candidates if self.candidates else 0.0


KV = torch.Tensor | Int8Rows


class AttentionOptions(TypedDict, total=False):
    """The keyword options every attention entry point takes; see :func:`attention_details`."""

    math_cfg: AttentionMath
    causal: bool
    scale: float | None
    mask: torch.Tensor | None
    window: int | None
    dropout_p: float
    need_probs: bool
    features: torch.Tensor | None  # FAVOR+'s (m, D) random features (kernel attention)
    seq_proj: tuple[torch.Tensor, torch.Tensor] | None  # Linformer's (E, F) (low-rank)


def check_shapes(q: torch.Tensor, k: KV, v: KV) -> None:
    """Raise ``ValueError`` naming the problem for malformed attention operands."""
    kt = k.values if isinstance(k, Int8Rows) else k
    vt = v.values if isinstance(v, Int8Rows) else v
    for name, t in (("query", q), ("key", kt), ("value", vt)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, L, D), got shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"query must be floating point, got {q.dtype}")
    b, hq, _, d = q.shape
    if kt.shape[0] != b or vt.shape[0] != b:
        raise ValueError(f"batch mismatch: query {b}, key {kt.shape[0]}, value {vt.shape[0]}")
    hkv = kt.shape[1]
    if vt.shape[1] != hkv:
        raise ValueError(f"key has {hkv} heads but value has {vt.shape[1]}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"head count mismatch: {hq} query heads is not a multiple of {hkv} key/value heads"
        )
    if kt.shape[3] != d:
        raise ValueError(f"head_dim mismatch: query {d}, key {kt.shape[3]}")
    if kt.shape[2] != vt.shape[2]:
        raise ValueError(f"key length {kt.shape[2]} differs from value length {vt.shape[2]}")


def _valid_mask(
    lq: int, lk: int, causal: bool, device: torch.device, window: int | None = None
) -> torch.Tensor | None:
    if window is not None and not causal:
        raise ValueError("a sliding window is defined for causal attention only (causal=True)")
    if not causal:
        return None
    keys = torch.arange(lk, device=device)
    return visible(keys, keys[lk - lq:], window)  # (L_q, L_k)


def _scores(q: torch.Tensor, k: KV, math_cfg: AttentionMath, work: torch.dtype) -> torch.Tensor:
    """Q·Kᵀ per (B, H_kv, group, L_q, L_k), exact or INT8."""
    b, hq, lq, d = q.shape
    hkv = (k.values if isinstance(k, Int8Rows) else k).shape[1]
    g = hq // hkv
    if math_cfg.qk_int8:
        if d > MAX_INT8_HEAD_DIM:
            raise ValueError(f"INT8 Q·Kᵀ supports head_dim <= {MAX_INT8_HEAD_DIM}, got {d}")
        qi = quantize_int8_blockwise(q, math_cfg.block_size)
        if isinstance(k, Int8Rows):
            ki = k  # already quantized (KV cache): its layout decides any smoothing
        else:
            if math_cfg.smooth_k:
                k = k - k.float().mean(dim=-2, keepdim=True).to(k.dtype)
            ki = quantize_int8_blockwise(k, math_cfg.block_size)
        qv = qi.values.to(work).reshape(b, hkv, g, lq, d)
        kv = ki.values.to(work).unsqueeze(2)  # (B, H_kv, 1, L_k, D)
        acc = qv @ kv.transpose(-1, -2)  # exact int32 sums, held in float
        s_q = qi.scale.to(work).reshape(b, hkv, g, lq, 1)
        s_k = ki.scale.to(work).unsqueeze(2).unsqueeze(-2)  # (B, H_kv, 1, 1, L_k)
        return acc * s_q * s_k
    kf = k.dequantize(work) if isinstance(k, Int8Rows) else k.to(work)
    return q.to(work).reshape(b, hkv, g, lq, d) @ kf.unsqueeze(2).transpose(-1, -2)


def attention_details(
    q: torch.Tensor,
    k: KV,
    v: KV,
    *,
    math_cfg: AttentionMath = EXACT,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    window: int | None = None,
    dropout_p: float = 0.0,
    need_probs: bool = False,
) -> AttentionResult:
    """Reference attention with diagnostics (see module docstring for shapes).

    Args:
        k, v: float tensors, or :class:`Int8Rows` already quantized (e.g. from the KV cache).
        math_cfg: which approximations to apply.
        scale: softmax scale, default ``1 / sqrt(D)``.
        mask: bool (True = may attend) or float additive bias, broadcastable to
            ``(B, H_q, L_q, L_k)``; ``-inf`` in a float mask also removes the key.
        window: sliding window with ``causal`` (query ``i`` sees ``window`` keys up to its own).
        dropout_p: dropout on the normalised weights (training only; callers pass 0 in eval).
        need_probs: also return the normalised weights.
    """
    check_shapes(q, k, v)
    if math_cfg.structural:
        raise ValueError("kernel and low-rank attention are not softmax approximations of this "
                         "reference; call turbo_core.attention.functional.turbo_attention")
    b, hq, lq, d = q.shape
    kt = k.values if isinstance(k, Int8Rows) else k
    hkv, lk = kt.shape[1], kt.shape[2]
    g = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    s = _scores(q, k, math_cfg, work) * scale  # (B, H_kv, g, L_q, L_k)
    s = s.reshape(b, hq, lq, lk)
    valid = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=q.device)
    causal_mask = _valid_mask(lq, lk, causal, q.device, window)
    if causal_mask is not None:
        valid = valid & causal_mask
    if mask is not None:
        if mask.dtype == torch.bool:
            valid = valid & mask
        else:
            s = s + mask.to(work)  # a -inf bias removes the key; it stays non-finite below
    s = s.masked_fill(~valid, -math.inf)
    if math_cfg.sparse_ratio is not None:
        keep = max(1, math.ceil(math_cfg.sparse_ratio * lk))
        if keep < lk:
            kth = torch.topk(s, keep, dim=-1).values[..., -1:]
            s = s.masked_fill(s < kth, -math.inf)
    if math_cfg.top_p is not None:
        s = top_p_scores(s, math_cfg.top_p)
    valid = torch.isfinite(s)
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    x = s - row_max  # <= 0 where valid, -inf elsewhere

    dropped = 0
    if math_cfg.sas is not None:
        cut = head_cutoffs(math_cfg.sas, hq, q.device)
        p = sas_mod.sas_exp(x, math_cfg.sas, cut)
        dropped = int((sas_mod.sparsity_mask(x.masked_fill(~valid, 0.0), math_cfg.sas, cut)
                       & valid).sum())
    else:
        p = torch.exp(x)
    if math_cfg.pv_int8:
        p = torch.round(p * P_LEVELS).clamp_(0, P_LEVELS) / P_LEVELS
    denom = p.sum(dim=-1, keepdim=True)
    probs = p / torch.where(denom > 0, denom, torch.ones_like(denom))  # all-masked rows -> 0
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)

    if math_cfg.pv_int8 and not isinstance(v, Int8Rows):
        v = quantize_int8_blockwise(v, math_cfg.block_size)
    vf = v.dequantize(work) if isinstance(v, Int8Rows) else v.to(work)
    out = probs.reshape(b, hkv, g, lq, lk) @ vf.unsqueeze(2)
    out = out.reshape(b, hq, lq, vf.shape[-1]).to(q.dtype)
    return AttentionResult(
        out=out,
        probs=probs.float() if need_probs else None,
        sas_dropped=dropped,
        candidates=int(valid.sum()),
    )


def top_p_scores(s: torch.Tensor, top_p: float) -> torch.Tensor:
    """Scores ``(..., L_k)`` with every key outside each row's top-p set masked to ``-inf``: the
    smallest set of highest-scoring keys whose exact softmax mass reaches ``top_p`` (keys tied
    with the last one kept stay). Rows with no valid key stay as they are."""
    ordered = s.sort(dim=-1, descending=True).values
    mass = torch.softmax(ordered, dim=-1).nan_to_num(0.0)  # an all-masked row is NaN
    before = mass.cumsum(dim=-1) - mass  # mass of the keys ranked above each key
    count = (before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
    last = ordered.gather(-1, count - 1)
    return s.masked_fill(s < last, -math.inf)


def head_cutoffs(cfg: SASConfig, heads: int, device: torch.device
                 ) -> torch.Tensor | None:
    """``SASConfig.head_lut_max`` as a ``(1, H_q, 1, 1)`` tensor (``None`` without it)."""
    if cfg.head_lut_max is None:
        return None
    if len(cfg.head_lut_max) != heads:
        raise ValueError(f"SASConfig.head_lut_max has {len(cfg.head_lut_max)} cut-offs for "
                         f"{heads} query heads")
    return torch.tensor(cfg.head_lut_max, device=device).view(1, heads, 1, 1)


def attention_reference(q: torch.Tensor, k: KV, v: KV, **opts: Unpack[AttentionOptions]) -> torch.Tensor:
    """TurboAttention prefill reference; returns ``(B, H_q, L_q, D_v)`` in ``q.dtype``."""
    return attention_details(q, k, v, **opts).out


def attention_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    **opts: Unpack[AttentionOptions]) -> torch.Tensor:
    """Exact softmax attention in float64 (the quality reference); returns float64.
    ``math_cfg`` is refused: this is the yardstick the approximations are measured against."""
    if "math_cfg" in opts:
        raise ValueError("attention_exact takes no math_cfg (it is the exact reference)")
    return attention_details(q.double(), k.double(), v.double(), **opts).out


def decode_attention_reference(
    q: torch.Tensor,
    cache: PackedKV,
    *,
    math_cfg: AttentionMath = EXACT,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> AttentionResult:
    """Attention of the newest tokens over a quantized cache layer (packed pages + INT8 buffer),
    read through its tensor-only view; sequences may have different lengths.

    The new tokens must already be appended to the cache. K and V come out of the integer-only
    partial decompression as INT8 rows; with ``math_cfg.qk_int8`` they feed the INT8 Q·Kᵀ
    directly, otherwise they are dequantized to float first. Each key is masked by its token
    position (``packed.positions``): causal, and inside the view's sliding window.

    Args:
        q: ``(B, H_q, L_q, D)`` queries of the newest ``L_q`` tokens of each of the view's
            ``B`` sequences; causal among themselves, bottom-right aligned with the cache.
        mask: optional, in token order: bool (True = attend) or additive float, broadcastable
            to ``(B, H_q, L_q, S)`` with ``S`` >= every sequence's length (e.g. padding from
            transformers); applied on top of causality and the window.
    """
    if q.dim() != 4:
        raise ValueError(f"query must have rank 4 (B, H, L, D), got shape {tuple(q.shape)}")
    if q.shape[0] != cache.batch:
        raise ValueError(f"query batch {q.shape[0]} but the cache view holds {cache.batch} sequences")
    if q.shape[2] > min(cache.seq_lens):
        raise ValueError(f"{q.shape[2]} queries but a sequence holds only {min(cache.seq_lens)} tokens")
    parts = []
    lq = q.shape[2]
    for b in range(cache.batch):
        k, v = int8_rows(cache, b)
        k, v = (Int8Rows(r.values.unsqueeze(0), r.scale.unsqueeze(0)) for r in (k, v))
        pos = positions(cache, b)
        valid = visible(pos, pos.max() - lq + 1 + torch.arange(lq, device=pos.device),
                        cache.window)[None, None]  # (1, 1, L_q, L)
        parts.append(attention_details(q[b:b + 1], k, v, math_cfg=math_cfg, scale=scale,
                                       mask=_with_mask(valid, mask, b, pos)))
    return AttentionResult(out=torch.cat([r.out for r in parts]), probs=None,
                           sas_dropped=sum(r.sas_dropped for r in parts),
                           candidates=sum(r.candidates for r in parts))


def _with_mask(valid: torch.Tensor, mask: torch.Tensor | None, b: int,
               pos: torch.Tensor) -> torch.Tensor:
    """``valid`` bool ``(1, 1, L_q, L)`` combined with row ``b`` of a token-order ``mask``
    (bool or additive float, last axis indexed by position), its columns taken at ``pos``."""
    if mask is None:
        return valid
    if mask.shape[-1] <= int(pos.max()):
        raise ValueError(f"attention mask covers {mask.shape[-1]} keys but the sequence holds "
                         f"position {int(pos.max())}")
    cols = mask[b: b + 1] if mask.shape[0] > 1 else mask
    cols = cols.index_select(-1, pos.to(mask.device))
    if cols.dtype == torch.bool:
        return valid & cols
    return cols.masked_fill(~valid, -math.inf)
