"""`moalign serve RUN_DIR [--upstream URL]`: the command line of the server."""

from __future__ import annotations

import argparse
import logging
import os

from moalign.errors import MoalignError
from moalign.serve.app import ServeConfig, create_app, uvicorn_options

log = logging.getLogger("moalign.serve")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_config(argv: list[str]) -> tuple[str, ServeConfig, str]:
    parser = argparse.ArgumentParser(
        prog="moalign serve", description="Serve a run over an OpenAI-compatible HTTP API, the preference per request."
    )
    parser.add_argument("run_dir", help="a run directory (one with moalign.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $MOALIGN_API_KEY)")
    parser.add_argument("--insecure-no-key", action="store_true", help="allow a non-loopback --host without an API key")
    parser.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt accepted, in tokens")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather concurrent requests")
    parser.add_argument("--max-batch", type=int, default=64, help="most rows generated together")
    parser.add_argument("--no-batching", action="store_true", help="generate every request alone")
    parser.add_argument("--model-name", default=None, help="model id clients send (default: run directory name)")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send its headers")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client has to send its body")
    parser.add_argument(
        "--upstream",
        default=None,
        metavar="URL",
        help="an OpenAI-compatible server (vLLM, SGLang, transformers serve) to generate with, e.g. "
        "http://127.0.0.1:8001/v1; `moalign export` prints the command that starts one for this run",
    )
    parser.add_argument(
        "--upstream-api-key", default=None, help="key the upstream requires (or $MOALIGN_UPSTREAM_API_KEY)"
    )
    parser.add_argument("--upstream-timeout", type=float, default=120.0, help="seconds to wait for the upstream")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.max_tokens_cap < 1 or args.max_prompt_tokens < 1 or args.max_batch < 1 or args.batch_wait_ms < 0:
        raise MoalignError("--max-tokens-cap, --max-prompt-tokens and --max-batch must be ≥ 1, --batch-wait-ms ≥ 0")
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
    )
    return args.run_dir, config, args.log_level


def cli(argv: list[str]) -> None:
    import uvicorn

    from moalign.policy import load_policy

    run_dir, config, log_level = parse_config(argv)
    policy = load_policy(run_dir)
    if config.upstream is not None:
        missing = [str(path) for path in policy.model_paths().values() if not path.exists()]
        if missing:
            raise MoalignError(f"{run_dir} cannot be routed: its model folders are missing ({', '.join(missing)})")
    app = create_app(policy, config)
    where = f"generating with {config.upstream}" if config.upstream else "generating in this process"
    url = f"http://{config.host}:{config.port}/v1"
    log.info("serving %s as model %r on %s, %s", run_dir, app.state.server.model_id, url, where)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, **uvicorn_options(config))
