"""CONTRIBUTING.md's example method is real code: run it as written on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np

from moalign.policy import load_policy
from moalign.testing import CORPUS

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "\n\nHuman: what should I do?\n\nAssistant:"


def example_module(tmp_path: Path):
    """The guide's one Python block, saved as a module and imported."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    path = tmp_path / "bestk.py"
    path.write_text(block)
    spec = importlib.util.spec_from_file_location("bestk_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through the module
    spec.loader.exec_module(module)
    return module


def test_the_guide_method_trains_one_model_per_preference_on_its_best_k(tmp_path, tiny_lm, capsys):
    bestk = example_module(tmp_path)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": PROMPT, "response": text}) + "\n" for text in CORPUS))
    run = tmp_path / "run"
    bestk.cli(
        ["--model_name_or_path", str(tiny_lm), "--dataset", str(samples), "--output_dir", str(run)]
        + ["--objectives", "brevity", "length", "--preferences", "1,0", "0,1", "--k", "2"]
        + ["--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]
    )
    assert str(run) in capsys.readouterr().out
    manifest = json.loads((run / "moalign.json").read_text())
    assert manifest["method"] == "bestk"
    assert [m["preference"] for m in manifest["models"]] == [[1.0, 0.0], [0.0, 1.0]]
    assert [m["path"] for m in manifest["models"]] == ["models/w1-0", "models/w0-1"]
    assert manifest["training"]["tokens"] > 0 and set(manifest["training"]["stages"]) == {"w1-0", "w0-1"}
    assert all(stage["samples"] == 2 for stage in manifest["training"]["stages"].values())  # k per preference
    policy = load_policy(run)
    assert policy.served_by(np.array([0.9, 0.1])) == "w1-0" and policy.served_by(np.array([0.2, 0.8])) == "w0-1"
    # a rerun skips the finished preferences: their stage markers are untouched
    marker = run / "models" / "w1-0" / "moalign_stage.json"
    stamp = marker.stat().st_mtime_ns
    bestk.cli(
        ["--model_name_or_path", str(tiny_lm), "--dataset", str(samples), "--output_dir", str(run)]
        + ["--objectives", "brevity", "length", "--preferences", "1,0", "0,1", "--k", "2"]
        + ["--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]
    )
    assert marker.stat().st_mtime_ns == stamp
