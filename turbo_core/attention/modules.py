"""``TurboAttention``: a drop-in for ``torch.nn.MultiheadAttention``, and a small block using it.

Same constructor arguments, parameter names (``in_proj_weight``, ``out_proj`` ...), ``forward``
signature and return value as ``nn.MultiheadAttention``, so a trained MHA's ``state_dict``
loads unchanged. The attention itself goes through :func:`turbo_core.attention.functional.turbo_attention`
with a configurable :class:`~turbo_core.attention.config.AttentionMath` (default: SAS + INT8 Q·Kᵀ).

Training: the approximations are for inference. INT8 rounding has no useful derivative (Q and K
would learn only through their scales) and top-k / top-p sparsity none for the keys they drop, so
in training mode with gradients enabled the module computes exact softmax attention, dropout
included: a step of training matches ``nn.MultiheadAttention`` with the same weights. In eval
mode (or under ``torch.no_grad()``) it applies ``math_cfg``.

Kernel attention (``math_cfg.kernel``) and low-rank attention (``math_cfg.low_rank``) are
different layers, not approximations: they train and run as themselves. Low-rank adds the
parameters ``seq_proj.0`` / ``seq_proj.1`` (Linformer's E and F) and FAVOR+ the buffer
``features``, so an ``nn.MultiheadAttention`` state_dict loads with ``strict=False``.
Their ``attn_weights``: kernel attention's implied weights ``(N, L, S)``; low-rank attention's
over its ``r`` projected rows ``(N, L, r)``. FAVOR+'s features are redrawn every
``math_cfg.redraw_every`` training forwards (seeded by ``feature_seed`` and the draw's number,
so a run is reproducible) and stay fixed in eval.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core.attention import linear, lowrank
from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, FeatureMap
from turbo_core.attention.functional import turbo_attention


def _as_additive(mask: torch.Tensor, name: str) -> torch.Tensor:
    """MHA mask conventions: bool True = may NOT attend; float = added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(f"{name} must be bool or float, got {mask.dtype}")
    return mask.float()


class TurboAttention(nn.Module):
    """Multi-head attention with TurboAttention math; see ``nn.MultiheadAttention``. In training
    mode with gradients enabled it computes exact attention (the module docstring says why).

    Args (beyond ``nn.MultiheadAttention``'s):
        sparse_ratio: the source article's top-k sparsity, keep the top fraction of keys per
            query. ``None`` (default) keeps every key: a drop-in should not silently drop 90 %
            of the keys, which the article's default of 0.1 would.
        math_cfg: the approximations to apply (default SAS + INT8 Q·Kᵀ); ``sparse_ratio``
            overrides its field of the same name. Top-p sparsity, a piecewise SAS exponent,
            per-head cut-offs, kernel and low-rank attention are its fields too.
        feature_seed: seeds FAVOR+'s random features (with the draw's number).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        sparse_ratio: float | None = None,
        math_cfg: AttentionMath | None = None,
        feature_seed: int = 0,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim}, {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if add_bias_kv or add_zero_attn:
            raise ValueError("TurboAttention does not support add_bias_kv / add_zero_attn")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        cfg = math_cfg or TURBO_DEFAULT
        if sparse_ratio is not None:
            cfg = dataclasses.replace(cfg, sparse_ratio=sparse_ratio)
        self.math_cfg = cfg
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        kw = {"device": device, "dtype": dtype}
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **kw))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **kw))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **kw))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()
        self.seq_proj = None
        if cfg.low_rank is not None:
            self.seq_proj = lowrank.init_projections(cfg.low_rank, cfg.max_seq_len, **kw)
        self.feature_seed, self._draws, self._forwards = feature_seed, 0, 0
        if cfg.kernel is not None and dropout > 0.0:
            raise ValueError("kernel attention forms no attention matrix to drop out; use dropout=0")
        if cfg.kernel is FeatureMap.FAVOR:
            self.register_buffer("features", self._draw(device, dtype))

    def _draw(self, device, dtype) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.feature_seed * 1_000_003 + self._draws)
        feats = linear.draw_features(self.math_cfg.num_features, self.head_dim, generator=gen)
        return feats.to(device=device, dtype=dtype or torch.get_default_dtype())

    def _structural_opts(self, training: bool) -> dict:
        """Kernel / low-rank attention's extra operands; a training forward counts towards
        FAVOR+'s next redraw."""
        cfg = self.math_cfg
        if cfg.kernel is FeatureMap.FAVOR and training:
            every = cfg.redraw_every
            if every and self._forwards and self._forwards % every == 0:
                self._draws += 1
                self.features.copy_(self._draw(self.features.device, self.features.dtype))
            self._forwards += 1
        return {"features": getattr(self, "features", None),
                "seq_proj": None if self.seq_proj is None else tuple(self.seq_proj)}

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 same: bool = False):
        """q, k, v projections; ``same`` (self-attention: one tensor passed three times) takes
        them in one GEMM against the whole ``in_proj_weight``, as ``nn.MultiheadAttention``'s
        fast path does (one read of the input, one 3E-wide product)."""
        e = self.embed_dim
        if same and self._qkv_same_embed_dim:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(e, dim=-1)
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as ``nn.MultiheadAttention.forward``.

        ``query (L, N, E)`` (or ``(N, L, E)`` with ``batch_first``, or unbatched ``(L, E)``),
        ``key (S, N, kdim)``, ``value (S, N, vdim)``. Returns ``(attn_output, attn_weights)``
        with weights ``(N, L, S)`` (averaged) or ``(N, H, L, S)``, ``None`` unless
        ``need_weights``. ``is_causal`` without ``attn_mask`` applies a causal mask.
        """
        same = query is key and key is value  # before the views below part them
        unbatched = query.dim() == 2
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must have the same rank, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now (L, N, E) / (S, N, kdim) / (S, N, vdim)
        tgt_len, bsz, e = query.shape
        src_len = key.shape[0]
        if e != self.embed_dim:
            raise ValueError(f"query embed dim {e} differs from embed_dim {self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key/value dims {key.shape[-1]}/{value.shape[-1]} differ from "
                             f"kdim/vdim {self.kdim}/{self.vdim}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != bsz:
            raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match "
                             f"query batch {bsz}")
        q, k, v = self._project(query, key, value, same)
        h, d = self.num_heads, self.head_dim
        # (L, N, H*d) -> (N, H, L, d)
        q = q.reshape(tgt_len, bsz, h, d).permute(1, 2, 0, 3)
        k = k.reshape(src_len, bsz, h, d).permute(1, 2, 0, 3)
        v = v.reshape(src_len, bsz, h, d).permute(1, 2, 0, 3)

        bias = None
        if attn_mask is not None:
            am = _as_additive(attn_mask, "attn_mask")
            if am.dim() == 2 and am.shape == (tgt_len, src_len):
                bias = am.view(1, 1, tgt_len, src_len)
            elif am.dim() == 3 and am.shape == (bsz * h, tgt_len, src_len):
                bias = am.view(bsz, h, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} must be "
                                 f"({tgt_len}, {src_len}) or ({bsz * h}, {tgt_len}, {src_len})")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise ValueError(f"key_padding_mask shape {tuple(key_padding_mask.shape)} must be "
                                 f"({bsz}, {src_len})")
            kpm = _as_additive(key_padding_mask, "key_padding_mask").view(bsz, 1, 1, src_len)
            bias = kpm if bias is None else bias + kpm
        causal = is_causal and attn_mask is None
        training = self.training and torch.is_grad_enabled()  # exact math: see the module doc
        cfg, extra = self.math_cfg, {}
        if cfg.structural:
            extra = self._structural_opts(training)
        elif training:
            cfg = EXACT
        res = turbo_attention(
            q, k, v, math_cfg=cfg, causal=causal, mask=bias,
            dropout_p=self.dropout if self.training and cfg.kernel is None else 0.0,
            need_probs=need_weights, **extra,
        )
        out = res.out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, e)  # (L, N, E)
        out = self.out_proj(out)
        weights = None
        if need_weights:
            weights = res.probs.to(out.dtype)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with :class:`TurboAttention` (batch first).

    ``forward(x (N, L, E), attn_mask=None, key_padding_mask=None, is_causal=False) -> (N, L, E)``
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        ff_dim: int | None = None,
        dropout: float = 0.0,
        *,
        sparse_ratio: float | None = None,
        math_cfg: AttentionMath | None = None,
        feature_seed: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = TurboAttention(embed_dim, num_heads, dropout=dropout, batch_first=True,
                                   sparse_ratio=sparse_ratio, math_cfg=math_cfg,
                                   feature_seed=feature_seed)
        self.norm2 = nn.LayerNorm(embed_dim)
        ff_dim = ff_dim or 4 * embed_dim
        self.ff = nn.Sequential(nn.Linear(embed_dim, ff_dim), nn.GELU(),
                                nn.Linear(ff_dim, embed_dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        y = self.norm1(x)
        a, _ = self.attn(y, y, y, key_padding_mask=key_padding_mask, need_weights=False,
                         attn_mask=attn_mask, is_causal=is_causal)
        x = x + a
        return x + self.ff(self.norm2(x))
