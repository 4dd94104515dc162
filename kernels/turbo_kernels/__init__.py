"""Triton kernels for TurboAttention (import name ``turbo_kernels``).

This folder is deliberately reached as ``turbo_kernels``, never as ``kernels``: PyPI has an
unrelated ``kernels`` distribution that transformers probes for, and ``kernels/`` itself has
no ``__init__.py``, so from the repository root it is at most an empty namespace, which
transformers' probe rejects (tested in ``tests/test_packaging.py``).

Each kernel lives in one file with its launcher and is tested against the pure-PyTorch
reference in ``turbo_core.attention.reference`` (the kernels arrive with the kernels issue).
"""
