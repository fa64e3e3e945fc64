"""Nothing lost on a kill: a checkpoint half-written, a generation stage stopped after some chunks."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moalign.cli import main
from moalign.evaluate import evaluate_runs
from moalign.generation import SamplingParams
from moalign.methods.common import generate_stage, model_completer
from moalign.methods.stages import CLOCK_FILE, STAGE_MARKER
from moalign.run import write_manifest

PROMPTS = [f"the cat sat on mat {i}" for i in range(10)]


def write_pairs(path: Path) -> Path:
    rows = [{"prompt": f"topic {i}:", "chosen": "a good day is a sunny day", "rejected": "bad"} for i in range(12)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_checkpoint_half_written_by_a_kill_is_removed_and_the_stage_resumes(tiny_lm, tmp_path, monkeypatch):
    """An SFT of 4 steps under the default save_steps (500) is still checkpointed (half-way); the empty and
    the partial checkpoint folders a kill during a save leaves are removed, and the rerun resumes from the
    complete one. The stage's seconds add both invocations."""
    from trl import SFTTrainer

    run = tmp_path / "sft"
    args = ["sft", "--model_name_or_path", str(tiny_lm), "--dataset", str(write_pairs(tmp_path / "p.jsonl"))]
    args += ["--output_dir", str(run), "--max_steps", "4", "--per_device_train_batch_size", "2", "--report_to", "none"]
    original, calls = SFTTrainer.training_step, {"n": 0, "sleep": 1.5}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during step 3: the half-way checkpoint-2 is on disk
        time.sleep(calls["sleep"])  # the first invocation is slow, so its seconds are seen in the total
        return original(self, *a, **k)

    monkeypatch.setattr(SFTTrainer, "training_step", step)
    assert main(args) == 130
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    first = json.loads((checkpoints / "checkpoint-2" / CLOCK_FILE).read_text())["seconds"]
    assert first >= 2 * calls["sleep"]
    # A kill while saving: one folder empty, one with the weights but not the Trainer's state (written last).
    (checkpoints / "checkpoint-3").mkdir()
    (checkpoints / "checkpoint-4").mkdir()
    shutil.copy(checkpoints / "checkpoint-2" / "model.safetensors", checkpoints / "checkpoint-4")

    calls.update(n=-1000, sleep=0.0)
    assert main(args) == 0
    assert calls["n"] == -1000 + 2  # resumed from checkpoint-2: two steps left
    stage = json.loads((run / "model" / STAGE_MARKER).read_text())
    assert stage["steps"] == 4
    assert stage["seconds"] >= first  # the killed invocation's seconds are counted
    assert not checkpoints.exists()


def test_generation_killed_after_some_chunks_resumes_from_the_last(tiny_lm, tmp_path):
    params = [SamplingParams(max_new_tokens=5, seed=i) for i in range(len(PROMPTS))]
    settings = SimpleNamespace(generation_backend="local", generation_base_url=None, generation_batch_size=4)
    complete = model_completer(tiny_lm, settings)
    whole, _ = generate_stage(tmp_path / "whole", PROMPTS, params, complete, chunk_size=3)

    calls = {"n": 0}

    def dying(prompts, rows):  # a generator killed during its third chunk
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return complete(prompts, rows)

    folder = tmp_path / "stage"
    with pytest.raises(KeyboardInterrupt):
        generate_stage(folder, PROMPTS, params, dying, chunk_size=3)
    assert sorted(p.name for p in folder.glob("chunk-*")) == ["chunk-000000.json", "chunk-000001.json"]

    seen: list[list[str]] = []

    def recording(prompts, rows):
        seen.append(prompts)
        return complete(prompts, rows)

    resumed, stats = generate_stage(folder, PROMPTS, params, recording, chunk_size=3)
    assert seen == [PROMPTS[6:9], PROMPTS[9:]]  # only the chunks the kill lost
    assert stats["chunks"] == 4 and stats["resumed_chunks"] == 2
    assert [c.text for c in resumed] == [c.text for c in whole]  # rows are seeded one by one
    assert stats["tokens"] == sum(len(c.token_ids) for c in whole)

    # Other inputs (another model, other settings) never reuse the chunks.
    seen.clear()
    generate_stage(folder, PROMPTS, params, recording, chunk_size=3, key="another model")
    assert len(seen) == 4


def test_evaluation_killed_mid_generation_resumes(tiny_lm, tmp_path, monkeypatch):
    import moalign.policy

    run = tmp_path / "base"
    run.mkdir()
    manifest = {
        "method": "base",
        "model": str(tiny_lm),
        "objectives": ["length", "brevity"],
        "sampling": {"max_new_tokens": 4, "temperature": 1.0},
    }
    write_manifest(run, manifest)
    evaluate = {"prompts": PROMPTS, "divisions": 1, "progress": False, "chunk_size": 4}
    (expected,) = evaluate_runs([run], **evaluate)
    generate, calls = moalign.policy.generate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    (run / "front.json").unlink()
    monkeypatch.setattr(moalign.policy, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate_runs([run], **evaluate)
    assert len(list((run / "eval_chunks").rglob("chunk-*"))) == 2
    calls["n"] = -1000
    (front,) = evaluate_runs([run], **evaluate)
    assert calls["n"] == -1000 + 1  # only the lost third chunk (a fixed model answers every preference alike)
    assert np.allclose(front["points"], expected["points"])
    assert not (run / "eval_chunks").exists()


def test_eval_rejects_a_chunk_size_below_one_in_one_line(tiny_lm, tmp_path, capsys):
    run, prompts = tmp_path / "base", tmp_path / "prompts.jsonl"
    run.mkdir()
    write_manifest(run, {"method": "base", "model": str(tiny_lm), "objectives": ["length", "brevity"]})
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["eval", str(run), "--prompts", str(prompts), "--generation_chunk_size", "0"]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert errors == ["moalign eval: error: --generation_chunk_size must be ≥ 1, got 0"]
    assert sorted(p.name for p in run.iterdir()) == ["moalign.json"]  # no chunks, no front
