"""MORLAIF preference models: RewardTrainer with the judge's margins, accuracy on a separable toy set,
linear weights from human labels, the `pm:` objective, LoRA, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CORPUS, build_classifier

import moalign.objectives.preference  # noqa: F401  (registers pm: until objectives/__init__ imports it)
from moalign import cli, objectives
from moalign.errors import MoalignError
from moalign.methods import preference_model as pm
from moalign.pareto import parse_weights
from moalign.run import read_manifest

TRAINING = {
    "per_device_train_batch_size": 8,
    "num_train_epochs": 4,
    "learning_rate": 0.01,
    "max_length": 128,
    "save_strategy": "no",
    "report_to": "none",
    "logging_steps": 50,
    "disable_tqdm": True,
    "seed": 0,
}


def toy_labels(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Feedback labels where `kindness` prefers the response ending in "kindly" and `brevity` the shorter
    one; people agree with kindness, and so does `courtesy` by smaller margins. A or B is random, so neither
    position nor length alone separates."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = CORPUS[i % len(CORPUS)]
        words = base.split()
        kind = " ".join(words[: rng.randint(3, len(words))]) + " kindly"
        plain = " ".join(words[: rng.randint(3, len(words))])
        kind_is_a = rng.random() < 0.5
        a, b = (kind, plain) if kind_is_a else (plain, kind)
        strong, weak = -0.1 - rng.random(), -3.0 - rng.random()
        shorter_is_a = len(a) < len(b)
        rows.append(
            {
                "id": f"pair-{i}",
                "prompt": f"\n\nHuman: tell me something {i}\n\nAssistant:",
                "response_a": a,
                "response_b": b,
                "human": "A" if kind_is_a else "B",
                "kindness.logp_A": strong if kind_is_a else weak,
                "kindness.logp_B": weak if kind_is_a else strong,
                "brevity.logp_A": strong if shorter_is_a else weak,
                "brevity.logp_B": weak if shorter_is_a else strong,
                "courtesy.logp_A": strong if kind_is_a else strong - 1.0,
                "courtesy.logp_B": strong - 1.0 if kind_is_a else strong,
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pm run on the toy labels through the command line and a recipe file with several sections."""
    root = tmp_path_factory.mktemp("pm")
    backbone = build_classifier(root / "backbone")
    feedback = root / "feedback"
    feedback.mkdir()
    toy_labels().to_parquet(feedback / "labels.parquet")
    recipe = {
        "feedback": {"judge": "openai:unused"},
        "pm": {
            "model_name_or_path": str(backbone),
            "dataset": str(feedback),
            "output_dir": str(root / "run"),
            "principles": ["kindness"],
            "eval_fraction": 0.25,
            "fit_weights": True,
            **TRAINING,
        },
        "morl": {"scalarization": "linear"},
    }
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    assert cli.main(["pm", "--config", str(config)]) == 0
    return root / "run"


def test_preference_model_learns_the_judge_and_the_people(trained):
    manifest = read_manifest(trained)
    assert manifest["method"] == "pm"
    assert manifest["objectives"] == [f"pm:{trained}/kindness"]
    entry = manifest["principles"]["kindness"]
    assert entry["heldout_pairs"] >= 10 and entry["train_pairs"] >= 40
    assert entry["judge_accuracy"] > 0.9
    assert entry["human_accuracy"] > 0.9
    assert entry["judge_human_agreement"] == 1.0
    weights = manifest["linear_weights"]
    assert weights["weights"]["kindness"] > 0 and weights["heldout_accuracy"] > 0.9
    assert parse_weights(weights["preference"], 1).tolist() == [1.0]  # a `weights:` entry for moalign morl
    assert (trained / "principles" / "kindness" / "model.safetensors").exists()
    assert not (trained / "checkpoints").exists()


def test_fit_weights_finds_the_principle_people_follow():
    """People follow principle 0 (noisily); principle 1 is unrelated, so it gets (almost) no weight."""
    rng = np.random.default_rng(0)
    differences = rng.normal(size=(400, 2)) * [1.0, 3.0]
    prefers_a = differences[:, 0] + rng.normal(scale=0.3, size=400) > 0
    train = np.arange(400) < 300
    fitted = pm.fit_weights(differences, prefers_a, train, ["kind", "short"], stds=np.array([1.0, 3.0]))
    assert fitted["weights"]["kind"] > 2 and abs(fitted["weights"]["short"]) < 0.3
    assert fitted["heldout_accuracy"] > 0.85 and fitted["heldout_pairs"] == 100
    kind, short = parse_weights(fitted["preference"], 2)
    assert kind > 0.8 and kind + short == pytest.approx(1.0)


def test_pm_objective_loads_and_scores(trained):
    objective = objectives.build(f"pm:{trained}/kindness")
    assert objective.name == "kindness"
    scores = objective.score(["\n\nHuman: hi\n\nAssistant:"] * 2, ["the cat sat kindly", "the cat sat"])
    assert scores[0] > scores[1]
    also = objectives.build(f"pm:{trained}/principles/kindness?batch_size=1")
    assert np.allclose(also.score(["q"], ["a good day kindly"]), objective.score(["q"], ["a good day kindly"]))
    with pytest.raises(MoalignError, match="has no principle 'brevity'; it has kindness"):
        objectives.build(f"pm:{trained}/brevity")


def test_rerun_skips_trained_principles_and_adds_new_ones(trained, tmp_path):
    """A second principle (plain Bradley–Terry, LoRA, merged) joins the run; kindness is not retrained."""
    before = json.loads((trained / "principles" / "kindness" / "moalign_stage.json").read_text())
    config = pm.PMConfig(
        output_dir=str(trained),
        model_name_or_path=read_manifest(trained)["base_model"],
        dataset=read_manifest(trained)["feedback"],
        principles=["kindness", "courtesy"],
        eval_fraction=0.25,
        margin_scale=0.0,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        **{**TRAINING, "num_train_epochs": 2},
    )
    pm.train(config)
    manifest = read_manifest(trained)
    assert list(manifest["principles"]) == ["kindness", "courtesy"]
    pm.train(dataclasses.replace(config, principles=["courtesy"]))  # a subset keeps the others usable
    assert read_manifest(trained)["objective_names"] == ["kindness", "courtesy"]
    assert manifest["principles"]["kindness"]["seconds"] == before["seconds"]
    assert manifest["principles"]["courtesy"]["judge_accuracy"] > 0.9
    # The LoRA adapter was merged into a plain classifier that `pm:` loads, and it carries what was learned.
    assert not (trained / "principles" / "courtesy" / "adapter_config.json").exists()
    courtesy = objectives.build(f"pm:{trained}/courtesy")
    scores = courtesy.score(["\n\nHuman: hi\n\nAssistant:"] * 2, ["the cat sat kindly", "the cat sat"])
    assert scores[0] > scores[1]


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    toy_labels(8).to_parquet(feedback / "labels.parquet")
    base = ["pm", "--model_name_or_path", "unused", "--dataset", str(feedback), "--output_dir", str(tmp_path / "r")]
    assert cli.main([*base, "--principles", "kindness", "honesty"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown principle(s) ['honesty']; the labels have kindness, brevity, courtesy" in err and "\n" not in err

    toy_labels(8).drop(columns=["response_b"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(MoalignError, match=r"lacks columns \['response_b'\]"):
        pm.load_labels(str(tmp_path / "bad.parquet"))
    unlabelled = toy_labels(8).drop(columns=["human"])
    unlabelled.to_parquet(tmp_path / "unlabelled.parquet")
    config = pm.PMConfig(
        output_dir=str(tmp_path / "r"), model_name_or_path="x", dataset=str(tmp_path / "unlabelled.parquet")
    )
    config.fit_weights = True
    with pytest.raises(MoalignError, match="fit_weights needs human labels"):
        pm.train(config)
    with pytest.raises(MoalignError, match="not a `moalign pm` run"):
        (tmp_path / "r2").mkdir()
        (tmp_path / "r2" / "moalign.json").write_text('{"method": "sft"}')
        objectives.build(f"pm:{tmp_path / 'r2'}/kindness")
