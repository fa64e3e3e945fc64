"""`moalign serve RUN_DIR [--upstream URL]`: the command line of the server."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from moalign.errors import MoalignError
from moalign.serve.app import ServeConfig, create_app
from moalign.serve.router import IN_FLIGHT
from moalign.serve.transport import uvicorn_options

log = logging.getLogger("moalign.serve")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeArguments:
    """`moalign serve RUN_DIR`: what the command line sets (flags in snake_case; kebab-case works too)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (default: loopback only)"})
    port: int = 8000
    api_key: str | None = field(
        default=None, metadata={"help": "require 'Authorization: Bearer KEY' (or $MOALIGN_API_KEY)"}
    )
    insecure_no_key: bool = field(default=False, metadata={"help": "allow a non-loopback --host without an API key"})
    max_tokens_cap: int = field(default=512, metadata={"help": "largest max_tokens a request may ask"})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "longest prompt accepted, in tokens"})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "how long to gather concurrent requests"})
    max_batch: int = field(default=64, metadata={"help": "most rows generated together"})
    no_batching: bool = field(default=False, metadata={"help": "generate every request alone"})
    model_name: str | None = field(
        default=None, metadata={"help": "model id clients send (default: run directory name)"}
    )
    header_timeout: float = field(default=10.0, metadata={"help": "seconds a client has to send its headers"})
    body_timeout: float = field(default=30.0, metadata={"help": "seconds a client has to send its body"})
    upstream: str | None = field(
        default=None,
        metadata={
            "help": "an OpenAI-compatible server (vLLM, SGLang, transformers serve) to generate with, e.g. "
            "http://127.0.0.1:8001/v1; `moalign export` prints the command that starts one for this run"
        },
    )
    upstream_api_key: str | None = field(
        default=None, metadata={"help": "key the upstream requires (or $MOALIGN_UPSTREAM_API_KEY)"}
    )
    upstream_timeout: float = field(default=120.0, metadata={"help": "seconds to wait for the upstream"})
    upstream_concurrency: int = field(
        default=IN_FLIGHT, metadata={"help": "requests in flight to the upstream (vLLM's default batch is 256)"}
    )
    allow_incomplete: bool = field(default=False, metadata={"help": "serve an unfinished per-preference run"})
    log_level: str = "info"


def parse_config(argv: list[str]) -> tuple[ServeArguments, ServeConfig]:
    from moalign.methods.config import parse_config as parse_arguments

    args = parse_arguments(
        ServeArguments, argv, required=(), positionals=[("run_dir", None, "a run directory (one with moalign.json)")]
    )
    if args.max_tokens_cap < 1 or args.max_prompt_tokens < 1 or args.max_batch < 1 or args.batch_wait_ms < 0:
        raise MoalignError("--max-tokens-cap, --max-prompt-tokens and --max-batch must be ≥ 1, --batch-wait-ms ≥ 0")
    if args.upstream_concurrency < 1:
        raise MoalignError(f"--upstream-concurrency must be ≥ 1, got {args.upstream_concurrency}")
    if not 0 < args.port < 65536:
        raise MoalignError(f"--port must be between 1 and 65535, got {args.port}")
    for name in ("header_timeout", "body_timeout", "upstream_timeout"):
        if not getattr(args, name) > 0:  # also refuses NaN
            raise MoalignError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.upstream is not None and not args.upstream.startswith(("http://", "https://")):
        raise MoalignError(f"--upstream must be an http:// or https:// URL, got {args.upstream!r}")
    api_key = args.api_key or os.environ.get("MOALIGN_API_KEY") or None
    if args.host not in LOOPBACK and not api_key and not args.insecure_no_key:
        raise MoalignError(
            f"--host {args.host} is reachable from other machines: give --api-key KEY (or $MOALIGN_API_KEY), "
            "or --insecure-no-key to serve it to anyone"
        )
    config = ServeConfig(
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_tokens_cap=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_wait_ms=args.batch_wait_ms,
        max_batch=args.max_batch,
        batching=not args.no_batching,
        model_id=args.model_name,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        upstream=args.upstream,
        upstream_api_key=args.upstream_api_key or os.environ.get("MOALIGN_UPSTREAM_API_KEY") or None,
        upstream_timeout_s=args.upstream_timeout,
        upstream_concurrency=args.upstream_concurrency,
    )
    return args, config


def cli(argv: list[str]) -> None:
    import uvicorn

    from moalign.policy import load_policy

    args, config = parse_config(argv)
    run_dir, log_level = args.run_dir, args.log_level
    policy = load_policy(run_dir, allow_incomplete=args.allow_incomplete)
    if config.upstream is not None:
        missing = [str(path) for path in policy.model_paths().values() if not path.exists()]
        if missing:
            raise MoalignError(f"{run_dir} cannot be routed: its model folders are missing ({', '.join(missing)})")
    app = create_app(policy, config)
    where = f"generating with {config.upstream}" if config.upstream else "generating in this process"
    url = f"http://{config.host}:{config.port}/v1"
    log.info("serving %s as model %r on %s, %s", run_dir, app.state.server.model_id, url, where)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, **uvicorn_options(config))
