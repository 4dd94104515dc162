"""Functional TurboAttention API: the single place that picks an implementation.

Today every call runs the pure-PyTorch reference (``turbo_core.reference``); the Triton
kernels plug in here (issue: kernels) so modules and models never choose a backend themselves.
"""

from __future__ import annotations

import torch

from turbo_core.config import EXACT, AttentionMath
from turbo_core.reference import KV, AttentionResult, attention_details


def turbo_attention(
    q: torch.Tensor,
    k: KV,
    v: KV,
    *,
    math_cfg: AttentionMath = EXACT,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    need_probs: bool = False,
) -> AttentionResult:
    """TurboAttention over ``q (B, H_q, L_q, D)``, ``k, v (B, H_kv, L_k, D)``.

    See :func:`turbo_core.reference.attention_details` for the arguments.
    """
    return attention_details(
        q, k, v, math_cfg=math_cfg, causal=causal, scale=scale, mask=mask,
        dropout_p=dropout_p, need_probs=need_probs,
    )


def backend_name() -> str:
    """The implementation :func:`turbo_attention` runs on this machine."""
    return "reference"
