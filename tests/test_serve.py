"""The server end to end: a real uvicorn on loopback, called with the `openai` client and raw HTTP.

Tiny GPT-2 models are built here: a random one for a `base` run, and for a `modpo` run two models
forced to say " yes" (trained at preference [1, 0]) and " no" (at [0, 1]), so that steering by the
request's preference is visible in the text.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moalign.run import write_manifest  # noqa: E402
from moalign.serve import ServeConfig, create_app, render_chat, token_pieces, uvicorn_options  # noqa: E402
from moalign.testing import ServerThread, build_causal_lm, build_tokenizer, serve_run  # noqa: E402

KEY = "test-key-123"


def favouring(token: str):
    """A `customize` hook: the model's final layer makes `token` (almost) certain."""

    def edit(model, tokenizer) -> None:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{token!r} must be one token, got {ids}"
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        # constant hidden state · one-hot head: logit 32 for the token, 0 elsewhere
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[ids[0]] = 1.0

    return edit


def build_lm(directory: Path, favour: str | None = None) -> Path:
    return build_causal_lm(directory, customize=favouring(favour) if favour else None, n_positions=128)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    base = root / "base"
    build_lm(base / "model")
    write_manifest(
        base,
        {"method": "base", "model": "model", "objective_names": ["a", "b"], "objectives": ["length", "brevity"]},
    )
    modpo = root / "modpo"
    build_lm(modpo / "models" / "a", favour=" yes")
    build_lm(modpo / "models" / "b", favour=" no")
    write_manifest(
        modpo,
        {
            "method": "modpo",
            "objective_names": ["a", "b"],
            "objectives": ["length", "brevity"],
            "models": [{"preference": [1, 0], "path": "models/a"}, {"preference": [0, 1], "path": "models/b"}],
        },
    )
    return {"base": base, "modpo": modpo}


@pytest.fixture(scope="module")
def base_server(runs) -> Iterator[ServerThread]:
    with serve_run(runs["base"], api_key=KEY, max_tokens_cap=48, max_prompt_tokens=40) as server:
        yield server


@pytest.fixture(scope="module")
def modpo_server(runs) -> Iterator[ServerThread]:
    with serve_run(runs["modpo"]) as server:
        yield server


def client(server: ServerThread, key: str | None = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key or "unused", max_retries=0, timeout=60)


def post(server: ServerThread, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)


# ----------------------------------------------------------------------------- pure functions


def test_render_chat_uses_hh_format_without_a_template():
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "how are you?"}]},
    ]
    assert render_chat(messages) == "Be kind.\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"


def test_render_chat_uses_the_tokenizers_template(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_chat([{"role": "user", "content": "hi"}], tokenizer) == "<user>hi<assistant>"


def test_token_pieces_join_to_the_text(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    text = "the cat sat, héllo ☃ yes"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids, text)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert pieces[:5] == [tokenizer.decode([i]) for i in ids[:5]]  # ASCII tokens: one piece each
    assert "é" in pieces and "☃" in pieces  # multi-byte characters arrive whole, once complete
    cut = token_pieces(tokenizer, ids, "the cat s")  # a stop string cut the text inside a token
    assert "".join(cut) == "the cat s" and len(cut) == len(ids)


# ----------------------------------------------------------------------------- the API with the openai client


def test_models_and_health(base_server):
    models = client(base_server).models.list()
    assert [m.id for m in models.data] == ["base"]
    info = models.data[0].model_extra["moalign"]
    assert info["objectives"] == ["a", "b"] and info["default_preference"] == [0.5, 0.5]
    assert base_server.stats["status"] == "ok"


def test_completion_with_preference_and_logprobs(base_server):
    response = client(base_server).completions.create(
        model="base",
        prompt="the cat",
        max_tokens=8,
        seed=3,
        logprobs=2,
        extra_body={"preference": {"a": 0.25, "b": 0.75}},
    )
    extension = response.model_extra["moalign"]
    assert extension["preference"] == [0.25, 0.75] and extension["served_by"] == "model" and extension["seed"] == 3
    choice = response.choices[0]
    assert choice.finish_reason in {"stop", "length"}
    assert len(choice.logprobs.tokens) == response.usage.completion_tokens <= 8
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert response.usage.prompt_tokens == base_server.app.state.server.count_tokens("the cat") == 3


def test_streaming_gives_the_same_text_as_a_whole_answer(base_server):
    api = client(base_server)
    kwargs = {"model": "base", "prompt": "a good day", "max_tokens": 12, "seed": 11, "temperature": 0.9}
    whole = api.completions.create(**kwargs).choices[0].text
    chunks = list(api.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert all(c.model_extra["moalign"]["seed"] == 11 for c in chunks)

    messages = [{"role": "user", "content": "what should I do?"}]
    chat_whole = api.chat.completions.create(model="base", messages=messages, max_tokens=10, seed=5)
    stream = api.chat.completions.create(
        model="base", messages=messages, max_tokens=10, seed=5, stream=True, stream_options={"include_usage": True}
    )
    chat_chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert text == chat_whole.choices[0].message.content
    assert chat_chunks[-1].usage.completion_tokens == chat_whole.usage.completion_tokens


def test_raw_stream_ends_with_done(base_server):
    with httpx.stream(
        "POST",
        f"{base_server.url}/v1/completions",
        json={"prompt": "the cat", "max_tokens": 4, "stream": True, "seed": 1},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_chat_with_logprobs_and_n(base_server):
    response = client(base_server).chat.completions.create(
        model="base",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=6,
        n=2,
        seed=7,
        logprobs=True,
        top_logprobs=3,
        extra_body={"preference": [0.5, 0.5]},
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert choice.message.role == "assistant"
        for item in choice.logprobs.content:
            # ≤ 3: generation keys the top tokens by their text, and partial UTF-8 bytes all read "\ufffd"
            assert item.logprob <= 0 and 1 <= len(item.top_logprobs) <= 3
    # n choices use seeds 7 and 8: choice 1 equals a single request with seed 8
    again = client(base_server).chat.completions.create(
        model="base",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=6,
        seed=8,
    )
    assert again.choices[0].message.content == response.choices[1].message.content


def test_a_request_without_seed_reports_the_one_it_got(base_server):
    api = client(base_server)
    first = api.completions.create(model="base", prompt="the cat", max_tokens=10)
    seed = first.model_extra["moalign"]["seed"]
    again = api.completions.create(model="base", prompt="the cat", max_tokens=10, seed=seed)
    assert again.choices[0].text == first.choices[0].text


# ----------------------------------------------------------------------------- steering


def test_preference_steers_a_per_preference_run(modpo_server):
    api = client(modpo_server)
    outputs = {}
    for preference in ([0.9, 0.1], [0.1, 0.9]):
        response = api.completions.create(
            model="modpo", prompt="the answer is", max_tokens=4, seed=0, extra_body={"preference": preference}
        )
        outputs[tuple(preference)] = (response.choices[0].text, response.model_extra["moalign"]["served_by"])
    assert outputs[(0.9, 0.1)] == (" yes yes yes yes", "a")
    assert outputs[(0.1, 0.9)] == (" no no no no", "b")
    chat = api.chat.completions.create(
        model="modpo",
        messages=[{"role": "user", "content": "well?"}],
        max_tokens=3,
        extra_body={"preference": {"b": 1.0}},
    )
    assert chat.choices[0].message.content == " no no no" and chat.model_extra["moalign"]["served_by"] == "b"


def test_concurrent_requests_in_one_batch_give_what_they_give_alone(runs):
    """Same seed, same output: batched with others (different prompt lengths) or alone."""
    requests = [
        {"prompt": prompt, "max_tokens": 12, "seed": seed, "temperature": 1.0, "preference": [0.3, 0.7]}
        for seed, prompt in enumerate(["the cat", "a good day is a sunny day", "cook", "yes no yes", "the mat"])
    ]

    async def fire(url: str) -> list[str]:
        async with httpx.AsyncClient(timeout=60) as http:
            answers = await asyncio.gather(*(http.post(f"{url}/v1/completions", json=r) for r in requests))
        return [a.json()["choices"][0]["text"] for a in answers]

    # A long window that closes as soon as all five rows are in (max_batch): robust on a busy machine.
    with serve_run(runs["base"], batch_wait_ms=5000, max_batch=len(requests)) as batched:
        together = asyncio.run(fire(batched.url))
        assert batched.stats["largest_batch"] == len(requests) and batched.stats["batches"] == 1
    with serve_run(runs["base"], batching=False) as alone:
        separate = asyncio.run(fire(alone.url))
        assert alone.stats["largest_batch"] == 1 and alone.stats["batches"] == len(requests)
    assert together == separate
    assert len(set(together)) > 1


# ----------------------------------------------------------------------------- safety


BAD_REQUESTS = [
    ({"prompt": "hi", "preference": [0.5, 0.3, 0.2]}, 400, "3 entries, expected 2"),
    ({"prompt": "hi", "preference": [1.5, -0.5]}, 400, "non-negative"),
    ({"prompt": "hi", "preference": [0.5, 0.6]}, 400, "sum to 1"),
    ({"prompt": "hi", "preference": {"a": 0.5, "helpful": 0.5}}, 400, "unknown objective(s) 'helpful'"),
    ({"prompt": "hi", "max_tokens": 49}, 400, "above this server's cap of 48"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "at least 1"),
    ({"prompt": "the cat " * 40}, 400, "above this server's limit of 40"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ({"prompt": "hi", "echo": True}, 400, "echo is not supported"),
    ({"max_tokens": 3}, 400, "prompt: Field required"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
    ({"prompt": "hi", "n": 100}, 400, "n:"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_completion_requests_say_what_is_wrong(base_server, body, status, message):
    response = post(base_server, "/v1/completions", body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_bad_chat_requests_and_malformed_json(base_server):
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "not supported"),
    ]
    for body, message in cases:
        response = post(base_server, "/v1/chat/completions", body)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    broken = post(base_server, "/v1/completions", b'{"prompt": "hi",')
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_oversized_bodies_are_refused(base_server):
    big = json.dumps({"prompt": "x" * 1_100_000}).encode()
    assert post(base_server, "/v1/completions", big).status_code == 413

    def chunked():  # no Content-Length: the size is counted as it arrives
        for _ in range(20):
            yield b"x" * 100_000

    response = post(base_server, "/v1/completions", chunked())
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]


def test_api_key_is_required(base_server):
    from openai import AuthenticationError

    body = {"prompt": "hi", "max_tokens": 2}
    assert post(base_server, "/v1/completions", body, key=None).status_code == 401
    wrong = post(base_server, "/v1/completions", body, key="nope")
    assert wrong.status_code == 401 and "wrong API key" in wrong.json()["error"]["message"]
    assert httpx.get(f"{base_server.url}/v1/models").status_code == 401
    with pytest.raises(AuthenticationError):
        client(base_server, key="nope").models.list()
    assert post(base_server, "/v1/completions", body).status_code == 200


def test_a_client_that_leaves_is_dropped_before_generation(runs):
    """While the worker is busy, a queued request whose client disconnects is never generated."""
    from moalign.policy import load_policy

    policy = load_policy(runs["base"], device="cpu")
    gate, calls = threading.Event(), []
    complete = policy.complete

    def slow_complete(prompts, weights, params):
        calls.append(list(prompts))
        gate.wait(30)
        return complete(prompts, weights, params)

    policy.complete = slow_complete
    with ServerThread(create_app(policy, ServeConfig(batch_wait_ms=0))) as server:

        async def scenario() -> str:
            async with httpx.AsyncClient(timeout=60) as http:
                first = asyncio.ensure_future(
                    http.post(f"{server.url}/v1/completions", json={"prompt": "the cat", "max_tokens": 3})
                )
                while not calls:  # the first request holds the worker
                    await asyncio.sleep(0.01)
                async with httpx.AsyncClient(timeout=0.5) as impatient:
                    with pytest.raises(httpx.ReadTimeout):
                        await impatient.post(
                            f"{server.url}/v1/completions", json={"prompt": "leaving", "max_tokens": 3}
                        )
                for _ in range(100):
                    if server.stats["dropped"] == 1:
                        break
                    await asyncio.sleep(0.02)
                gate.set()
                return (await first).json()["choices"][0]["text"]

        asyncio.run(scenario())
        stats = server.stats
    assert stats["dropped"] == 1 and stats["pending"] == 0
    assert calls == [["the cat"]]


def test_prompt_and_max_tokens_must_fit_the_context(modpo_server):
    body = {"prompt": "the answer is yes " * 30, "max_tokens": 100}  # ~120 + 100 tokens > 128 positions
    response = post(modpo_server, "/v1/completions", body, key=None)
    assert response.status_code == 400 and "context of 128 tokens" in response.json()["error"]["message"]


# ----------------------------------------------------------------------------- streaming for real


def test_native_stream_sends_chunks_before_the_last_token_is_generated(runs):
    """Generation is held at its 28th of 32 forward passes until the client has read a chunk: a server that
    sent its chunks after generation would never let the client read one, and the gate would time out.
    (Generation hands tokens over at its host syncs, every few steps.)"""
    from moalign.policy import load_policy

    policy = load_policy(runs["modpo"], device="cpu")
    model, _ = policy.model_for(0)  # the " yes" model, which never ends early
    gate, waited, forwards = threading.Event(), [], [0]

    def hold(module, args, output) -> None:
        forwards[0] += 1
        if forwards[0] == 28:
            waited.append(gate.wait(30))

    model.register_forward_hook(hold)
    config = ServeConfig(batch_wait_ms=0)
    with ServerThread(create_app(policy, config), **uvicorn_options(config)) as server:
        stream = client(server).completions.create(
            model="modpo", prompt="the answer is", max_tokens=32, seed=0, stream=True, extra_body={"preference": [1, 0]}
        )
        texts = []
        for chunk in stream:
            texts.append(chunk.choices[0].text)
            gate.set()
    assert waited == [True]  # the client read a chunk while generation was held
    assert "".join(texts) == " yes" * 32 and len([t for t in texts if t]) > 1


def test_streamed_text_holds_back_a_possible_stop_string(tmp_path):
    from moalign.serve.native import StreamedText

    tokenizer = build_tokenizer(tmp_path)
    ids = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    text = StreamedText(tokenizer, ["on the m"])
    sent = "".join(text.add([i]) for i in ids)
    assert sent == "the cat sat "  # cut at the stop string, nothing of it ever sent
    prefix = StreamedText(tokenizer, ["sat X"])
    assert "".join(prefix.add([i]) for i in ids[:3]) == "the cat"  # " sat" could start the stop string


# ----------------------------------------------------------------------------- transport faults (issue 17)


def test_a_client_leaving_from_the_middle_of_the_queue_is_dropped(runs):
    """Several queued jobs and the one that leaves is not the first: found by identity, not by comparing
    weight arrays (which raised "truth value of an array is ambiguous")."""
    from moalign.policy import load_policy

    policy = load_policy(runs["base"], device="cpu")
    gate, calls = threading.Event(), []
    complete = policy.complete

    def slow_complete(prompts, weights, params, **kwargs):
        calls.append(list(prompts))
        gate.wait(30)
        return complete(prompts, weights, params, **kwargs)

    policy.complete = slow_complete
    with ServerThread(create_app(policy, ServeConfig(batch_wait_ms=0, max_batch=1))) as server:

        async def scenario() -> list[str]:
            async with httpx.AsyncClient(timeout=60) as http:
                ask = lambda prompt: http.post(  # noqa: E731
                    f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2, "preference": [0.4, 0.6]}
                )
                first = asyncio.ensure_future(ask("the cat"))
                while not calls:
                    await asyncio.sleep(0.01)
                second = asyncio.ensure_future(ask("leaving"))  # equal prompts: `==` goes on to the weights
                await asyncio.sleep(0.2)
                async with httpx.AsyncClient(timeout=0.5) as impatient:
                    with pytest.raises(httpx.ReadTimeout):
                        await impatient.post(
                            f"{server.url}/v1/completions",
                            json={"prompt": "leaving", "max_tokens": 2, "preference": [0.4, 0.6]},
                        )
                for _ in range(100):
                    if server.stats["dropped"] == 1:
                        break
                    await asyncio.sleep(0.02)
                gate.set()
                return [(await request).status_code for request in (first, second)]

        assert asyncio.run(scenario()) == [200, 200]
        assert server.stats["dropped"] == 1
    assert calls == [["the cat"], ["leaving"]]


def raw_exchange(port: int, pieces: list[bytes], pause: float) -> tuple[bytes, float]:
    """Send `pieces` with `pause` seconds between them; return what the server answered and when."""
    import socket
    import time

    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)
        except OSError:  # the server closed the connection while we were still sending
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - start


def test_slow_headers_and_slow_bodies_are_timed_out(runs):
    config = ServeConfig(header_timeout_s=1.0, body_timeout_s=1.0, api_key=KEY)
    from moalign.policy import load_policy

    with ServerThread(create_app(load_policy(runs["base"], device="cpu"), config), **uvicorn_options(config)) as server:
        headers = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        slow_headers = [headers[i : i + 4] for i in range(0, len(headers), 4)]  # 4 bytes every 0.2 s: ~4 s
        answer, seconds = raw_exchange(server.port, slow_headers, 0.2)
        assert answer.startswith(b"HTTP/1.1 408") and b"headers did not arrive within 1 s" in answer
        assert seconds < 3.5
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        head = headers + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        answer, seconds = raw_exchange(server.port, [head, body[:5], body[5:10], body[10:]], 0.8)
        assert b" 408 " in answer.split(b"\r\n")[0] and b"body did not arrive within 1 s" in answer
        assert server.stats["status"] == "ok"  # and the server still answers


def test_unknown_paths_and_methods_answer_in_openais_shape(base_server):
    missing = httpx.get(f"{base_server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and "/v1/nothing" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{base_server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


def test_a_non_ascii_key_matches_only_its_own_utf8_bytes(runs):
    from moalign.policy import load_policy

    key = "clé-ü"
    with ServerThread(create_app(load_policy(runs["base"], device="cpu"), ServeConfig(api_key=key))) as server:

        def status(raw_key: bytes) -> int:
            head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " + raw_key
            answer, _ = raw_exchange(server.port, [head + b"\r\n\r\n"], 0)
            return int(answer.split(b" ")[1])

        assert status(key.encode("utf-8")) == 200
        assert status(key.encode("latin-1")) == 401  # the same characters in another encoding are another key
        assert status(b"cle-u") == 401


def test_serving_beyond_loopback_needs_a_key(runs, capsys):
    from moalign.cli import main

    assert main(["serve", str(runs["base"]), "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("moalign serve: error: --host 0.0.0.0 is reachable") and "--insecure-no-key" in error
    assert len(error.splitlines()) == 1
    assert main(["serve", str(runs["base"]), "--port", "99999"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
