"""Request bodies of the OpenAI-compatible endpoints (pydantic), validated with messages that
name the field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool


def _json_number(value: object) -> object:
    """JSON's numbers only: a string or a boolean is refused as the schema says, where pydantic's
    lax mode would read ``"5"`` as 5 and ``true`` as 1 (an integral ``1.0`` stays an integer,
    as JSON Schema counts it)."""
    if isinstance(value, str | bool):
        raise ValueError(f"must be a JSON number, got {type(value).__name__}")
    return value


def _number(kind: type, **bounds: float) -> object:
    """``kind`` from a JSON number only, within ``bounds`` (which the schema states: they come
    before the validator, or pydantic would write them as unknown keywords)."""
    return Annotated[kind, Field(**bounds), BeforeValidator(_json_number)]

Text = Annotated[str, Field(min_length=1)]
SEED_MAX = 2**53 - 1  # the largest integer a JSON number holds exactly (a double)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: _number(int, ge=1) | None = None
    temperature: _number(float, ge=0.0, le=2.0) = 0.0
    top_p: _number(float, gt=0.0, le=1.0) = 1.0
    n: Literal[1] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: _number(int, ge=0, le=SEED_MAX) | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    # vLLM's extension: generate max_tokens whatever the model says
    ignore_eos: StrictBool = False

    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 16

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    # one prompt per request: a string, or a list holding exactly one (as OpenAI clients send)
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: _number(int, ge=1) | None = None

    def max_new_tokens(self) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_new_tokens()


class ErrorDetail(BaseModel):
    message: str
    type: str


class ErrorBody(BaseModel):
    """Every error the server answers (OpenAI's shape)."""

    error: ErrorDetail
