"""The HTTP server: any run directory behind an OpenAI-compatible API, the preference chosen per request.

`moalign serve RUN_DIR` answers `POST /v1/completions` and `POST /v1/chat/completions` (the `openai`
client works unchanged; the preference travels in the extra field `preference`), `GET /v1/models` and
`GET /health`. It generates in-process (`native.py`, batched) or, with `--upstream URL`, routes every
request to an OpenAI-compatible engine (`router.py`) with the prompt and model the preference picks.

Modules: `schemas` (request bodies, errors), `batcher` (request batching), `openai_format` (answers and
stream chunks), `native` / `router` (the two engines), `app` (validation, the FastAPI app), `transport` (what is
refused before any JSON is parsed; uvicorn's settings), `command` (the command line).
"""

from moalign.serve.app import ServeConfig, Server, create_app
from moalign.serve.command import cli
from moalign.serve.openai_format import token_pieces
from moalign.serve.schemas import ApiError, render_chat
from moalign.serve.transport import uvicorn_options

__all__ = ["ApiError", "ServeConfig", "Server", "cli", "create_app", "render_chat", "token_pieces", "uvicorn_options"]
