"""transformers integration: the ``"turbo"`` attention function, ``TurboCache`` and the bytes it
holds, model loading (bundled SmolLM2, local dirs, GGUF files), text data, calibration and
evaluation. Builds on ``turbo_core.attention``; nothing here imports MLflow or the pipeline."""
