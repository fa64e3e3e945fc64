"""`moalign serve RUN --upstream URL`: the preference router in front of real OpenAI-compatible servers.

Upstreams here are real servers on 127.0.0.1: `transformers serve` (started in the folder `moalign
export --for transformers` wrote), moalign's own native server, and, for the faults a well-behaved
engine never shows (malformed JSON, a stream cut off, a slow answer), a small scripted HTTP server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402

from moalign.export import export  # noqa: E402
from moalign.run import write_manifest  # noqa: E402
from moalign.serve import ServeConfig, create_app, uvicorn_options  # noqa: E402
from moalign.testing import ServerThread, build_causal_lm  # noqa: E402
from tests.test_serve import favouring  # noqa: E402

RIC = {
    "template": {"tags": ["<rm>", "<rm>"]},
    "mapping": "linf",
    "low": [-1.0, -1.0],
    "high": [1.0, 1.0],
    "quantiles": [[-1.0, -1.0], [1.0, 1.0]],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("router")
    model = build_causal_lm(root / "tiny", n_positions=128)
    ric = root / "ric"
    write_manifest(
        ric,
        {
            "method": "ric",
            "policy": "moalign.methods.ric.policy:RiCPolicy",
            "model": str(model),
            "objective_names": ["length", "brevity"],
            "objectives": ["length", "brevity"],
            "ric": RIC,
        },
    )
    modpo = root / "modpo"
    build_causal_lm(modpo / "models" / "a", customize=favouring(" yes"), n_positions=128)
    build_causal_lm(modpo / "models" / "b", customize=favouring(" no"), n_positions=128)
    write_manifest(
        modpo,
        {
            "method": "modpo",
            "objective_names": ["a", "b"],
            "objectives": ["length", "brevity"],
            "models": [{"preference": [1, 0], "path": "models/a"}, {"preference": [0, 1], "path": "models/b"}],
        },
    )
    # The RiC run's model as a plain run: moalign's native server as the upstream, under the name "ric"
    plain = root / "plain"
    write_manifest(plain, {"method": "base", "model": str(model), "objective_names": ["a", "b"]})
    return {"root": root, "ric": ric, "modpo": modpo, "plain": plain}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_upstream(runs) -> Iterator[str]:
    """`transformers serve` on the MODPO run exported for it (started in the export folder, as printed)."""
    out = runs["root"] / "export-transformers"
    summary = export(runs["modpo"], "transformers", out)
    assert summary["models"] == {"a": "a", "b": "b"}
    port = free_port()
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [executable, "serve", "--port", str(port), "--host", "127.0.0.1"],
        cwd=out,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {process.stderr.read().decode()[-800:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("transformers serve did not start within 180 s")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def router(run_dir: Path, upstream: str, **options) -> ServerThread:
    from moalign.policy import load_policy

    config = ServeConfig(upstream=upstream, **options)
    return ServerThread(create_app(load_policy(run_dir, device="cpu"), config), **uvicorn_options(config))


def native(run_dir: Path, **options) -> ServerThread:
    from moalign.policy import load_policy

    config = ServeConfig(**options)
    return ServerThread(create_app(load_policy(run_dir, device="cpu"), config), **uvicorn_options(config))


def api(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


# ----------------------------------------------------------------------------- routing


def test_a_per_preference_run_reaches_the_model_export_named(transformers_upstream, runs):
    with router(runs["modpo"], transformers_upstream) as server:
        client = api(server)
        for preference, word, name in (([0.9, 0.1], " yes", "a"), ([0.2, 0.8], " no", "b")):
            answer = client.completions.create(
                model="modpo", prompt="the answer is", max_tokens=4, seed=0, extra_body={"preference": preference}
            )
            assert answer.choices[0].text == word * 4
            block = answer.model_extra["moalign"]
            assert block["upstream_model"] == name and block["served_by"] == name and block["preference"] == preference
            assert answer.usage.completion_tokens == 4
        chat = client.chat.completions.create(
            model="modpo",
            messages=[{"role": "user", "content": "well?"}],
            max_tokens=3,
            extra_body={"preference": {"b": 1.0}},
        )
        assert chat.choices[0].message.content == " no no no" and chat.model_extra["moalign"]["upstream_model"] == "b"


def test_streaming_is_passed_through_chunk_by_chunk(transformers_upstream, runs):
    with router(runs["modpo"], transformers_upstream) as server:
        stream = api(server).chat.completions.create(
            model="modpo",
            messages=[{"role": "user", "content": "well?"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"preference": [1, 0]},
        )
        chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == [" yes"] * 5  # one chunk per upstream chunk, in order
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5


def test_an_unknown_upstream_model_is_one_line_and_the_next_request_is_served(transformers_upstream, runs):
    # The RiC run was not exported into the folder transformers serve runs in: it has no model "ric".
    with router(runs["ric"], transformers_upstream) as server:
        with pytest.raises(openai.APIStatusError) as caught:
            api(server).completions.create(model="ric", prompt="the cat", max_tokens=3)
        assert caught.value.status_code == 502
        message = caught.value.body["message"]
        assert "for model 'ric'" in message and transformers_upstream in message and "\n" not in message
        assert httpx.get(f"{server.url}/health").json()["upstream_errors"] == 1
    with router(runs["modpo"], transformers_upstream) as server:  # the upstream itself is fine
        assert api(server).completions.create(model="modpo", prompt="hi", max_tokens=2).choices[0].text


def test_ric_routed_sends_exactly_the_prompt_the_policy_writes(runs):
    """The upstream is moalign's native server on the RiC run's model as a plain run: with the same seeds it
    samples the same text as the native RiC server only if it was given the very prompt RiC writes."""
    from moalign.policy import load_policy

    policy = load_policy(runs["ric"], device="cpu")
    request = {"model": "ric", "max_tokens": 10, "temperature": 1.0, "n": 2, "seed": 5}
    with (
        native(runs["plain"], model_id="ric") as upstream,
        native(runs["ric"]) as direct,
        router(runs["ric"], f"{upstream.url}/v1") as routed,
    ):
        for preference in ([0.8, 0.2], [0.1, 0.9]):
            body = {**request, "extra_body": {"preference": preference}}
            via_router = api(routed).completions.create(prompt="the cat", **body)
            alone = api(direct).completions.create(prompt="the cat", **body)
            assert [c.text for c in via_router.choices] == [c.text for c in alone.choices]
            # … which is the RiC prompt itself sent to the plain model
            written = policy.prompt_for("the cat", preference)
            assert "<rm>" in written
            plain = api(upstream).completions.create(prompt=written, **{**body, "extra_body": {}})
            assert [c.text for c in plain.choices] == [c.text for c in via_router.choices]
        chat = {"messages": [{"role": "user", "content": "what should I do?"}], **request, "n": 1}
        routed_chat = api(routed).chat.completions.create(**chat, stream=True)
        direct_chat = api(direct).chat.completions.create(**chat)
        text = "".join(c.choices[0].delta.content or "" for c in routed_chat if c.choices)
        assert text == direct_chat.choices[0].message.content


# ----------------------------------------------------------------------------- upstream faults


class Scripted(BaseHTTPRequestHandler):
    """An upstream that misbehaves on cue: the prompt says how ("held": it counts the requests it holds at once)."""

    held, most_held, lock = 0, 0, threading.Lock()
    dropped: set[str] = set()  # prompts whose first request lost its connection

    def log_message(self, *args) -> None:
        return

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        if "held" in prompt:
            with Scripted.lock:
                Scripted.held += 1
                Scripted.most_held = max(Scripted.most_held, Scripted.held)
            time.sleep(0.2)
            with Scripted.lock:
                Scripted.held -= 1
        if "auth" in prompt and self.headers.get("Authorization") != "Bearer sekrit":
            payload = json.dumps({"error": {"message": "wrong upstream key\nsee the logs"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if "slow" in prompt:
            time.sleep(3)
        if "dropped" in prompt and prompt not in Scripted.dropped:  # headers, half a body, then the line goes dead
            Scripted.dropped.add(prompt)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "400")
            self.end_headers()
            self.wfile.write(b'{"id": "x", "choices": [')
            self.close_connection = True
            return
        chunk = {"id": "x", "object": "text_completion", "created": 0, "model": body["model"]}
        if "broken" in prompt or not body["stream"]:
            whole = {**chunk, "choices": [{"index": 0, "text": "hello there", "finish_reason": "stop"}]}
            payload = b'{"id": "x", "choices": [{"text": "hel' if "broken" in prompt else json.dumps(whole).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError):  # the router gave up waiting ("slow")
                self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for word in ("hello", " there"):
            event = {**chunk, "choices": [{"index": 0, "text": word, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        if "fail" in prompt:  # the engine failed after the stream opened: an error event, as vLLM sends one
            self.wfile.write(b'data: {"error": {"message": "out of memory", "code": 500}}\n\n')
        elif "cut" not in prompt:
            event = {**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
        self.close_connection = True  # "cut": the connection closes before the answer finished


@pytest.fixture(scope="module")
def scripted() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_upstream_faults_are_one_line_errors_and_the_router_stays_up(runs, scripted):
    with router(runs["modpo"], scripted, upstream_timeout_s=1.0) as server:
        client = api(server)
        with pytest.raises(openai.APIStatusError) as broken:
            client.completions.create(model="modpo", prompt="broken", max_tokens=3)
        assert broken.value.status_code == 502 and "sent a malformed answer" in broken.value.body["message"]
        with pytest.raises(openai.APIError, match="closed the stream before the answer finished"):
            list(client.completions.create(model="modpo", prompt="cut", max_tokens=3, stream=True))
        with pytest.raises(openai.APIError, match="failed mid-stream: out of memory"):
            list(client.completions.create(model="modpo", prompt="fail", max_tokens=3, stream=True))
        with pytest.raises(openai.APIStatusError) as slow:
            client.completions.create(model="modpo", prompt="slow", max_tokens=3)
        assert (
            slow.value.status_code == 504
            and "did not answer within 1 s (--upstream-timeout)" in slow.value.body["message"]
        )
        whole = client.completions.create(model="modpo", prompt="fine", max_tokens=3)  # the next request is served
        assert whole.choices[0].text == "hello there"
        streamed = client.completions.create(model="modpo", prompt="fine", max_tokens=3, stream=True)
        assert [c.choices[0].text for c in streamed if c.choices and c.choices[0].text] == ["hello", " there"]
        for error in (broken.value, slow.value):
            assert "\n" not in error.body["message"] and scripted in error.body["message"]


def test_the_upstream_key_is_sent_and_a_refusal_is_one_line_naming_the_upstream(runs, scripted):
    with router(runs["modpo"], scripted, upstream_api_key="sekrit") as server:
        assert api(server).completions.create(model="modpo", prompt="auth", max_tokens=3).choices[0].text
    with router(runs["modpo"], scripted) as server, pytest.raises(openai.APIStatusError) as refused:
        api(server).completions.create(model="modpo", prompt="auth", max_tokens=3)
    message = refused.value.body["message"]
    assert refused.value.status_code == 502 and message.startswith(f"upstream {scripted} answered 401 for model ")
    assert message.endswith(": wrong upstream key")  # the upstream's own message, its first line


def test_an_upstream_that_is_down_gives_502_naming_it(runs):
    down = f"http://127.0.0.1:{free_port()}/v1"
    with router(runs["modpo"], down) as server:
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert response.status_code == 502
        message = response.json()["error"]["message"]
        assert message.startswith(f"upstream {down} is unreachable") and "\n" not in message
        streamed = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "stream": True}, timeout=30)
        assert streamed.status_code == 502  # refused before the stream opens, not as an error event
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_router_refuses_what_it_cannot_forward(runs):
    with router(runs["modpo"], "http://127.0.0.1:9/v1") as server:
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "logprobs": 2}, timeout=30)
        assert response.status_code == 400 and "logprobs are not forwarded" in response.json()["error"]["message"]
        bad = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "preference": [2, -1]}, timeout=30)
        assert bad.status_code == 400 and "preference" in bad.json()["error"]["message"]


# ----------------------------------------------------------------------------- bulk generation on a server


def test_the_bulk_engine_keeps_row_order_and_seeds(runs):
    """Eight rows of different lengths, four in flight: answers come back in the rows' order, each sampled
    with its own seed exactly as the in-process sampler samples it."""
    import numpy as np

    from moalign.engines import OpenAIEngine
    from moalign.generation import SamplingParams
    from moalign.policy import load_policy

    prompts = ["the cat", "a good day is a sunny day with friends", "cook", "yes", "the weather is bad", "no", "a", "b"]
    params = [SamplingParams(max_new_tokens=4 + 3 * (i % 3), temperature=1.0, seed=100 + i) for i in range(8)]
    local = load_policy(runs["plain"], device="cpu").complete(prompts, [np.array([0.5, 0.5])] * 8, params)
    with native(runs["plain"], model_id="tiny") as upstream:
        remote = OpenAIEngine(f"{upstream.url}/v1", concurrency=4).complete("tiny", prompts, params)
        assert upstream.stats["requests"] == 8
    assert [c.text for c in remote] == [c.text for c in local]
    assert [c.prompt_tokens for c in remote] == [c.prompt_tokens for c in local]


def test_eval_on_a_server_gives_the_front_of_local_generation(runs, capsys):
    """`moalign eval --engine openai`: the RiC run's prompts (rewards written in by the policy) sent to a
    server with its model; a server that honours seeds gives exactly the local front."""
    from moalign.cli import main
    from moalign.fronts import load_front

    prompts = runs["root"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat", "a good day", "cook the rice"]))
    flags = ["--prompts", str(prompts), "--divisions", "2", "--max_new_tokens", "6", "--reference_point=-1,-60"]
    assert main(["eval", str(runs["ric"]), *flags]) == 0
    local = load_front(runs["ric"])
    with native(runs["plain"], model_id="ric") as upstream:
        assert main(["eval", str(runs["ric"]), *flags, "--engine", "openai", "--base_url", f"{upstream.url}/v1"]) == 0
        assert upstream.stats["requests"] == 3 * 3  # three prompts under three preferences, each row a request
    remote = load_front(runs["ric"])
    assert remote["points"] == local["points"] and remote["preferences"] == local["preferences"]
    capsys.readouterr()
    assert main(["eval", str(runs["ric"]), *flags, "--engine", "openai"]) == 2
    assert "--engine openai needs --base_url" in capsys.readouterr().err


def test_the_router_keeps_at_most_upstream_concurrency_requests_in_flight(runs, scripted):
    """Twelve clients at once through a router told `upstream_concurrency=3`: the upstream holds three at a time
    (not one, not twelve) and every client is answered."""
    from concurrent.futures import ThreadPoolExecutor

    Scripted.most_held = 0
    with router(runs["modpo"], scripted, upstream_concurrency=3) as server:
        client = api(server)
        with ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(
                    lambda i: client.completions.create(model="modpo", prompt=f"held {i}", max_tokens=3), range(12)
                )
            )
    assert [a.choices[0].text for a in answers] == ["hello there"] * 12
    assert Scripted.most_held == 3


def test_a_connection_dropped_mid_answer_is_sent_again(runs, scripted):
    """The upstream closes the connection halfway through its first answer (as a keep-alive connection it timed
    out would): the router sends the row again, and the client gets the answer, not a 502."""
    with router(runs["modpo"], scripted) as server:
        answer = api(server).completions.create(model="modpo", prompt="dropped once", max_tokens=3)
    assert answer.choices[0].text == "hello there"
    assert "dropped once" in Scripted.dropped
