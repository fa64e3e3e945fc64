"""What a client may send: the OpenAI request bodies moalign accepts, and the errors it answers with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moalign.data import ASSISTANT as HH_ASSISTANT
from moalign.data import HUMAN as HH_HUMAN

MAX_SEED = 2**62


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style `{"error": {...}}` answer."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its client turns into the matching exception class."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class RequestBase(BaseModel):
    """Fields both endpoints share; unknown OpenAI fields are ignored, unsupported behaviours refused."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    preference: list[float] | dict[str, float] | str | None = None


class CompletionRequest(RequestBase):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def message_text(message: ChatMessage | dict[str, Any]) -> str:
    """A message's text: a string, or the text parts of a content list (other parts are refused)."""
    content = message.content if isinstance(message, ChatMessage) else message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"message content part of type {part.get('type')!r} is not supported; send text")
        texts.append(part["text"])
    return "".join(texts)


def render_chat(messages: Sequence[ChatMessage | dict[str, Any]], tokenizer: Any = None) -> str:
    """Chat messages as one prompt: the tokenizer's chat template if it has one, else the HH format.

    The HH format ("\\n\\nHuman: …\\n\\nAssistant:") is what the Anthropic HH data the methods train on
    looks like; a system message becomes a preamble before the first turn.
    """
    plain = [
        {"role": m.role if isinstance(m, ChatMessage) else m["role"], "content": message_text(m)} for m in messages
    ]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # templates raise their own errors, e.g. on roles out of order
            raise ApiError(400, f"the model's chat template refused these messages: {error}", "messages") from None
    parts = []
    for message in plain:
        role, text = message["role"], message["content"].strip()
        if role in {"system", "developer"}:
            parts.append(text)
        else:
            parts.append(f"{HH_HUMAN if role == 'user' else HH_ASSISTANT} {text}")
    return "".join(parts) + HH_ASSISTANT


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """Pydantic's errors as one line that names each field to fix."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        where = ".".join(str(x) for x in error.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {error.get('msg')}")
    return "; ".join(parts[:5])
