"""The method (docs/design.md §1): configs and variants, SAS, quantization, the packed KV cache and its
tensor-only view, the pure-PyTorch references, the functional API with its one backend
dispatch, the ``TurboAttention`` module, head priority and bit plans. Depends on torch only
(never on transformers, MLflow or the pipeline)."""
