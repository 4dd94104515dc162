"""What of a model's attention the ``turbo`` path serves, read from its transformers config.

* :func:`layer_windows` — each layer's sliding window as transformers applies it: a config with
  ``layer_types`` gives ``sliding_window`` to its ``"sliding_attention"`` layers (Gemma 2/3,
  Qwen2/3, GPT-OSS); one without gives it to every layer when it is set (Mistral, Phi-3 build
  ``create_sliding_window_causal_mask`` whenever ``config.sliding_window`` is not ``None``).
* :func:`check_supported` — refuses by name, when a variant is applied to a model, every
  attention feature the turbo path does not implement, instead of serving wrong answers:
  logit soft-capping, ALiBi, non-causal (bidirectional) attention, chunked attention, and layer
  types other than full and sliding attention.
"""

from __future__ import annotations

SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")


def text_config(config: object) -> object:
    """The text part of a transformers config (itself for a text-only model)."""
    return getattr(config, "get_text_config", lambda: config)()


def layer_windows(config: object) -> tuple[int | None, ...]:
    """The sliding window of each layer (``None``: full attention), as transformers masks it."""
    text = text_config(config)
    n = text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        return (window,) * n
    if len(types) != n:
        raise ValueError(f"config.layer_types names {len(types)} layers but the model has {n}")
    unknown = sorted({t for t in types if t not in SERVED_LAYER_TYPES})
    if unknown:
        raise ValueError(f"layer types {unknown} are not served by TurboAttention (it serves "
                         f"{', '.join(SERVED_LAYER_TYPES)})")
    if "sliding_attention" in types and window is None:
        raise ValueError("config.layer_types has sliding_attention layers but no sliding_window")
    return tuple(window if t == "sliding_attention" else None for t in types)


def unsupported(model: object) -> list[str]:
    """The attention features of ``model`` that the turbo path does not implement, named."""
    text = text_config(model.config)
    found = []
    if getattr(text, "attn_logit_softcapping", None) is not None:
        found.append(f"attention logit soft-capping (attn_logit_softcapping="
                     f"{text.attn_logit_softcapping})")
    attn_config = getattr(text, "attn_config", None)
    if getattr(text, "alibi", False) or getattr(attn_config, "alibi", False) or \
            getattr(text, "model_type", "") in ("bloom", "mpt"):
        found.append("ALiBi position biases")
    if getattr(text, "use_bidirectional_attention", False) or not getattr(text, "is_causal", True):
        found.append("non-causal (bidirectional) attention")
    if getattr(text, "attention_chunk_size", None) is not None:
        found.append(f"chunked attention (attention_chunk_size={text.attention_chunk_size})")
    try:
        windows = layer_windows(model.config)
    except ValueError as exc:
        found.append(str(exc))
        windows = None
    from turbo_core.hf.attention import attention_modules

    for m in attention_modules(model):
        if not getattr(m, "is_causal", True):
            found.append(f"non-causal attention in layer {m.layer_idx} ({type(m).__name__})")
            break
        own = getattr(m, "sliding_window", None)
        if windows is not None and hasattr(m, "sliding_window") and own != windows[m.layer_idx]:
            found.append(f"layer {m.layer_idx}'s sliding_window {own} differs from the config's "
                         f"{windows[m.layer_idx]}")
            break
    return found


def check_supported(model: object) -> None:
    """Raise ``ValueError`` naming each attention feature of ``model`` the turbo path would
    otherwise silently ignore."""
    found = unsupported(model)
    if found:
        raise ValueError(f"{type(model).__name__} uses attention features TurboAttention does not "
                         f"implement: {'; '.join(found)}; it cannot be served with a turbo variant")
