"""Bad input, tried as a new user would: every case is one line naming what to fix, exit status 2, nothing
left behind. The table runs each command through `moalign.cli.main`, and HTTP requests through a real server.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from moalign.cli import main
from moalign.run import write_manifest
from moalign.testing import CORPUS, build_causal_lm, serve_run

PROMPT = "\n\nHuman: what should I do?\n\nAssistant:"
TRAIN = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]


@dataclass
class World:
    """Everything a command needs, made once: a tiny model, good data, a trained run, and broken files."""

    root: Path
    model: Path
    samples: Path
    pairs: Path
    run: Path

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, text: str | bytes) -> str:
        path = self.root / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return str(path)

    def jsonl(self, name: str, rows: list[dict]) -> str:
        return self.write(name, "".join(json.dumps(row) + "\n" for row in rows))


def objective_that_raises(prompts, responses):
    raise RuntimeError("the scorer's GPU is on fire")


def objective_of_strings(prompts, responses):
    return ["high"] * len(responses)


def objective_of_none(prompts, responses):
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = build_causal_lm(root / "model")
    samples = root / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": PROMPT, "response": text}) + "\n" for text in CORPUS))
    pairs = root / "pairs.jsonl"
    rows = [{"prompt": PROMPT, "chosen": a, "rejected": b} for a, b in zip(CORPUS[::2], CORPUS[1::2])]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = root / "sft"
    common = ["--model_name_or_path", str(model), "--dataset", str(pairs), "--objectives", "vader", "brevity"]
    assert main(["sft", *common, "--output_dir", str(run), "--sample_max_new_tokens", "4", *TRAIN]) == 0
    return World(root, model, samples, pairs, run)


def sft(world: World, *extra: str, output: str = "sft-new") -> list[str]:
    args = ["sft", "--model_name_or_path", str(world.model), "--dataset", str(world.pairs)]
    return [*args, "--objectives", "vader", "brevity", "--output_dir", world.path(output), *TRAIN, *extra]


def score(world: World, dataset: str, *extra: str, objectives: str = "vader,brevity") -> list[str]:
    return ["score", "--dataset", dataset, "--objectives", objectives, "--output", world.path("scored.parquet"), *extra]


def method(world: World, name: str, dataset: str, *extra: str) -> list[str]:
    args = [name, "--model_name_or_path", str(world.model), "--dataset", dataset, "--output_dir", world.path(name)]
    return [*args, "--objectives", "vader", "brevity", *TRAIN, *extra]


def truncated_model(world: World) -> str:
    broken = world.root / "truncated-model"
    if not broken.exists():
        shutil.copytree(world.model, broken)
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return str(broken)


def unfinished_run(world: World) -> str:
    run = world.root / "unfinished"
    if not run.exists():
        run.mkdir()
        shutil.copytree(world.model, run / "models" / "w1-0")
        models = [{"preference": [1.0, 0.0], "path": "models/w1-0"}]
        manifest = {"method": "modpo", "policy": "moalign.policy:PerPreferencePolicy", "complete": False}
        write_manifest(run, {**manifest, "objectives": ["vader", "brevity"], "models": models})
    return str(run)


BAD = "[b for b in"  # not JSON, not YAML
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar
CASES: list[tuple[str, Callable[[World], list[str]], str]] = [
    # datasets
    ("missing dataset", lambda w: score(w, w.path("nope.jsonl")), "does not exist"),
    ("empty dataset", lambda w: score(w, w.write("empty.jsonl", "")), "is empty"),
    ("header-only csv", lambda w: score(w, w.write("header.csv", "prompt,response\n")), "has no rows"),
    ("corrupt jsonl", lambda w: score(w, w.write("corrupt.jsonl", BAD + "\n")), "cannot read dataset"),
    ("corrupt parquet", lambda w: score(w, w.write("corrupt.parquet", b"PAR1 not really")), "cannot read dataset"),
    ("wrong file type", lambda w: score(w, w.write("data.txt", "hello")), ".json, .jsonl, .csv or .parquet"),
    (
        "null responses",
        lambda w: score(
            w, w.jsonl("nulls.jsonl", [{"prompt": "a", "response": None}, {"prompt": "b", "response": "x"}])
        ),
        "empty (null) values",
    ),
    (
        "numbers for text",
        lambda w: score(w, w.jsonl("numbers.jsonl", [{"prompt": "a", "response": 7}, {"prompt": "b", "response": 8}])),
        "must hold text",
    ),
    ("no usable columns", lambda w: score(w, w.jsonl("cols.jsonl", [{"question": "a", "answer": "b"}])), "it needs"),
    # objectives
    ("unknown objective", lambda w: score(w, str(w.samples), objectives="vader,happiness"), "unknown objective"),
    (
        "objective raises",
        lambda w: score(w, str(w.samples), objectives=f"python:{__name__}:objective_that_raises"),
        "objective_that_raises failed: RuntimeError: the scorer's GPU is on fire",
    ),
    (
        "objective returns strings",
        lambda w: score(w, str(w.samples), objectives=f"python:{__name__}:objective_of_strings"),
        "not numbers",
    ),
    (
        "objective returns None",
        lambda w: score(w, str(w.samples), objectives=f"python:{__name__}:objective_of_none"),
        "one per sample",
    ),
    ("negative limit", lambda w: score(w, str(w.samples), "--limit", "-5"), "--limit must be ≥ 1"),
    (
        "output not parquet",
        lambda w: ["score", "--dataset", str(w.samples), "--objectives", "vader", "--output", w.path("o.csv")],
        ".parquet",
    ),
    # configs and flags
    ("missing config file", lambda w: [*sft(w), "--config", w.path("none.yaml")], "does not exist"),
    (
        "yaml syntax error",
        lambda w: [*sft(w), "--config", w.write("bad.yaml", "objectives: [vader,\n")],
        "not valid YAML at line",
    ),
    (
        "unknown config key",
        lambda w: [*sft(w), "--config", w.write("key.yaml", "learning_rat: 0.1\n")],
        "unknown keys learning_rat",
    ),
    ("unknown flag", lambda w: sft(w, "--learning_rat", "0.1"), "unknown options --learning_rat"),
    ("bad flag value", lambda w: sft(w, "--max_steps", "many"), "invalid int value"),
    (
        "missing output_dir",
        lambda w: ["sft", "--model_name_or_path", str(w.model), "--dataset", str(w.pairs)],
        "output_dir is not set",
    ),
    # models and run directories
    (
        "model path missing",
        lambda w: method(w, "ric", str(w.samples)) + ["--model_name_or_path", w.path("no-model")],
        "does not exist",
    ),
    ("folder is not a model", lambda w: sft(w, "--model_name_or_path", str(w.root)), "has no config.json"),
    (
        "truncated weights",
        lambda w: sft(w, "--model_name_or_path", truncated_model(w), output="sft-trunc"),
        "SafetensorError",
    ),
    ("output_dir is a file", lambda w: sft(w, "--output_dir", str(w.samples)), "is a file"),
    (
        "rerun with other settings",
        lambda w: sft(w, "--learning_rate", "0.5", output="sft"),
        "was trained with learning_rate",
    ),
    # method options
    (
        "ric one objective",
        lambda w: method(w, "ric", str(w.samples), "--objectives", "vader"),
        "at least two objectives",
    ),
    (
        "ric mapping",
        lambda w: method(w, "ric", str(w.samples), "--preference_mapping", "best"),
        "preference_mapping must be one of",
    ),
    ("modpo zero weight", lambda w: method(w, "modpo", str(w.pairs), "--preferences", "0,1"), "must be > 0"),
    ("modpo loss option", lambda w: method(w, "modpo", str(w.pairs), "--use_weighting", "true"), "unset use_weighting"),
    (
        "morl algorithm",
        lambda w: method(w, "morl", str(w.samples), "--algorithm", "ppo2", "--num_generations", "2"),
        "unknown algorithm",
    ),
    ("paretohqd distance", lambda w: method(w, "paretohqd", str(w.samples), "--distance", "far"), "distance 'far'"),
    ("preferences twice", lambda w: method(w, "paretohqd", str(w.samples), "--preferences", "1,0", "1,0"), "twice"),
    # serving
    ("serve port", lambda w: ["serve", str(w.run), "--port", "99999"], "--port must be between 1 and 65535"),
    ("serve open host without key", lambda w: ["serve", str(w.run), "--host", "0.0.0.0"], "--insecure-no-key"),
    ("serve unfinished run", lambda w: ["serve", unfinished_run(w), "--port", "1"], "--allow_incomplete"),
    ("serve upstream url", lambda w: ["serve", str(w.run), "--upstream", "localhost:1"], "http:// or https://"),
    (
        "serve upstream concurrency",
        lambda w: ["serve", str(w.run), "--upstream", "http://127.0.0.1:1/v1", "--upstream_concurrency", "0"],
        "--upstream-concurrency must be ≥ 1",
    ),
    # evaluation and generation
    ("eval no run", lambda w: ["eval", w.path("no-run")], "does not exist"),
    ("eval not a run", lambda w: ["eval", str(w.root)], "is not a run directory"),
    ("eval reference point", lambda w: ["eval", str(w.run), "--reference-point", "a,b"], "comma-separated numbers"),
    ("eval unfinished run", lambda w: ["eval", unfinished_run(w)], "--allow_incomplete"),
    ("generate nan temperature", lambda w: ["generate", str(w.run), PROMPT, "--temperature", "nan"], "must be finite"),
    ("generate weights", lambda w: ["generate", str(w.run), PROMPT, "--weights", "0.5"], "expected 2"),
    (
        "generate past context",
        lambda w: ["generate", str(w.run), PROMPT * 40, "--max_new_tokens", "8"],
        "exceeds the model's context",
    ),
]


@pytest.mark.parametrize(("case", "argv", "message"), CASES, ids=[case[0] for case in CASES])
def test_bad_command_line_input_is_one_line(world, case, argv, message, capsys):
    before = sorted(p.name for p in world.root.iterdir())
    capsys.readouterr()
    args = argv(world)
    made = sorted(p.name for p in world.root.iterdir())  # files the case itself set up
    assert main(args) == 2
    # progress bars (loading weights, scoring) are progress, not the error: the error itself is one line
    err = [
        line
        for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
        if line.strip() and not PROGRESS.search(line)
    ]
    assert len(err) == 1 and err[0].startswith(f"moalign {args[0]}: error: "), err
    assert message in err[0], err[0]
    left = sorted(p.name for p in world.root.iterdir())
    assert left == made, f"{case} left {sorted(set(left) - set(made))} behind (before: {before})"


def test_the_table_is_long_enough():
    assert len(CASES) + len(HTTP_CASES) >= 30


HTTP_CASES: list[tuple[str, dict, int, str]] = [
    ("preference of the wrong length", {"prompt": "hi", "preference": [1.0]}, 400, "preference"),
    ("preference off the simplex", {"prompt": "hi", "preference": [0.9, 0.9]}, 400, "sum to 1"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("nan temperature", {"prompt": "hi", "temperature": "nan"}, 400, "temperature"),
    ("unknown model", {"prompt": "hi", "model": "gpt-7"}, 404, "gpt-7"),
    ("no prompt", {}, 400, "prompt"),
]


@pytest.fixture(scope="module")
def server(world):
    with serve_run(world.run) as running:
        yield running


@pytest.mark.parametrize(("case", "body", "status", "message"), HTTP_CASES, ids=[case[0] for case in HTTP_CASES])
def test_bad_http_request_is_one_line_in_openai_shape(server, case, body, status, message):
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "sft", **body}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # and the server keeps serving


def test_malformed_json_body_is_a_400_in_openai_shape(server):
    response = httpx.post(
        f"{server.url}/v1/completions", content=BAD, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400 and "error" in response.json()
