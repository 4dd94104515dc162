"""OpenAI-compatible serving of a TurboAttention variant (``turbo serve``)."""
