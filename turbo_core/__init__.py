"""TurboAttention: SAS softmax approximation and progressive KV/attention quantization.

The package import is deliberately light (no torch): Airflow parses DAG files that import
``turbo_core`` submodules. Import the submodules you need, e.g. ``turbo_core.attention.reference``.
"""

__version__ = "0.1.0"
