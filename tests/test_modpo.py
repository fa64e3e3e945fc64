"""MODPO: the loss by formula, its equality with TRL's DPO at w = e_k, margins through the collator, the recipe."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import build_causal_lm
from trl import DPOConfig, DPOTrainer

from moalign.cli import main
from moalign.errors import MoalignError
from moalign.generation import SamplingParams
from moalign.methods.common import load_causal_lm, load_tokenizer
from moalign.methods.modpo import (
    MARGIN_CHOSEN,
    MARGIN_REJECTED,
    MODPOTrainer,
    check_margins,
    check_trainer_weights,
    compute_margins,
    load_pairs,
    modpo_loss,
    pairs_from_choice,
    pairs_from_scores,
    training_dataset,
)
from moalign.policy import load_policy

PROMPT = "\n\nHuman: what should I do?\n\nAssistant:"
PAIRS = [
    (PROMPT, "cook the rice slowly and add some salt", "the road is closed"),
    (PROMPT, "a good day is a sunny day with friends", "the disk is full"),
    ("\n\nHuman: the cat?\n\nAssistant:", "the cat sat on the mat and was happy", "bad"),
    ("\n\nHuman: plants?\n\nAssistant:", "plants need water, light and good soil", "the weather is bad"),
]


def pairs_dataset(margin_chosen=None, margin_rejected=None) -> datasets.Dataset:
    pairs = datasets.Dataset.from_dict(
        {"prompt": [p[0] for p in PAIRS], "chosen": [p[1] for p in PAIRS], "rejected": [p[2] for p in PAIRS]}
    )
    if margin_chosen is None:
        return training_dataset(pairs)
    return training_dataset(pairs, (np.asarray(margin_chosen), np.asarray(margin_rejected)))


def dpo_args(out: Path, **extra) -> DPOConfig:
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=len(PAIRS),
        max_length=64,
        beta=0.1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        seed=0,
    )
    settings.update(extra)
    return DPOConfig(**settings)


def whole_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def test_modpo_loss_by_hand():
    # β = 0.1, w = (0.5, 0.5): inner = 0.1·(−1 + 1.5) − 0.1·(−2 + 1) − 0.5·(2 − 1) = −0.35; logit = −0.7.
    loss = modpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-2.0]),
        torch.tensor([-1.5]),
        torch.tensor([-1.0]),
        torch.tensor([[2.0]]),
        torch.tensor([[1.0]]),
        [0.5, 0.5],
        0.1,
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.7)), abs=1e-6)
    # Three objectives, two margins. Row 1: inner = 0.2·0.5 − 0.2·(−0.5) − (0.3·(1 − 0) + 0.2·(−1 − 1)) = 0.3,
    # logit 0.3 / 0.5 = 0.6. Row 2 (no margins): inner = 0.2, logit 0.4.
    loss = modpo_loss(
        torch.tensor([0.0, 0.0]),
        torch.tensor([0.0, 0.0]),
        torch.tensor([-0.5, -0.5]),
        torch.tensor([0.5, 0.5]),
        torch.tensor([[1.0, -1.0], [0.0, 0.0]]),
        torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
        [0.5, 0.3, 0.2],
        0.2,
    )
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.6)), math.log(1 + math.exp(-0.4))])
    # A larger margin for the chosen response means its objective-k reward must beat more: a larger loss.
    base = dict(
        policy_chosen_logps=torch.tensor([-1.0]),
        policy_rejected_logps=torch.tensor([-2.0]),
        ref_chosen_logps=torch.tensor([-1.5]),
        ref_rejected_logps=torch.tensor([-1.0]),
        margin_rejected=torch.tensor([[0.0]]),
        weights=[0.5, 0.5],
        beta=0.1,
    )
    assert modpo_loss(margin_chosen=torch.tensor([[1.0]]), **base) > modpo_loss(
        margin_chosen=torch.tensor([[0.0]]), **base
    )


def test_equals_trl_dpo_at_the_corner(tiny_lm, tmp_path):
    """w = e_k, zero margins: the MODPO trainer's loss is TRL's sigmoid DPO loss on the same batch."""
    dpo = DPOTrainer(
        model=load_causal_lm(str(tiny_lm)),
        args=dpo_args(tmp_path / "dpo"),
        train_dataset=pairs_dataset(),
        processing_class=load_tokenizer(str(tiny_lm)),
    )
    modpo = MODPOTrainer(
        model=load_causal_lm(str(tiny_lm)),
        weights=[1.0, 0.0],
        args=dpo_args(tmp_path / "modpo"),
        train_dataset=pairs_dataset(np.zeros((4, 1)), np.zeros((4, 1))),
        processing_class=load_tokenizer(str(tiny_lm)),
    )
    # Perturb both policies the same way so the log-ratios (and the loss) are not trivially zero.
    for trainer in (dpo, modpo):
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    batch = whole_batch(modpo)
    assert batch[MARGIN_CHOSEN].shape == (4, 1)
    expected = dpo.compute_loss(dpo.model, whole_batch(dpo))
    got = modpo.compute_loss(modpo.model, batch)
    assert abs(expected.item() - math.log(2)) > 1e-4
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_trainer_loss_is_the_formula(tiny_lm, tmp_path):
    """Nonzero margins, w_k < 1, a reference that differs from the policy: the trainer computes modpo_loss."""
    reference = build_causal_lm(tmp_path / "ref", seed=3)
    margin_chosen = [[1.0], [-0.5], [2.0], [0.0]]
    margin_rejected = [[0.0], [0.5], [-1.0], [0.3]]
    weights = [0.3, 0.7]
    trainer = MODPOTrainer(
        model=load_causal_lm(str(tiny_lm)),
        ref_model=load_causal_lm(str(reference)),
        weights=weights,
        args=dpo_args(tmp_path / "modpo", beta=0.5),
        train_dataset=pairs_dataset(margin_chosen, margin_rejected),
        processing_class=load_tokenizer(str(tiny_lm)),
    )
    batch = whole_batch(trainer)
    policy_c, policy_r = trainer.compute_ref_log_probs(trainer.model, batch)
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    expected = modpo_loss(
        policy_c, policy_r, ref_c, ref_r, torch.tensor(margin_chosen), torch.tensor(margin_rejected), weights, 0.5
    ).mean()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), abs=1e-6)

    # Precomputed reference log-probs (computed once, before training) give the same loss.
    precomputed = MODPOTrainer(
        model=load_causal_lm(str(tiny_lm)),
        ref_model=load_causal_lm(str(reference)),
        weights=weights,
        args=dpo_args(tmp_path / "pre", beta=0.5, precompute_ref_log_probs=True),
        train_dataset=pairs_dataset(margin_chosen, margin_rejected),
        processing_class=load_tokenizer(str(tiny_lm)),
    )
    batch = whole_batch(precomputed)
    assert "ref_chosen_logps" in batch
    assert precomputed.compute_loss(precomputed.model, batch).item() == pytest.approx(expected.item(), abs=1e-6)


def test_margins_reach_the_loss_in_training(tiny_lm, tmp_path):
    """A real training step: through dataset columns, the collator and the loss, margins change the loss."""
    losses = []
    for name, (mc, mr) in {
        "zero": (np.zeros((4, 1)), np.zeros((4, 1))),
        "two": (np.full((4, 1), 2.0), np.zeros((4, 1))),
    }.items():
        trainer = MODPOTrainer(
            model=load_causal_lm(str(tiny_lm)),
            weights=[0.5, 0.5],
            args=dpo_args(tmp_path / name, max_steps=1),
            train_dataset=pairs_dataset(mc, mr),
            processing_class=load_tokenizer(str(tiny_lm)),
        )
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    # At step 0 the policy is the reference: the loss is −log σ(−(1/w_k)·w_{−k}·Δm) exactly.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[1] == pytest.approx(math.log(1 + math.exp(2.0)), abs=1e-4)


def test_validation_of_weights_and_margins():
    assert check_trainer_weights([0.25, 0.75]) == [0.25, 0.75]
    with pytest.raises(MoalignError, match="must be > 0"):
        check_trainer_weights([0.0, 1.0])
    with pytest.raises(MoalignError, match="sum to 1"):
        check_trainer_weights([0.5, 0.6])
    with pytest.raises(MoalignError, match="NaN or infinite"):
        check_margins(np.array([[0.0], [np.nan]]), np.zeros((2, 1)), ["dpo:run"])
    with pytest.raises(MoalignError, match="margins per pair"):
        modpo_loss(*[torch.zeros(2)] * 4, torch.zeros(2, 2), torch.zeros(2, 2), [0.5, 0.5], 0.1)


def write_pairs(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return path


def cli_args(command: str, model: Path, dataset: Path, out: Path, **extra) -> list[str]:
    args = {
        "model_name_or_path": str(model),
        "dataset": str(dataset),
        "output_dir": str(out),
        "max_steps": "1",
        "per_device_train_batch_size": "2",
        "report_to": "none",
        "save_strategy": "no",
        "max_length": "64",
        "sample_max_new_tokens": "4",
        **extra,
    }
    flat = [command, "--objectives", "vader", "brevity"]
    for key, value in args.items():
        flat += [f"--{key}"] + (value if isinstance(value, list) else [value])
    return flat


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"preferences": ["0,1"]}, "must be > 0"),
        ({"preferences": ["0.3,0.3"]}, "sum to 1"),
        ({"preferences": ["0.5,0.3,0.2"]}, "3 entries, expected 2"),
        ({"preferences": ["a,b"]}, "use '0.2,0.8'"),
        ({"preferences": ["0.5,0.5", "0.5,0.5"]}, "twice"),
        ({"ld_alpha": "0.5"}, "unset ld_alpha"),
        ({"use_weighting": "true"}, "unset use_weighting"),
        ({"loss_weights": ["1.0"]}, "unset loss_weights"),
        ({"margin_objectives": ["vader", "brevity"]}, "one per other objective"),
        ({"margin_objectives": ["dpo:/nonexistent/run"]}, "does not exist"),
        ({"objective_index": "2"}, "out of range"),
        ({"loss_type": "hinge"}, "sigmoid"),
    ],
)
def test_bad_config_fails_before_work(tiny_lm, tmp_path, capsys, extra, message):
    dataset = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    run = tmp_path / "run"
    assert main(cli_args("modpo", tiny_lm, dataset, run, **extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (run / "models").exists()


def test_pairs_from_scores():
    frame = pd.DataFrame(
        {
            "prompt": ["p"] * 5 + ["q"] * 2 + ["r"],
            "response": ["a", "b", "c", "d", "e", "x", "y", "only"],
            "vader": [0.9, 0.1, 0.5, 0.45, 0.9, 0.2, 0.2, 1.0],
        }
    )
    pairs = pairs_from_scores(frame, "vader")
    # p: a (0.9) with b (0.1), e (0.9) with d (0.45); c is the odd one out. q ties; r has one response.
    assert pairs[["prompt", "chosen", "rejected"]].values.tolist() == [["p", "a", "b"], ["p", "e", "d"]]
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()
    assert pairs_from_scores(frame, "vader", min_gap=0.5)["chosen"].tolist() == ["a"]
    with pytest.raises(MoalignError, match="no prompt"):
        pairs_from_scores(frame, "vader", min_gap=2.0)
    with pytest.raises(MoalignError, match="no 'relevance' column"):
        pairs_from_scores(frame, "relevance")
    with pytest.raises(MoalignError, match="NaN"):
        pairs_from_scores(frame.assign(vader=[np.nan] + [0.0] * 7), "vader")


def pair_config(dataset: Path, **extra) -> SimpleNamespace:
    settings = dict(
        dataset=str(dataset),
        dataset_split="train",
        max_samples=None,
        pair_choice_column=None,
        pairs_from=None,
        pairs_min_gap=0.0,
        prompt_template="{prompt}",
        objective_index=1,
        objectives=["vader", "brevity"],
        score_cache=None,
    )
    settings.update(extra)
    return SimpleNamespace(**settings)


def test_load_pairs_from_scored_samples_and_choice_columns(tmp_path):
    samples = pd.DataFrame(
        {"prompt": ["p", "p", "q", "q"], "response": ["a b c", "a", "x", "x y"], "brevity": [-3.0, -1.0, -1.0, -2.0]}
    )
    samples.to_parquet(tmp_path / "samples.parquet")
    pairs = load_pairs(
        pair_config(tmp_path / "samples.parquet", prompt_template="Q: {prompt} A:"), ["vader", "brevity"]
    )
    assert pairs.to_list() == [
        {"prompt": "Q: p A:", "chosen": "a", "rejected": "a b c"},
        {"prompt": "Q: q A:", "chosen": "x", "rejected": "x y"},
    ]
    two = datasets.Dataset.from_dict(
        {"prompt": ["p", "q"], "response_0": ["a", "b"], "response_1": ["c", "d"], "safer_response_id": [1, 0]}
    )
    chosen = pairs_from_choice(two, "safer_response_id")
    assert chosen["chosen"] == ["c", "b"] and chosen["rejected"] == ["a", "d"]
    with pytest.raises(MoalignError, match="needs columns"):
        pairs_from_choice(two, "better_response_id")


def test_objective_margins_are_zscored(tmp_path):
    pairs = datasets.Dataset.from_dict(
        {"prompt": ["p", "q"], "chosen": ["one two three", "one"], "rejected": ["one", "one two three four five"]}
    )
    config = SimpleNamespace(
        score_cache=str(tmp_path / "c.sqlite"), margin_normalize=True, margin_batch_size=4, max_length=64
    )
    margin_c, margin_r, stats = compute_margins(pairs, ["brevity"], config)
    raw = np.array([-3.0, -1.0, -1.0, -5.0])  # brevity = −words, over all four samples
    expected = (raw - raw.mean()) / raw.std()
    assert np.concatenate([margin_c[:, 0], margin_r[:, 0]]) == pytest.approx(expected)
    assert stats["names"] == ["brevity"] and stats["mean"] == pytest.approx([raw.mean()])


def test_dpo_then_modpo_end_to_end_and_resume(tiny_lm, tmp_path, monkeypatch):
    """The paper's recipe: DPO on the other objective's pairs, then MODPO with its implicit reward as margin."""
    vader_pairs = write_pairs(tmp_path / "vader.jsonl", PAIRS)
    brevity_pairs = write_pairs(tmp_path / "brevity.jsonl", [(p, r, c) for p, c, r in PAIRS])
    dpo_run, run = tmp_path / "dpo-brevity", tmp_path / "modpo"
    assert main(cli_args("dpo", tiny_lm, brevity_pairs, dpo_run, objective_index="1")) == 0
    dpo_manifest = json.loads((dpo_run / "moalign.json").read_text())
    assert dpo_manifest["method"] == "dpo" and dpo_manifest["trained_objective"] == "brevity"
    assert dpo_manifest["beta"] == pytest.approx(0.1)

    config = {
        "model_name_or_path": str(tiny_lm),
        "dataset": str(vader_pairs),
        "output_dir": str(run),
        "objectives": ["vader", "brevity"],
        "margin_objectives": [f"dpo:{dpo_run}"],
        "preferences": ["0.5,0.5", "1,0"],
        "max_steps": 2,
        "save_steps": 1,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "report_to": "none",
        "sample_max_new_tokens": 4,
    }
    (tmp_path / "modpo.yaml").write_text(yaml.safe_dump(config))
    args = ["modpo", "--config", str(tmp_path / "modpo.yaml")]

    # Interrupted during the first weight's second step: its checkpoint-1 stays for the rerun.
    original, calls = MODPOTrainer.training_step, {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(MODPOTrainer, "training_step", dying_step)
    assert main(args) == 130
    assert (run / "checkpoints" / "w0.5-0.5" / "checkpoint-1").is_dir()
    margins = pd.read_parquet(run / "margins.parquet")
    assert len(margins) == 4 and np.isfinite(np.stack(margins[MARGIN_CHOSEN].to_numpy())).all()
    assert not np.allclose(np.stack(margins[MARGIN_CHOSEN]), np.stack(margins[MARGIN_REJECTED]))

    calls["n"] = -1000
    assert main(args) == 0
    assert calls["n"] == -1000 + 1 + 2  # one step left of the first weight, two of the second
    manifest = json.loads((run / "moalign.json").read_text())
    assert manifest["method"] == "modpo" and manifest["objective_names"] == ["vader", "brevity"]
    assert [m["preference"] for m in manifest["models"]] == [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]
    assert manifest["models"][2]["source"] == "dpo" and (run / manifest["models"][2]["path"]).is_dir()
    stage = json.loads((run / "models" / "w0.5-0.5" / "moalign_stage.json").read_text())
    assert stage["steps"] == 2 and stage["weights"] == [0.5, 0.5]

    policy = load_policy(run)
    assert policy.served_by(np.array([0.6, 0.4])) == "w0.5-0.5"
    assert policy.served_by(np.array([0.0, 1.0])) == "model"  # the DPO corner
    # The corner's answers are the DPO run's own, token for token and log-probability for log-probability;
    # the MODPO model trained for (0.5, 0.5) answers the same seeds otherwise.
    prompts = [pair[0] for pair in PAIRS]
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i) for i in range(len(prompts))]

    def answers(served, weights):
        return [(c.token_ids, c.logprobs) for c in served.complete(prompts, [weights] * len(prompts), params)]

    corner = answers(policy, [0.0, 1.0])
    assert corner == answers(load_policy(dpo_run), [0.0, 1.0])
    assert any(ids for ids, _ in corner)
    assert answers(policy, [0.6, 0.4]) != corner

    # A rerun finds every weight trained: no training step at all.
    assert main(args) == 0
    assert calls["n"] == -1000 + 3
