"""Answers in OpenAI's shapes: whole responses, stream chunks and server-sent events, for both endpoints.

Engines produce `Row`s (a whole answer per row) or `Piece`s (a row's next text, as it is generated);
`Formatter` turns either into `text_completion` or `chat.completion` objects, so completions and chat
share one path whatever engine generated the text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moalign.serve.schemas import ApiError, error_body

Kind = Literal["text", "chat"]


@dataclass
class Row:
    """One generated answer, engine-independent; `logprobs` is already in the endpoint's format."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: Any = None


@dataclass
class Piece:
    """The next text of row `row`; the row's last piece carries its finish reason and token counts."""

    row: int
    text: str
    logprobs: Any = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def token_pieces(tokenizer: Any, token_ids: Sequence[int], text: str) -> list[str]:
    """Split `text` into one piece per token for streaming; the pieces always join to `text`.

    Each token's new text is decoded with the previous token as context (so SentencePiece's leading
    spaces and multi-byte characters come out right); a token that ends inside a character yields "".
    """
    if tokenizer is None or not token_ids:
        return [text] if token_ids else []
    pieces: list[str] = []
    prefix = read = pos = 0
    for i in range(len(token_ids)):
        before = tokenizer.decode(token_ids[prefix:read], skip_special_tokens=True)
        now = tokenizer.decode(token_ids[prefix : i + 1], skip_special_tokens=True)
        new = now[len(before) :] if now.startswith(before) else ""
        if not new or new.endswith("\ufffd"):
            pieces.append("")
            continue
        if not text.startswith(new, pos):  # the text was cut at a stop string: give the rest and end
            pieces.append(text[pos:])
            pos = len(text)
            pieces += [""] * (len(token_ids) - i - 1)
            break
        pieces.append(new)
        pos += len(new)
        prefix, read = read, i + 1
    if pos < len(text):
        pieces[-1] += text[pos:]
    return pieces


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Formatter:
    """One request's answer objects: the same id, creation time, model and `moalign` block in each."""

    def __init__(self, kind: Kind, model: str, extension: dict[str, Any], n: int):
        self.kind, self.n = kind, n
        self.head: dict[str, Any] = {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
            "moalign": extension,
        }
        if kind == "chat":
            self.head["system_fingerprint"] = None

    def whole(self, rows: Sequence[Row]) -> dict[str, Any]:
        """The non-streaming answer; prompt tokens are counted once per prompt, not once per choice."""
        choices: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            if self.kind == "chat":
                message = {"role": "assistant", "content": row.text, "refusal": None}
                choices.append(
                    {"index": i, "message": message, "logprobs": row.logprobs, "finish_reason": row.finish_reason}
                )
            else:
                choices.append(
                    {"index": i, "text": row.text, "logprobs": row.logprobs, "finish_reason": row.finish_reason}
                )
        counts = usage(sum(r.prompt_tokens for r in rows[:: self.n]), sum(r.completion_tokens for r in rows))
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self.head, "object": obj, "choices": choices, "usage": counts}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self.head, "object": obj, "choices": choices, **extra}

    async def chunks(self, pieces: AsyncIterator[Piece], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks as the pieces arrive; a chat row opens with its role, every row ends with its reason."""
        opened: set[int] = set()
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        async for piece in pieces:
            if self.kind == "chat" and piece.row not in opened:
                opened.add(piece.row)
                delta = {"role": "assistant", "content": ""}
                yield self.chunk([{"index": piece.row, "delta": delta, "finish_reason": None}])
            if piece.text or piece.logprobs is not None:
                yield self.chunk([self.choice(piece.row, piece.text, piece.logprobs, None)])
            if piece.finish_reason is not None:
                prompt_tokens[piece.row] = piece.prompt_tokens
                completion_tokens += piece.completion_tokens
                yield self.chunk([self.choice(piece.row, "", None, piece.finish_reason)])
        if include_usage:
            counted = sum(tokens for row, tokens in prompt_tokens.items() if row % self.n == 0)
            yield self.chunk([], usage=usage(counted, completion_tokens))

    def choice(self, row: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": row, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
            if logprobs is not None:
                choice["logprobs"] = logprobs
            return choice
        return {"index": row, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


async def sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format. An error after the stream has started cannot change the
    status any more: it goes out as an `error` event (the openai client raises it) and the stream ends."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
    except ApiError as error:
        yield f"data: {json.dumps(error_body(error.message, error.kind, error.param))}\n\n"
        return
    yield "data: [DONE]\n\n"
