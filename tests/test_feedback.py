"""MORLAIF AI feedback: the judge against the real `moalign serve`, a local hf judge, order averaging,
resuming after a kill without asking twice, retries, and one-line errors."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from moalign import cli, data
from moalign.errors import MoalignError
from moalign.methods import feedback as fb
from moalign.run import write_manifest
from moalign.testing import ServerThread, build_causal_lm, serve_run

KEY = "sk-test-secret-4242"
PROMPTS = [
    "\n\nHuman: how do I cook rice?\n\nAssistant:",
    "\n\nHuman: my computer is slow, why?\n\nAssistant:",
    "\n\nHuman: what do plants need?\n\nAssistant:",
]
PAIRS = [
    (PROMPTS[0], "cook the rice slowly and add some salt", "the weather is bad"),
    (PROMPTS[1], "the disk is full", "great question, I love to help you today"),
    (PROMPTS[2], "plants need water, light and good soil", "travel light"),
]


def favour_letters(model, tokenizer) -> None:
    """Make the next token nearly always A or B (a `customize` hook for moalign.testing).

    LayerNorm output has zero mean, so rows of ones plus noise in the tied embedding give A and B a
    large constant logit (from ln_f's bias) plus a small part that depends on the prompt.
    """
    model.transformer.ln_f.bias.fill_(0.5)
    for letter in "AB":
        (token,) = tokenizer.encode(letter, add_special_tokens=False)
        model.transformer.wte.weight[token] = 0.5 + 0.3 * torch.randn(model.config.n_embd)


def build_letter_lm(directory: Path) -> Path:
    """A tiny GPT-2 with room for judge prompts (1024 positions) that answers A or B."""
    return build_causal_lm(directory, customize=favour_letters, n_positions=1024)


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("judge")
    build_letter_lm(run / "model")
    write_manifest(run, {"method": "base", "model": "model"})
    return run


@pytest.fixture(scope="module")
def server(judge_run: Path) -> Iterator[ServerThread]:
    with serve_run(judge_run, model_id="judge", api_key=KEY) as running:
        yield running


def pairs() -> list[fb.Pair]:
    return [fb.Pair(fb.pair_id(p, a, b), p, a, b, "A") for p, a, b in PAIRS]


class Killed(Exception):
    pass


class CountingJudge(fb.OpenAIJudge):
    """Counts the HTTP requests it makes; with `kill_after`, dies before the request after that many."""

    def __init__(self, *args, kill_after: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.kill_after, self.lock = 0, kill_after, threading.Lock()

    def _request(self, prompt: str) -> dict[str, float]:
        with self.lock:
            if self.kill_after is not None and self.calls >= self.kill_after:
                raise Killed
            self.calls += 1
        return super()._request(prompt)


def test_judge_through_moalign_serve_resumes_after_a_kill_without_asking_twice(
    server, judge_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    principles = fb.load_principles("helpfulness,conciseness")
    options = dict(base_url=f"{server.url}/v1", api_key_env="JUDGE_KEY", api="completions", top_logprobs=20)
    out = tmp_path / "feedback"
    before = server.stats["requests"]

    # Three requests in flight: those still running when one dies are recorded, not lost.
    first = CountingJudge("judge", kill_after=5, concurrency=3, **options)
    with pytest.raises(Killed):
        fb.collect(pairs(), principles, first, out, progress=False)
    assert first.calls == 5
    lines = (out / fb.FEEDBACK).read_text().splitlines()
    assert len(lines) == 5  # every answer was on disk before the kill
    with open(out / fb.FEEDBACK, "a") as handle:
        handle.write('{"id": "half a li')  # and a crash in the middle of a write is survived

    second = CountingJudge("judge", concurrency=1, **options)
    labels = fb.collect(pairs(), principles, second, out, progress=False)
    total = len(PAIRS) * len(principles) * 2
    assert second.calls == total - 5  # nothing asked twice
    assert server.stats["requests"] - before == total  # as the server counted them
    answers = list(fb.iter_answers(out))
    assert len(answers) == total
    assert len({(a["id"], a["principle"], a["order"]) for a in answers}) == total
    assert all(a["found"] == ["A", "B"] for a in answers)  # both letters in the top logprobs: no floor

    assert len(labels) == len(PAIRS) and (out / fb.LABELS).exists()
    for principle in ("helpfulness", "conciseness"):
        diff = labels[f"{principle}.logp_A"] - labels[f"{principle}.logp_B"]
        assert np.allclose(labels[f"{principle}.margin"], diff.abs())
        assert (labels[f"{principle}.preferred"] == np.where(diff > 0, "A", "B")).all()
    summary = json.loads((out / fb.SETTINGS).read_text())["summary"]
    assert set(summary) == {"helpfulness", "conciseness"} and "human_agreement" in summary["helpfulness"]

    # A third run asks nothing; the key was sent (the server demands it) but is written nowhere.
    third = CountingJudge("judge", concurrency=1, **options)
    fb.collect(pairs(), principles, third, out, progress=False)
    assert third.calls == 0
    for path in out.iterdir():
        assert KEY not in path.read_bytes().decode("utf-8", "replace")

    # The local hf judge reads the same model's next-token logprobs: same labels as through the server.
    local = fb.collect(
        pairs(), principles, fb.build_judge(f"hf:{judge_run / 'model'}"), tmp_path / "hf", progress=False
    )
    for column in ("helpfulness.logp_A", "helpfulness.logp_B", "conciseness.logp_A"):
        assert np.allclose(local[column], labels[column], atol=1e-4)


def test_chat_endpoint_of_moalign_serve(server, judge_run, tmp_path, monkeypatch):
    """Through chat the server wraps the question as one HH turn: the local judge asked that turn agrees."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    principles = fb.load_principles(["toxicity"])
    judge = fb.build_judge("openai:judge", base_url=f"{server.url}/v1", api="chat", concurrency=1)
    labels = fb.collect(pairs()[:2], principles, judge, tmp_path / "chat", progress=False)
    turn = f"{data.HUMAN} {fb.TEMPLATE}{data.ASSISTANT}"
    local = fb.collect(
        pairs()[:2], principles, fb.build_judge(f"hf:{judge_run / 'model'}"), tmp_path / "hf", turn, progress=False
    )
    for column in ("toxicity.logp_A", "toxicity.logp_B"):
        assert np.allclose(labels[column], local[column], atol=1e-4)


def test_order_averaging_cancels_a_position_bias(tmp_path):
    """A judge that likes letter A by 2 nats but response quality by only 1 is right after averaging."""

    class BiasedJudge(fb.Judge):
        spec = "test:biased"

        def ask(self, prompts, on_answer):
            for index, prompt in enumerate(prompts):
                first = prompt.split("(A) ")[1].split("\n")[0]
                second = prompt.split("(B) ")[1].split("\n")[0]
                logits = torch.tensor([2.0 + ("kind" in first), 0.0 + ("kind" in second)])
                logp = torch.log_softmax(logits, dim=0).tolist()
                on_answer(index, fb.Answer(logp[0], logp[1], ["A", "B"]))

    data = [
        fb.Pair(str(i), "q", *(("kind words", "rude words") if i % 2 else ("rude words", "kind words")))
        for i in range(6)
    ]
    labels = fb.collect(data, fb.load_principles(["empathy"]), BiasedJudge(), tmp_path, progress=False)
    expected = ["A" if i % 2 else "B" for i in range(6)]
    assert labels["empathy.preferred"].tolist() == expected
    assert np.allclose(labels["empathy.margin"], 1.0)  # the quality gap, the bias gone
    assert not labels["empathy.consistent"].any()  # each order alone would have followed the position
    summary = json.loads((tmp_path / fb.SETTINGS).read_text())["summary"]["empathy"]
    assert summary["position_bias"] == pytest.approx(2.0)


def test_letters_from_top_sums_spellings_and_floors_a_missing_letter():
    answer = fb.letters_from_top({" A": np.log(0.3), "A": np.log(0.2), "(B": np.log(0.1), "x": -4.0})
    assert answer.logp_A == pytest.approx(np.log(0.5)) and answer.logp_B == pytest.approx(np.log(0.1))
    missing = fb.letters_from_top({" A": -0.1, "x": -5.0})
    assert missing.logp_B == -5.0 and missing.found == ["A"]
    assert fb.letters_from_top({" A": -0.1}, floor=-30.0).logp_B == -30.0


def test_principles_builtin_file_and_inline(tmp_path):
    assert [p.name for p in fb.load_principles()] == list(fb.PRINCIPLES) and len(fb.PRINCIPLES) == 12
    path = tmp_path / "principles.yaml"
    path.write_text("principles:\n  politeness: Which response is more polite?\n")
    assert [p.name for p in fb.load_principles(None, str(path))] == ["politeness"]
    chosen = fb.load_principles(["helpfulness", {"humor": "Which response is funnier?"}, "politeness"], str(path))
    assert [p.question for p in chosen][1:] == ["Which response is funnier?", "Which response is more polite?"]
    with pytest.raises(MoalignError, match="unknown principle 'kindness'"):
        fb.load_principles("helpfulness,kindness")


def scripted_server(script: list[tuple[int, dict[str, str]]]) -> tuple[http.server.ThreadingHTTPServer, list[float]]:
    """A real HTTP server answering the i-th request with script[i] (status, headers): 200 is a completion
    whose top logprobs are " B": -0.1, " A": -2.5. Returns the server and the arrival time of each request."""
    arrivals: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            arrivals.append(time.monotonic())
            status, headers = script[min(len(arrivals), len(script)) - 1]
            if status == 200:
                logprobs = {"tokens": [" B"], "token_logprobs": [-0.1], "top_logprobs": [{" B": -0.1, " A": -2.5}]}
                choice = {"index": 0, "text": " B", "finish_reason": "length", "logprobs": logprobs}
                payload = {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}
            else:
                payload = {"error": {"message": f"status {status}\nsecond line"}}
            body = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]:
                self.send_header(name, value)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, arrivals


def ask_scripted(script: list[tuple[int, dict[str, str]]], max_retries: int) -> tuple[fb.Answer | Exception, list]:
    httpd, arrivals = scripted_server(script)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    judge = fb.OpenAIJudge("m", base_url=url, api="completions", max_retries=max_retries, concurrency=1)
    try:
        return judge.answer("which?"), arrivals
    except MoalignError as error:
        return error, arrivals
    finally:
        httpd.shutdown()


def test_429_waits_as_long_as_the_servers_retry_after():
    """The client's own first back-off is at most 0.5 s: a 2 s gap means Retry-After was honoured."""
    answer, arrivals = ask_scripted([(429, {"Retry-After": "2"}), (200, {})], max_retries=3)
    assert isinstance(answer, fb.Answer) and (answer.logp_A, answer.logp_B) == (-2.5, -0.1)
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 1.95


def test_server_errors_are_retried_then_fail_in_one_line(monkeypatch):
    error, arrivals = ask_scripted([(500, {})], max_retries=2)
    assert len(arrivals) == 3  # one try and two retries
    assert isinstance(error, MoalignError) and "\n" not in str(error)
    assert "InternalServerError after 3 tries (" in str(error)
    error, arrivals = ask_scripted([(401, {}), (200, {})], max_retries=2)
    assert len(arrivals) == 1 and "HTTP 401" in str(error)  # a wrong key is not retried
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    nobody = fb.build_judge("openai:judge", base_url="http://127.0.0.1:9/v1", max_retries=1, concurrency=1)
    with pytest.raises(MoalignError, match="APIConnectionError after 2 tries"):
        nobody.answer("which?")


def test_bad_input_is_a_one_line_error(tmp_path, judge_run, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    with pytest.raises(MoalignError, match="feedback needs pairs"):
        fb.load_pairs(str(samples))
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "r"}) + "\n")
    with pytest.raises(MoalignError, match="response_a"):
        fb.load_pairs(str(odd))
    with pytest.raises(MoalignError, match="unknown judge kind"):
        fb.build_judge("claude:x")

    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p, "chosen": a, "rejected": b}) + "\n" for p, a, b in PAIRS))
    capsys.readouterr()
    base = ["feedback", "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"), "--judge"]
    assert cli.main([*base, f"hf:{judge_run / 'model'}", "--principles", "helpfulness,kindness"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown principle 'kindness'" in err and "\n" not in err

    # The command line end to end with the local judge, from a recipe file's `feedback:` section (with a
    # principle defined inline) plus a kebab-case flag; then another judge may not write into the same log.
    recipe = tmp_path / "morlaif.yaml"
    section = {
        "dataset": str(dataset),
        "output_dir": str(tmp_path / "out"),
        "judge": f"hf:{judge_run / 'model'}",
        "principles": ["detail", {"politeness": "Which response is more polite?"}],
    }
    recipe.write_text(yaml.safe_dump({"feedback": section, "pm": {"margin_scale": 0.0}}))
    assert cli.main(["feedback", "--config", str(recipe), "--batch-size", "2"]) == 0
    labels = pd.read_parquet(tmp_path / "out" / fb.LABELS)
    assert labels["human"].tolist() == ["A"] * 3 and {"detail.margin", "politeness.margin"} <= set(labels)
    settings = json.loads((tmp_path / "out" / fb.SETTINGS).read_text())
    assert settings["principles"]["politeness"] == "Which response is more polite?"
    before = (tmp_path / "out" / fb.LABELS).read_bytes()
    other = ["openai:other", "--base_url", "http://127.0.0.1:9/v1", "--principles", "detail"]
    assert cli.main([*base, *other]) == 2
    assert "holds feedback from judge" in capsys.readouterr().err
    assert (tmp_path / "out" / fb.LABELS).read_bytes() == before
    recipe.write_text(yaml.safe_dump({"feedback": {**section, "judge_kind": "hf"}}))
    assert cli.main(["feedback", "--config", str(recipe)]) == 2
    assert "unknown keys judge_kind" in capsys.readouterr().err
