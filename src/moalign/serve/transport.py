"""Transport guards: what is refused before any JSON is parsed (API key, body size, slow bodies) and the
uvicorn protocol that times out slow request headers."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from moalign.serve.schemas import error_body

if TYPE_CHECKING:
    from moalign.serve.app import ServeConfig


def error_payload(status: int, message: str, kind: str = "invalid_request_error") -> tuple[list, bytes]:
    payload = json.dumps(error_body(message, kind)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return headers, payload


async def respond(send: Any, status: int, message: str, kind: str = "invalid_request_error") -> None:
    headers, payload = error_payload(status, message, kind)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def key_matches(scope: dict[str, Any], key: bytes) -> tuple[bool, bool]:
    """(sent a key, it is the right one), comparing bytes: the header's raw bytes against the key's UTF-8
    bytes, so a non-ASCII key matches only itself whatever encoding a decoder would guess."""
    raw = dict(scope.get("headers", [])).get(b"authorization", b"")
    scheme, _, token = raw.partition(b" ")
    token = token.strip()
    return bool(token), scheme.lower() == b"bearer" and hmac.compare_digest(token, key)


class GuardMiddleware:
    """API-key check, body-size limit and body read timeout, before any JSON is parsed.

    The key is checked first so an unauthenticated client cannot make the server buffer a body; the
    body is read here in full (at most `max_bytes`, by Content-Length and by what actually arrives,
    within `timeout_s`) and handed on to the app.
    """

    def __init__(self, app: Any, api_key: str | None, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key and scope["path"].startswith("/v1"):
            sent, right = key_matches(scope, self.key)
            if not right:
                message = "wrong API key" if sent else "missing API key"
                return await respond(send, 401, f"{message}: send 'Authorization: Bearer KEY'", "authentication_error")
        if scope["method"] not in {"POST", "PUT", "PATCH"}:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await respond(send, 413, f"request body is larger than {self.max_bytes} bytes")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return await respond(send, 408, f"the request body did not arrive within {self.timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await respond(send, 413, f"request body is larger than {self.max_bytes} bytes")
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request line and headers.

    uvicorn calls the app only once the headers are complete, so a client that sends them a byte at a
    time would hold its connection for ever (each byte resets uvicorn's keep-alive timer); here it gets
    a 408 and the connection closes.
    """

    header_timeout_s = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.header_deadline = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request on this connection gets its own deadline
            self.header_deadline.cancel()
            self.header_deadline = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # the headers are in
            self.header_deadline.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self.header_deadline.cancel()
        super().connection_lost(exc)

    def headers_too_slow(self) -> None:
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        headers, payload = error_payload(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")
        head = b"HTTP/1.1 408 Request Timeout\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        self.transport.write(head + b"connection: close\r\n\r\n" + payload)
        self.transport.close()


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """uvicorn settings that enforce `config`'s header timeout (pass them to `uvicorn.Config`)."""
    protocol = type("HeaderTimeout", (HeaderTimeoutProtocol,), {"header_timeout_s": config.header_timeout_s})
    return {"http": protocol}
