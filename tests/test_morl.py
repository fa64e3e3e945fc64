"""MORLHF / MORLAIF: per-sample rewards, one RL step per algorithm on a tiny model, resume, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moalign.errors import MoalignError
from moalign.methods.config import parse_config
from moalign.methods.morl import MORLConfig, ScalarizedReward, train
from moalign.methods.ppo import train_ppo
from moalign.methods.rollouts import gae
from moalign.objectives import build_all
from moalign.scores import NormStats
from moalign.testing import CORPUS

PROMPT = "\n\nHuman: {}?\n\nAssistant:"
# Readability (Flesch) varies with every word, so sampled responses practically never tie and the
# advantages of a one-step test are never all zero.
OBJECTIVES = ["readability", "brevity"]


def test_reward_function_scores_each_sample_on_its_own():
    objectives = build_all(OBJECTIVES)
    stats = NormStats(names=OBJECTIVES, mean=[60.0, -8.0], std=[20.0, 2.0], min=[0, -12], max=[100, -3])
    reward = ScalarizedReward(objectives, np.array([0.3, 0.7]), "worst_case", {}, stats)
    prompts = [PROMPT.format(t) for t in CORPUS[:4]]
    responses = CORPUS[4:8]
    logged: dict[str, float] = {}
    batch = reward(prompts, responses, log_metric=logged.__setitem__)
    rows = [reward([p], [r])[0] for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(batch, rows)
    assert set(logged) == {"objectives/readability", "objectives/brevity"}
    assert logged["objectives/brevity"] == pytest.approx(-np.mean([len(r.split()) for r in responses]))


def write_samples(directory: Path) -> Path:
    path = directory / "samples.jsonl"
    with open(path, "w") as handle:
        for text in CORPUS:
            handle.write(json.dumps({"prompt": PROMPT.format(" ".join(text.split()[:3])), "response": text}) + "\n")
    return path


def morl_argv(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    """`moalign morl` flags as a user would give them."""
    return [
        "--model_name_or_path", str(model),
        "--dataset", str(write_samples(tmp_path)),
        "--output_dir", str(tmp_path / "run"),
        "--objectives", *OBJECTIVES,
        "--per_device_train_batch_size", "4",
        "--num_generations", "2",
        "--max_completion_length", "8",
        "--max_steps", "1",
        "--learning_rate", "1e-2",
        "--report_to", "none",
        "--save_strategy", "no",
        "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


def morl_config(tmp_path: Path, model: Path, *extra: str) -> MORLConfig:
    """A config parsed by the real command-line parser."""
    return parse_config(MORLConfig, morl_argv(tmp_path, model, *extra))


def parameters_differ(path_a: Path, path_b: Path) -> bool:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(path_a).state_dict()
    b = AutoModelForCausalLM.from_pretrained(path_b).state_dict()
    return any(not torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "ppo"])
def test_one_rl_step_through_the_command_line(tmp_path, tiny_lm, algorithm, monkeypatch):
    """`moalign morl --algorithm A`: one step trains the policy that the run then serves."""
    import trl

    from moalign.cli import main
    from moalign.generation import SamplingParams, generate, load_model
    from moalign.policy import load_policy

    trainers = {"rloo": trl.RLOOTrainer, "grpo": trl.GRPOTrainer}
    used: list[str] = []
    for name, trainer in trainers.items():  # which TRL trainer ran (each still trains as it would)
        monkeypatch.setattr(trainer, "train", record_call(trainer.train, lambda name=name: used.append(name)))
    argv = morl_argv(tmp_path, tiny_lm, "--algorithm", algorithm, "--preferences", "0.5,0.5", "--ppo_epochs", "2")
    assert main(["morl", *argv]) == 0
    assert used == ([algorithm] if algorithm in trainers else [])
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "moalign.json").read_text())
    assert manifest["method"] == "morlhf" and manifest["algorithm"] == algorithm
    assert manifest["models"] == [{"preference": [0.5, 0.5], "path": "models/w0.5-0.5"}]
    assert manifest["normalization"]["stats"]["names"] == OBJECTIVES  # fitted on the training samples
    stage = manifest["training"]["stages"]["w0.5-0.5"]
    assert stage["steps"] == 1 and math.isfinite(stage["kl_last"]) and stage["tokens"] > 0
    assert parameters_differ(tiny_lm, run_dir / "models" / "w0.5-0.5")
    assert not (run_dir / "checkpoints").exists()
    # The run serves the trained model, not the base: same prompts and seeds, the trained model's answers.
    prompts = [PROMPT.format(" ".join(text.split()[:3])) for text in CORPUS[:4]]
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=i) for i in range(len(prompts))]
    served = load_policy(run_dir).complete(prompts, [[0.4, 0.6]] * len(prompts), params)

    def own(model_dir: Path) -> list[tuple[list[int], list[float]]]:
        return [(c.token_ids, c.logprobs) for c in generate(*load_model(str(model_dir)), prompts, params)]

    assert [(c.token_ids, c.logprobs) for c in served] == own(run_dir / "models" / "w0.5-0.5") != own(tiny_lm)


def record_call(method, note):
    """`method` as it is, calling `note()` first."""

    def wrapper(self, *args, **kwargs):
        note()
        return method(self, *args, **kwargs)

    return wrapper


def test_ppo_update_raises_the_advantage_weighted_log_probability(tmp_path, tiny_lm):
    """One PPO update moves each token's log-probability the way its advantage says: up where it is positive,
    down where it is negative (a sign error in the clipped surrogate moves them the other way)."""
    from moalign.generation import prepare_tokenizer
    from moalign.methods.common import load_tokenizer
    from moalign.methods.ppo import PPO
    from moalign.methods.rollouts import Rollout, logprobs_and_values, pad_sequences

    config = morl_config(tmp_path, tiny_lm, "--algorithm", "ppo", "--ppo_epochs", "1", "--learning_rate", "1e-3")
    config.vf_coef = 0.0  # the policy loss alone
    tokenizer = load_tokenizer(str(tiny_lm))
    prepare_tokenizer(tokenizer)
    ppo = PPO(config, str(tiny_lm), tokenizer, "cpu")
    prompts = [PROMPT.format(text) for text in ("the cat", "cook the rice", "travel light", "plants")]
    answers = ["sat on the mat", "slowly and add some salt", "and keep your passport safe", "need water"]
    queries = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    responses = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    ids, attention, mask, width = pad_sequences(queries, responses, tokenizer.pad_token_id, "cpu")

    def logprobs() -> torch.Tensor:
        with torch.no_grad():
            return logprobs_and_values(ppo.policy, ppo.head, ids, attention, width, config.temperature)[0] * mask

    before = logprobs()
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]  # rows 0 and 2 were good, rows 1 and 3 bad
    advantages = sign * mask
    zeros = torch.zeros_like(mask)
    batch = Rollout(ids, attention, width, mask, before, zeros, advantages, zeros, zeros[:, 0], zeros[:, 0])
    ppo.update(batch, seed=0)
    change = (logprobs() - before).sum(1) / mask.sum(1)  # mean change of each row's token log-probabilities
    assert (change * sign[:, 0] > 0).all(), change
    assert float((advantages * (logprobs() - before)).sum()) > 0


def test_ppo_resumes_from_its_checkpoint(tmp_path, tiny_lm):
    config = morl_config(tmp_path, tiny_lm, "--algorithm", "ppo", "--max_steps", "2", "--save_strategy", "steps")
    config.save_steps, config.ppo_epochs = 1, 1
    prompts = [PROMPT.format(t) for t in CORPUS]
    calls = []

    def crashing(prompts, responses):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine goes down during the second rollout
        return [float(len(r)) for r in responses]

    stage, final = tmp_path / "stage", tmp_path / "final"
    with pytest.raises(KeyboardInterrupt):
        train_ppo(config, str(tiny_lm), prompts, crashing, stage, final)
    assert (stage / "checkpoint-1" / "ppo_state.pt").exists() and not final.exists()
    stats = train_ppo(config, str(tiny_lm), prompts, lambda p, r: [float(len(x)) for x in r], stage, final)
    assert stats["resumed_from_step"] == 1 and stats["steps"] == 2
    assert (final / "moalign_stage.json").exists() and not stage.exists()


def test_rloo_resumes_from_the_trl_checkpoint(tmp_path, tiny_lm, monkeypatch):
    """Killed after TRL saved checkpoint-1, the rerun trains only the steps left, from that checkpoint."""
    from trl import RLOOTrainer

    from moalign.cli import main

    argv = ["morl", *morl_argv(tmp_path, tiny_lm, "--preferences", "0.5,0.5", "--max_steps", "3")]
    argv += ["--save_strategy", "steps", "--save_steps", "1"]
    original, calls = RLOOTrainer.training_step, {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during step 2: checkpoint-1 is on disk
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RLOOTrainer, "training_step", dying_step)
    assert main(argv) == 130
    stage_dir, run_dir = tmp_path / "run" / "checkpoints" / "w0.5-0.5", tmp_path / "run"
    assert json.loads((stage_dir / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    assert not (run_dir / "models" / "w0.5-0.5").exists()

    calls["n"] = -1000  # the rerun goes through, counting its steps
    assert main(argv) == 0
    assert calls["n"] == -1000 + 2  # resumed at step 1: two steps left of three
    manifest = json.loads((run_dir / "moalign.json").read_text())
    assert manifest["training"]["stages"]["w0.5-0.5"]["steps"] == 3
    assert not stage_dir.exists()
    # Optimiser, scheduler and sampling state came back with the checkpoint: an uninterrupted run ends with the
    # very same weights.
    monkeypatch.setattr(RLOOTrainer, "training_step", original)
    assert main([*argv, "--output_dir", str(tmp_path / "whole")]) == 0
    assert not parameters_differ(run_dir / "models" / "w0.5-0.5", tmp_path / "whole" / "models" / "w0.5-0.5")


def test_gae_matches_the_recursion_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # three response tokens, one padding
    values = torch.tensor([[0.5, 0.2, 0.1, 0.0]])
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.1
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    expected = torch.tensor([[d0 + 0.45 * a1, a1, a2, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)


def test_rerun_skips_finished_weights(tmp_path, tiny_lm, monkeypatch):
    import moalign.methods.morl as morl

    trained: list[str] = []

    def fake_stage(config, prompts, reward, stage_dir, final_dir):
        trained.append(final_dir.name)
        if final_dir.name == "w0-1" and len(trained) == 2:
            raise KeyboardInterrupt
        shutil.copytree(tiny_lm, final_dir)
        (final_dir / "moalign_stage.json").write_text(json.dumps({"seconds": 1.0, "tokens": 10}))
        return {"seconds": 1.0, "tokens": 10}

    monkeypatch.setattr(morl, "train_trl", fake_stage)
    config = morl_config(tmp_path, tiny_lm, "--preferences", "onehot")
    with pytest.raises(KeyboardInterrupt):
        train(config)
    manifest = json.loads((tmp_path / "run" / "moalign.json").read_text())
    assert [m["preference"] for m in manifest["models"]] == [[1.0, 0.0]]  # usable after the interruption
    train(config)
    assert trained == ["w1-0", "w0-1", "w0-1"]  # the finished weight was not trained again
    manifest = json.loads((tmp_path / "run" / "moalign.json").read_text())
    assert [m["preference"] for m in manifest["models"]] == [[1.0, 0.0], [0.0, 1.0]]
    assert manifest["training"]["tokens"] == 20


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preferences", "0.2,0.3,0.5"], "expected 2"),
        (["--preferences", "0.2,0.3"], "sum to 1"),
        (["--preferences", "grid:x"], "grid:D"),
        (["--scalarization", "nash"], "unknown scalarisation 'nash'"),
        (["--algorithm", "ppo2"], "unknown algorithm"),
        (["--num_generations", "1"], "num_generations"),
    ],
)
def test_bad_input_is_one_line_before_work(tmp_path, tiny_lm, flags, message, capsys):
    from moalign.cli import main

    config = morl_config(tmp_path, tiny_lm)
    with pytest.raises(MoalignError, match=message):
        for flag, value in zip(flags[::2], flags[1::2]):
            setattr(config, flag.removeprefix("--"), [value] if flag == "--preferences" else value)
        config.num_generations = int(config.num_generations)
        train(config)
    assert not (tmp_path / "run" / "models").exists()
    # and through the command line: exit status 2, one line naming the problem
    argv = ["morl", "--model_name_or_path", str(tiny_lm), "--dataset", str(tmp_path / "samples.jsonl")]
    argv += ["--output_dir", str(tmp_path / "cli"), "--objectives", *OBJECTIVES, "--report_to", "none", *flags]
    argv += ["--per_device_train_batch_size", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moalign morl: error:")
