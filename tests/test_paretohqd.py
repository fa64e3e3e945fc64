"""ParetoHqD: the selection against hand computations and moocore, select-only output, a tiny two-stage run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import moocore
import numpy as np
import pandas as pd
import pytest

from moalign.cli import main
from moalign.errors import MoalignError
from moalign.generation import SamplingParams
from moalign.methods.paretohqd import representatives, select, usable_responses
from moalign.policy import load_policy

# N = 2, scores in [0, 10] on both objectives (normalised: divide by 10).
SCORES_2D = np.array(
    [
        [10, 0],  # 0 A  layer 0
        [0, 10],  # 1 B  layer 0
        [7, 7],  # 2 C  layer 0
        [6, 5],  # 3 D  layer 1
        [5, 6],  # 4 E  layer 1
        [9, 2],  # 5 F  layer 0
        [2, 2],  # 6 G  layer 2
        [1, 1],  # 7 H  layer 3
    ],
    dtype=float,
)
LAYERS_2D = [0, 0, 0, 1, 1, 0, 2, 3]

# N = 3, scores in [0, 10] on every objective.
SCORES_3D = np.array(
    [
        [10, 0, 0],  # 0 layer 0
        [0, 10, 0],  # 1 layer 0
        [0, 0, 10],  # 2 layer 0
        [6, 6, 6],  # 3 layer 0
        [8, 4, 3],  # 4 layer 1 (under 7)
        [5, 5, 4],  # 5 layer 1 (under 3)
        [3, 3, 3],  # 6 layer 2
        [9, 5, 5],  # 7 layer 0
    ],
    dtype=float,
)
LAYERS_3D = [0, 0, 0, 0, 1, 1, 2, 0]


def test_layers_are_moocores_ranks():
    assert moocore.pareto_rank(SCORES_2D, maximise=True).tolist() == LAYERS_2D
    assert moocore.pareto_rank(SCORES_3D, maximise=True).tolist() == LAYERS_3D
    rng = np.random.default_rng(0)
    for n_objectives in (2, 3):
        points = np.round(rng.normal(size=(300, n_objectives)), 1)  # rounding makes ties and duplicates
        ranks = moocore.pareto_rank(points, maximise=True)
        for n_layers in (1, 2, 4):
            pool = select(points, np.full(n_objectives, 1 / n_objectives), k=len(points), n_layers=n_layers)
            assert sorted(pool.tolist()) == np.flatnonzero(ranks < n_layers).tolist()


@pytest.mark.parametrize(
    ("preference", "k", "n_layers", "expected"),
    [
        # balanced: distance to the diagonal is |p1 − p2|/√2; C on it, D and E tie at 0.07 (D: lower index)
        ((0.5, 0.5), 3, 2, [2, 3, 4]),
        ((0.5, 0.5), 2, 2, [2, 3]),
        ((0.5, 0.5), 2, 3, [2, 6]),  # G (layer 2) lies on the diagonal too, C wins the tie by its layer
        # all on objective 1: the ray is x = 1 going down, distance 1 − p1: A 0, F 0.1, C 0.3
        ((1.0, 0.0), 2, 2, [0, 5]),
        ((1.0, 0.0), 3, 2, [0, 5, 2]),
        # (0.2, 0.8): |cross(p − 1, u)| with u ∝ (−0.8, −0.2): C .218, B .243, E .267, D .388, F .752, A .970
        ((0.2, 0.8), 3, 2, [2, 1, 4]),
        ((0.2, 0.8), 6, 2, [2, 1, 4, 3, 5, 0]),
    ],
)
def test_select_two_objectives_by_hand(preference, k, n_layers, expected):
    assert select(SCORES_2D, preference, k, n_layers=n_layers).tolist() == expected


@pytest.mark.parametrize(
    ("preference", "k", "n_layers", "expected"),
    [
        # balanced: distance to the diagonal = |p − mean(p)|: 3 → 0, 5 → .082, 7 → .327, 4 → .374
        ((1 / 3, 1 / 3, 1 / 3), 3, 2, [3, 5, 7]),
        ((1 / 3, 1 / 3, 1 / 3), 4, 2, [3, 5, 7, 4]),
        ((1 / 3, 1 / 3, 1 / 3), 2, 3, [3, 6]),
        # e1: distance² = (1 − p1)² + (p2 − p3)²/2: 0 → 0, 7 → .1, 4 → .212, 3 → .4, 5 → .505
        ((1.0, 0.0, 0.0), 3, 2, [0, 7, 4]),
        ((1.0, 0.0, 0.0), 5, 2, [0, 7, 4, 3, 5]),
    ],
)
def test_select_three_objectives_by_hand(preference, k, n_layers, expected):
    assert select(SCORES_3D, preference, k, n_layers=n_layers).tolist() == expected


def test_angle_distance_prefers_direction_over_depth():
    # w = (1, 0) seen from the ideal point: F at atan(.1/.8) = .12 rad, D at atan(.4/.5) = .67, C at 45° = .79
    assert select(SCORES_2D, (1.0, 0.0), 3, n_layers=2, distance="angle").tolist() == [0, 5, 3]
    assert select(SCORES_2D, (1.0, 0.0), 3, n_layers=2).tolist() == [0, 5, 2]  # perpendicular: C (.3) before D


def test_select_normalises_each_objective():
    # Scaling an objective must not change the choice: the selection works on min-max normalised scores.
    scaled = SCORES_2D * np.array([1000.0, 0.01]) + np.array([-5.0, 3.0])
    for w in ((0.5, 0.5), (0.2, 0.8), (1.0, 0.0)):
        assert select(scaled, w, 4, n_layers=2).tolist() == select(SCORES_2D, w, 4, n_layers=2).tolist()


def test_select_rejects_bad_input():
    with pytest.raises(MoalignError, match="k must be"):
        select(SCORES_2D, (0.5, 0.5), 0)
    with pytest.raises(MoalignError, match="sum to 1"):
        select(SCORES_2D, (0.5, 0.6), 2)
    with pytest.raises(MoalignError, match="at least two objectives"):
        select(SCORES_2D[:, :1], (1.0,), 2)


def test_representatives_are_the_extremes_and_the_balanced_preference():
    grid = np.array([[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]])
    assert representatives(grid) == [4, 0, 2]


def test_stage2_keeps_only_usable_responses():
    frame = pd.DataFrame(
        {
            "prompt": ["p", "p", "p", "p", "q"],
            "response": ["cook the rice slowly", "", "ok", "cook the rice slowly", "cook the rice slowly"],
        }
    )
    kept, dropped = usable_responses(frame, drop_degenerate=True)
    assert kept["response"].tolist() == ["cook the rice slowly", "cook the rice slowly"]
    assert kept["prompt"].tolist() == ["p", "q"]
    assert dropped == {"empty": 1, "degenerate": 1, "duplicate": 1}
    kept, dropped = usable_responses(frame, drop_degenerate=False)
    assert "ok" in kept["response"].tolist() and dropped["degenerate"] == 0


# ----------------------------------------------------------------------------- the command


PROMPTS = [
    "\n\nHuman: what should I do today?\n\nAssistant:",
    "\n\nHuman: how do I cook rice?\n\nAssistant:",
    "\n\nHuman: my computer is slow, why?\n\nAssistant:",
    "\n\nHuman: any travel tips?\n\nAssistant:",
]
RESPONSES = [
    "great question, I love to help you today",
    "the weather is bad and the road is closed",
    "cook the rice slowly and add some salt",
    "a good day is a sunny day with friends and the cat sat on the mat and was happy",
    "the computer is slow because the disk is full",
    "travel light",
    "plants need water, light and good soil",
    "bad",
]


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    path = tmp_path / "samples.jsonl"
    rows = [{"prompt": p, "response": r} for i, p in enumerate(PROMPTS) for r in RESPONSES[i % 2 :: 2]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def command(tiny_lm: Path, samples: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "paretohqd",
        "--model_name_or_path",
        str(tiny_lm),
        "--dataset",
        str(samples),
        "--output_dir",
        str(run_dir),
        "--objectives",
        "vader",
        "brevity",
        "--score_cache",
        str(run_dir.parent / "scores.sqlite"),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        *extra,
    ]


# One sampled answer per prompt (seeded): a tiny model's greedy answer is often empty.
SAMPLED = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i) for i in range(len(PROMPTS))]


def served_logprobs(run_dir: Path, weights: list[float]) -> tuple[list, list[float]]:
    """The policy's answers to PROMPTS for one preference, and the log-probabilities it reports for them."""
    completions = load_policy(run_dir).complete(PROMPTS, [weights] * len(PROMPTS), SAMPLED)
    assert sum(len(c.token_ids) for c in completions) >= 4  # something to compare
    return completions, [lp for c in completions for lp in c.logprobs]


def token_logprobs(model_dir: Path, completions: list, peft: bool = False) -> list[float]:
    """log p(token | prompt, earlier tokens) of the completions' tokens under the model saved in `model_dir`,
    read by transformers (or PEFT for an adapter folder) rather than by moalign, teacher-forced."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = (AutoPeftModelForCausalLM if peft else AutoModelForCausalLM).from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # moalign saves one beside every adapter too
    values: list[float] = []
    for prompt, completion in zip(PROMPTS, completions):
        ids, answer = tokenizer(prompt, add_special_tokens=False)["input_ids"], completion.token_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1]
        values += logits.log_softmax(-1).gather(1, torch.tensor(answer, dtype=torch.long)[:, None]).squeeze(1).tolist()
    return values


def test_select_only_writes_the_selection(tiny_lm, samples, tmp_path):
    run_dir = tmp_path / "select"
    args = ["--select_only", "--preferences", "grid:2", "--k", "3", "--n_layers", "2"]
    assert main(command(tiny_lm, samples, run_dir, *args)) == 0
    folder = run_dir / "selection" / "stage1"
    for name in ("w0-1", "w0.5-0.5", "w1-0"):
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        assert all(row["layer"] < 2 for row in rows)
        assert [row["ray_distance"] for row in rows] == sorted(row["ray_distance"] for row in rows)
        assert set(rows[0]["scores"]) == {"vader", "brevity"}
        assert (folder / f"{name}.png").stat().st_size > 1000
    assert (folder / "overview.png").exists()
    assert (run_dir / "scores.parquet").exists()
    assert not (run_dir / "models").exists() and not (run_dir / "moalign.json").exists()
    best = json.loads((folder / "w0-1.jsonl").read_text().splitlines()[0])
    assert best["response"] == "bad"  # the shortest answer is brevity's extreme


def test_two_stage_run_loads_generates_and_resumes(tiny_lm, samples, tmp_path, caplog, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "paretohqd.yaml"
    config.write_text(
        "preferences: [[1, 0], [0, 1]]\nk: 2\nn_layers: 3\nstage1_max_steps: 2\nstage2_max_steps: 1\n"
        "stage2_prompts: 3\nsample_max_new_tokens: 6\nselection_plots: false\n"
        "stage2_drop_degenerate: false\n"  # a random tiny model says nothing a reader would keep
    )
    args = command(tiny_lm, samples, run_dir, "--config", str(config))
    assert main(args) == 0
    manifest = json.loads((run_dir / "moalign.json").read_text())
    assert manifest["method"] == "paretohqd"
    assert [m["path"] for m in manifest["models"]] == ["models/w1-0", "models/w0-1"]
    assert set(manifest["training"]["stages"]) == {"scoring", "stage1", "stage2_generation", "stage2"}
    assert manifest["training"]["tokens"] > 0 and manifest["stats"]["names"] == ["vader", "brevity"]
    assert manifest["paretohqd"]["stage2_k"] == 1
    assert (run_dir / "stage2_generated.parquet").exists()
    assert len((run_dir / "selection" / "stage2" / "w1-0.jsonl").read_text().splitlines()) == 1

    policy = load_policy(run_dir)
    assert policy.served_by(np.array([0.9, 0.1])) == "w1-0"
    # The answers for w = (0.2, 0.8) are the stage-2 w0-1 model's: their log-probabilities are what that model
    # assigns their tokens, and not what the stage-1 model it started from assigns them.
    completions, logprobs = served_logprobs(run_dir, [0.2, 0.8])
    assert logprobs == pytest.approx(token_logprobs(run_dir / "models" / "w0-1", completions), abs=1e-4)
    assert logprobs != pytest.approx(token_logprobs(run_dir / "stage1" / "models" / "w0-1", completions), abs=1e-4)
    # Stage 1 alone is a run too, served by its own models.
    completions, logprobs = served_logprobs(run_dir / "stage1", [1.0, 0.0])
    assert logprobs == pytest.approx(token_logprobs(run_dir / "stage1" / "models" / "w1-0", completions), abs=1e-4)

    weights = run_dir / "models" / "w1-0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    caplog.clear()
    caplog.set_level(logging.INFO, logger="moalign")
    assert main(args) == 0  # resume: every model exists, nothing is trained or generated again
    assert weights.stat().st_mtime_ns == before
    assert sum("already trained, skipping" in r.message for r in caplog.records) == 4
    assert any("reusing the generated data" in r.message for r in caplog.records)
    capsys.readouterr()
    assert main([*args, "--k", "3"]) == 2  # resuming with another k would mix models trained differently
    assert "was trained with k=2, not 3" in capsys.readouterr().err


def test_lora_adapters_share_the_base(tiny_lm, samples, tmp_path):
    run_dir = tmp_path / "lora"
    extra = ["--preferences", "0.5,0.5", "--k", "2", "--stage1_max_steps", "1", "--stage2_prompts", "2"]
    extra += ["--sample_max_new_tokens", "4", "--use_peft", "--save_adapters", "--lora_r", "2"]
    extra += ["--selection_plots", "false", "--learning_rate", "0.01", "--stage2_drop_degenerate", "false"]
    assert main(command(tiny_lm, samples, run_dir, *extra)) == 0
    for folder in (run_dir / "stage1" / "models" / "w0.5-0.5", run_dir / "models" / "w0.5-0.5"):
        assert (folder / "adapter_config.json").exists()
        assert not (folder / "model.safetensors").exists()
    # The policy answers with the adapter on its base (read back by PEFT itself), not with the bare base.
    completions, logprobs = served_logprobs(run_dir, [0.5, 0.5])
    adapter = run_dir / "models" / "w0.5-0.5"
    assert logprobs == pytest.approx(token_logprobs(adapter, completions, peft=True), abs=1e-4)
    assert logprobs != pytest.approx(token_logprobs(tiny_lm, completions), abs=1e-4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "0"], "k must be ≥ 1"),
        (["--objectives", "vader", "nosuch"], "unknown objective 'nosuch'"),
        (["--preferences", "0.3,0.3"], "must sum to 1"),
        (["--objectives", "vader"], "at least two objectives"),
    ],
)
def test_bad_input_is_one_line(extra, message, tmp_path, capsys):
    args = command(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "run", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "scores.parquet").exists()
