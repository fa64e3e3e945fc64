import json

import numpy as np
import pytest

from moalign.cli import main
from moalign.errors import MoalignError
from moalign.generation import SamplingParams
from moalign.methods.ric import (
    QUANTILE_LEVELS,
    RewardTemplate,
    format_prompt,
    mors_filter,
    parse_prompt,
    preference_to_targets,
    sample_targets,
)
from moalign.objectives import build_all
from moalign.policy import load_policy
from moalign.testing import build_causal_lm

LOW2, HIGH2 = np.array([-2.0, -1.0]), np.array([2.0, 3.0])
LOW3, HIGH3 = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 2.0, 4.0])


@pytest.mark.parametrize(
    "weights, expected",
    [
        ([0.5, 0.5], [2.0, 3.0]),  # exactly 1/N: both at high
        ([1.0, 0.0], [2.0, -1.0]),  # corner: the other objective at low
        ([0.0, 1.0], [-2.0, 3.0]),
        ([0.8, 0.2], [2.0, -1.0 + 2 * 0.2 * 4.0]),  # w2 < 1/2: low + N w (high - low)
    ],
)
def test_linf_mapping_two_objectives(weights, expected):
    assert preference_to_targets(weights, LOW2, HIGH2).tolist() == pytest.approx(expected)


def test_linf_mapping_three_objectives():
    third = [1 / 3, 1 / 3, 1 / 3]
    assert preference_to_targets(third, LOW3, HIGH3).tolist() == pytest.approx(HIGH3.tolist())
    assert preference_to_targets([0, 0, 1], LOW3, HIGH3).tolist() == pytest.approx([-1.0, -2.0, 4.0])
    w = [0.6, 0.3, 0.1]  # w2 = 0.3 < 1/3: -2 + 3*0.3*4; w3 = 0.1: 0 + 3*0.1*4
    assert preference_to_targets(w, LOW3, HIGH3).tolist() == pytest.approx([1.0, -2 + 3.6, 1.2])


def test_other_mappings_by_formula():
    w = np.array([0.6, 0.3, 0.1])
    span = HIGH3 - LOW3
    assert preference_to_targets(w, LOW3, HIGH3, "linear") == pytest.approx(LOW3 + w * span)
    assert preference_to_targets(w, LOW3, HIGH3, "l2") == pytest.approx(LOW3 + w / np.linalg.norm(w) * span)
    # quantile: the linf level read through each objective's empirical quantile function.
    table = np.column_stack([QUANTILE_LEVELS * 10, QUANTILE_LEVELS**2, -1 + QUANTILE_LEVELS])
    targets = preference_to_targets(w, LOW3, HIGH3, "quantile", quantiles=table)
    assert targets == pytest.approx([10.0, 0.9**2, -1 + 0.3], abs=1e-3)
    with pytest.raises(MoalignError, match="unknown preference mapping"):
        preference_to_targets(w, LOW3, HIGH3, "nope")
    with pytest.raises(MoalignError, match="sum to 1"):
        preference_to_targets([0.6, 0.6, 0.1], LOW3, HIGH3)


def test_format_prompt_round_trip():
    template = RewardTemplate(tags=["<harmless>", "<helpful>", "<humor>"])
    prompt = "\n\nHuman: Is it safe?\n\nAssistant: Mostly.\n\nHuman: Why?\n\nAssistant:"
    text = format_prompt(prompt, [1.26, -0.04, -0.45], template)
    assert text == (
        "\n\nHuman: Is it safe?\n\nAssistant: Mostly.\n\nHuman: Why? <harmless> 1.3 <helpful> 0.0 <humor> -0.5"
        " \n\nAssistant:"
    )
    assert parse_prompt(text, template) == (prompt, [1.3, 0.0, -0.5])
    # removesuffix, not rstrip: a question ending in letters of the suffix keeps them.
    tricky = "\n\nHuman: say tnatsissA\n\nAssistant:"
    assert parse_prompt(format_prompt(tricky, [1, 2, 3], template), template)[0] == tricky
    custom = RewardTemplate(tags=["[a]", "[b]"], number_format="{:+.2f}")
    assert format_prompt("plain prompt", [0.5, -1], custom) == "plain prompt [a] +0.50 [b] -1.00"
    # Zero is written one way whatever its sign, in every format.
    whole = RewardTemplate(tags=["[a]", "[b]"], number_format="{:.0f}")
    assert format_prompt("p", [-0.3, 0.3], whole) == "p [a] 0 [b] 0"
    assert format_prompt("p", [-0.001, 0.001], custom) == "p [a] +0.00 [b] +0.00"


def test_mors_target_sampler():
    rng = np.random.default_rng(0)
    targets = sample_targets(2000, LOW3, HIGH3, rng)
    at_high = np.isclose(targets, HIGH3)
    assert (at_high.sum(axis=1) >= 2).all()  # all objectives but (at most) one at their maximum
    free = targets[~at_high]
    assert ((free >= -2.0) & (free <= 4.0)).all()
    # Each objective is the free one about a third of the time.
    assert np.allclose((~at_high).mean(axis=0), 1 / 3, atol=0.05)


def test_mors_filter_by_hand():
    scores = np.array([[0, 0], [1, 0], [2, 0], [3, 9], [0, 8], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5]], float)
    # 0.7-quantiles (linear interpolation, position 6.3 of 10): objective 1 → 0.3, objective 2 → 4.3.
    assert mors_filter(scores, 0.7).tolist() == [False, True, True, True, True, False, False, False, False, True]
    assert mors_filter(scores, 0.0).all()


def write_pairs(path, n=24):
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": f"\n\nHuman: tell me about topic {i % 6}\n\nAssistant:",
                "chosen": "a good day is a sunny day with friends" + " and friends" * (i % 3),
                "rejected": "the weather is bad",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ric_args(tiny_lm, dataset, out, cache, **extra):
    args = {
        "model_name_or_path": str(tiny_lm),
        "dataset": str(dataset),
        "output_dir": str(out),
        "score_cache": str(cache),
        "max_steps": "4",
        "per_device_train_batch_size": "4",
        "save_steps": "2",
        "report_to": "none",
        "online_iterations": "1",
        "online_prompts": "16",
        "online_max_steps": "2",
        "sample_max_new_tokens": "12",
        "logging_steps": "1",
    }
    args.update(extra)
    flat = ["ric", "--objectives", "length", "vader"]
    for key, value in args.items():
        flat += [f"--{key}", value]
    return flat


# A corpus a tiny model learns to steer on within a minute: every answer is good or bad news (VADER's sign)
# told in two or nine words (length), so the two objectives vary independently and each is one decision.
QUESTIONS = ["how was it", "any news", "what happened", "tell me"]
STEERING = [
    {"prompt": f"\n\nHuman: {question}?\n\nAssistant:", "response": mood + tail}
    for question in QUESTIONS
    for mood in ("good", "great", "bad", "awful")
    for tail in (" news", " news about the trip to the park today")
]


def test_ric_end_to_end_and_steering(tmp_path, capsys):
    dataset = tmp_path / "steering.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in STEERING))
    # The tokenizer sees the answers often enough to give their words tokens of their own.
    texts = [f"{row['prompt']} <length> -1.0 <vader> 1.0 {row['response']}" for row in STEERING]
    model = build_causal_lm(tmp_path / "lm", texts=texts + [" " + row["response"] for row in STEERING] * 3)
    run = tmp_path / "run"
    steps = {"max_steps": "150", "per_device_train_batch_size": "8", "learning_rate": "1e-2"}
    steps |= {"lr_scheduler_type": "constant", "save_strategy": "no", "logging_steps": "50", "online_min_words": "1"}
    assert main(ric_args(model, dataset, run, tmp_path / "c.sqlite", **steps)) == 0
    manifest = json.loads((run / "moalign.json").read_text())
    assert manifest["method"] == "ric" and manifest["model"] == "stages/online_1"
    assert manifest["stats"]["names"] == ["length", "vader"]
    assert set(manifest["training"]["stages"]) >= {"offline", "online_1", "generate_1"}
    policy = load_policy(run)
    low, high = np.array(manifest["ric"]["low"]), np.array(manifest["ric"]["high"])
    assert policy.prepare_prompt("\n\nHuman: hi\n\nAssistant:", np.array([1.0, 0.0])).endswith(
        f"<length> {high[0]:.1f} <vader> {low[1]:.1f} \n\nAssistant:"
    )

    # Raising a weight raises its objective: 16 sampled answers (4 prompts × 4 seeds) per preference.
    prompts = [row["prompt"] for row in STEERING[::8]] * 4
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11)
    objectives = build_all(["length", "vader"])

    answers = {
        weights: policy.generate(prompts, [float(w) for w in weights.split(",")], params) for weights in ("1,0", "0,1")
    }

    def means(weights: str) -> np.ndarray:
        return np.array([np.mean(objective.score(prompts, answers[weights])) for objective in objectives])

    wants_length, wants_vader = means("1,0"), means("0,1")
    # Trained on 2- and 9-word answers and on VADER scores of −0.54 to 0.62: measured effects of 4.8 words and 1.0
    # (training seed 1; at 100 steps instead of 150 the VADER effect fell to 0.24 on that seed).
    assert wants_length[0] - wants_vader[0] > 2.5, (wants_length, wants_vader)
    assert wants_vader[1] - wants_length[1] > 0.4, (wants_length, wants_vader)

    # `moalign generate` prints those very answers: its output follows --weights, and the seed fixes it.
    for weights, expected in answers.items():
        capsys.readouterr()
        flags = ["--weights", weights, "--seed", "11", "--max_new_tokens", "16", "--temperature", "1"]
        assert main(["generate", str(run), *prompts, *flags]) == 0
        assert capsys.readouterr().out == "".join(f"{p}\n{a}\n\n" for p, a in zip(prompts, expected))


def test_ric_resumes_an_interrupted_offline_stage(tiny_lm, tmp_path, monkeypatch):
    from trl import SFTTrainer

    dataset, run, cache = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "run", tmp_path / "c.sqlite"
    args = ric_args(tiny_lm, dataset, run, cache, online_iterations="0", max_steps="6")
    original = SFTTrainer.training_step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed during step 4: checkpoint-2 is on disk
        return original(self, *a, **k)

    monkeypatch.setattr(SFTTrainer, "training_step", dying_step)
    assert main(args) == 130
    assert (run / "checkpoints" / "offline" / "checkpoint-2").is_dir()
    assert not (run / "stages" / "offline").exists()

    calls["n"] = -1000  # let the rerun go through, counting its steps
    assert main(args) == 0
    assert calls["n"] == -1000 + 4  # resumed at step 2: four steps left, not six
    stage = json.loads((run / "stages" / "offline" / "moalign_stage.json").read_text())
    assert stage["steps"] == 6
    # A third run finds every stage done and trains nothing.
    assert main(args) == 0
    assert calls["n"] == -1000 + 4


def test_ric_bad_config_is_one_line(tiny_lm, tmp_path, capsys):
    dataset = write_pairs(tmp_path / "pairs.jsonl")
    args = ric_args(tiny_lm, dataset, tmp_path / "run", tmp_path / "c.sqlite", preference_mapping="nope")
    assert main(args) == 2
    assert "preference_mapping" in capsys.readouterr().err
    assert main(["ric", "--config", str(tmp_path / "missing.yaml")]) == 2
