"""MORLAIF step 2: one preference model per principle, trained on the judge's labels.

Each principle's model is TRL's RewardTrainer on (chosen, rejected) = (the response the judge preferred,
the other) with the margin loss −log σ(r_c − r_r − m), m = |logp_A − logp_B| (the `margin` column), on
any sequence-classification backbone (full or LoRA). Models land in RUN/principles/<name>, each usable
as the objective `pm:RUN/<name>`. Accuracy is measured against the judge on a held-out split and, where
the data has a human label, against people; `fit_weights` fits linear weights by logistic regression of
the human labels on per-principle score differences (MORLAIF §4.4).

Usage: moalign pm --config configs/morlaif_demo.yaml [--flag value ...]
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from trl import RewardConfig

from moalign import data, distributed
from moalign.errors import MoalignError
from moalign.methods.common import load_tokenizer, lora_config, write_run_manifest
from moalign.methods.config import CommonArguments, parse_config
from moalign.methods.feedback import LABELS, SETTINGS
from moalign.methods.stages import finish_stage, finished_stage, stage_args, train_resumable
from moalign.objectives.preference import PRINCIPLES_DIR, join_text
from moalign.run import MANIFEST, read_json, read_manifest

log = logging.getLogger("moalign")


@dataclass
class PMConfig(CommonArguments, RewardConfig):
    """TRL's RewardConfig plus moalign's common fields; `dataset` is a feedback directory or its labels."""

    principles: list[str] = field(
        default_factory=list, metadata={"help": "principles to train (default: every one in the labels)"}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "share of pairs held out to measure accuracy"})
    margin_scale: float = field(
        default=1.0, metadata={"help": "multiplies |logp_A − logp_B| in the loss; 0 trains plain Bradley–Terry"}
    )
    min_margin: float = field(
        default=0.0, metadata={"help": "pairs whose judge margin is at most this are not trained on (ties)"}
    )
    fit_weights: bool = field(
        default=False, metadata={"help": "fit linear weights of the principles to the human labels"}
    )
    score_batch_size: int = field(default=16, metadata={"help": "batch size when scoring held-out pairs"})


# ----------------------------------------------------------------------------- labels


def load_labels(source: str) -> pd.DataFrame:
    """The labels `moalign feedback` wrote (a feedback directory or its labels file)."""
    path = Path(source)
    if path.is_dir():
        path = path / LABELS
    if not path.exists():
        raise MoalignError(f"{path} does not exist; run `moalign feedback` first or point dataset at its labels")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else data.load_raw(str(path)).to_pandas()
    missing = [c for c in ("id", "prompt", "response_a", "response_b") if c not in frame.columns]
    if missing:
        raise MoalignError(f"{path} lacks columns {missing}; it must be the labels.parquet of `moalign feedback`")
    if not label_principles(frame):
        raise MoalignError(f"{path} has no PRINCIPLE.logp_A / PRINCIPLE.logp_B columns")
    if "human" not in frame.columns:
        frame["human"] = None
    frame["id"] = frame["id"].astype(str)
    return frame


def judge_questions(source: str) -> dict[str, str]:
    """The question the judge was asked per principle, where the feedback directory recorded it."""
    settings = Path(source) / SETTINGS if Path(source).is_dir() else Path(source).with_name(SETTINGS)
    return read_json(settings).get("principles", {}) if settings.exists() else {}


def label_principles(frame: pd.DataFrame) -> list[str]:
    names = [c.removesuffix(".logp_A") for c in frame.columns if c.endswith(".logp_A")]
    return [n for n in names if f"{n}.logp_B" in frame.columns]


def heldout_mask(ids: pd.Series, fraction: float) -> np.ndarray:
    """A held-out split by hash of the pair id: the same pairs for every principle and every rerun."""
    buckets = np.array([int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 2**32 for i in ids])
    return buckets < fraction


def judge_pairs(frame: pd.DataFrame, principle: str, min_margin: float = 0.0) -> pd.DataFrame:
    """(prompt, chosen, rejected, margin) as the judge ordered them; ties and margins ≤ min_margin dropped."""
    diff = frame[f"{principle}.logp_A"].to_numpy(float) - frame[f"{principle}.logp_B"].to_numpy(float)
    keep = np.abs(diff) > min_margin
    a_wins = diff > 0
    rows = frame[keep]
    return pd.DataFrame(
        {
            "prompt": rows["prompt"].to_numpy(),
            "chosen": np.where(a_wins[keep], rows["response_a"], rows["response_b"]),
            "rejected": np.where(a_wins[keep], rows["response_b"], rows["response_a"]),
            "margin": np.abs(diff[keep]),
        }
    )


# ----------------------------------------------------------------------------- training


def load_backbone(path: str, config: PMConfig):
    """Any sequence-classification backbone with one output (a causal LM checkpoint gets a new head)."""
    from transformers import AutoModelForSequenceClassification

    from moalign.models import ModelOptions, load_pretrained

    options = ModelOptions.from_config(config)
    return load_pretrained(
        path, options, auto_class=AutoModelForSequenceClassification, num_labels=1, ignore_mismatched_sizes=True
    )


def train_principle(config: PMConfig, principle: str, pairs: pd.DataFrame, run_dir: Path) -> dict[str, Any]:
    """One resumable RewardTrainer stage; a principle whose folder is complete is skipped."""
    import datasets
    from trl import RewardTrainer

    final = run_dir / PRINCIPLES_DIR / principle
    if (done := finished_stage(final)) is not None:
        log.info(f"principle {principle}: already trained, skipping")
        return done
    columns = {
        "chosen": [join_text(p, c) for p, c in zip(pairs["prompt"], pairs["chosen"])],
        "rejected": [join_text(p, r) for p, r in zip(pairs["prompt"], pairs["rejected"])],
    }
    if config.margin_scale:
        columns["margin"] = (config.margin_scale * pairs["margin"].to_numpy(float)).tolist()
    stage_dir = run_dir / "checkpoints" / principle
    tokenizer = load_tokenizer(config.model_name_or_path)
    model = load_backbone(config.model_name_or_path, config)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(
        model=model,
        args=stage_args(config, stage_dir),
        train_dataset=datasets.Dataset.from_dict(columns),
        processing_class=tokenizer,
        peft_config=lora_config(config, task_type="SEQ_CLS"),
    )
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise MoalignError(f"principle {principle}: every pair is longer than max_length={config.max_length} tokens")
    if kept < len(pairs):
        log.warning(f"principle {principle}: {len(pairs) - kept} pairs longer than max_length are not trained on")
    stats = {
        "seconds": train_resumable(trainer, stage_dir),
        "steps": trainer.state.global_step,
        "train_pairs": kept,
        "train_loss": next((e["train_loss"] for e in trainer.state.log_history if "train_loss" in e), None),
    }
    # merged: `pm:` and `hf:` then load one plain classifier
    return finish_stage(trainer.model, tokenizer, final, stage_dir, stats, merge=config.use_peft)


# ----------------------------------------------------------------------------- evaluation


def score_pairs(model_dir: Path, frame: pd.DataFrame, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of response_a and response_b, through the same objective class `pm:` builds."""
    from moalign.objectives.preference import PreferenceModel

    # From the folder: the run's manifest is written only once every principle is trained.
    objective = PreferenceModel.from_folder(model_dir, batch_size=batch_size)
    prompts = frame["prompt"].tolist()
    scores = objective.score(prompts + prompts, frame["response_a"].tolist() + frame["response_b"].tolist())
    return scores[: len(frame)], scores[len(frame) :]


def accuracies(frame: pd.DataFrame, principle: str, r_a: np.ndarray, r_b: np.ndarray) -> dict[str, Any]:
    """Agreement of the model's ordering with the judge's (non-tied pairs) and with people's."""
    diff = frame[f"{principle}.logp_A"].to_numpy(float) - frame[f"{principle}.logp_B"].to_numpy(float)
    result: dict[str, Any] = {"heldout_pairs": len(frame)}
    judged = diff != 0
    result["judge_accuracy"] = float(np.mean((r_a > r_b)[judged] == (diff > 0)[judged])) if judged.any() else None
    human = frame["human"].isin(["A", "B"]).to_numpy()
    if human.any():
        prefers_a = (frame["human"] == "A").to_numpy()[human]
        result["human_accuracy"] = float(np.mean((r_a > r_b)[human] == prefers_a))
        result["judge_human_agreement"] = float(np.mean((diff > 0)[human] == prefers_a))
        result["human_pairs"] = int(human.sum())
    return result


def fit_weights(
    differences: np.ndarray, prefers_a: np.ndarray, train: np.ndarray, names: list[str], stds: np.ndarray
) -> dict[str, Any]:
    """Logistic regression P(a ≻ b) = σ(wᵀ(r(a) − r(b))) of human labels, fitted on the training pairs.

    Each pair enters in both orders (d, y) and (−d, 1 − y), so no intercept is needed and the fit cannot
    learn which side the dataset happens to put the chosen response on. `weights` apply to raw scores;
    `zscore_weights` (w·std) to z-scored ones, as `moalign morl` normalises them; `preference` is those
    clipped at 0 and summed to 1, a `weights:` entry for `moalign morl`.
    """
    from sklearn.linear_model import LogisticRegression

    d, y = differences[train], prefers_a[train].astype(int)
    if len(d) == 0:
        raise MoalignError("fit_weights: no training pairs with a human label")
    model = LogisticRegression(fit_intercept=False, max_iter=1000)
    model.fit(np.concatenate([d, -d]), np.concatenate([y, 1 - y]))
    weights = model.coef_[0]
    zscore = weights * stds
    positive = np.clip(zscore, 0, None)
    preference = positive / positive.sum() if positive.sum() > 0 else np.full(len(names), 1 / len(names))
    result: dict[str, Any] = {
        "weights": dict(zip(names, weights.tolist())),
        "zscore_weights": dict(zip(names, zscore.tolist())),
        "preference": ",".join(f"{x:.12g}" for x in preference),
        "train_pairs": int(train.sum()),
    }
    held = ~train
    if held.any():
        result["heldout_accuracy"] = float(np.mean((differences[held] @ weights > 0) == prefers_a[held]))
        result["heldout_pairs"] = int(held.sum())
    return result


# ----------------------------------------------------------------------------- the recipe


def check(config: PMConfig, frame: pd.DataFrame) -> list[str]:
    """Everything a user can get wrong, before any training starts."""
    available = label_principles(frame)
    principles = list(config.principles) or available
    unknown = [p for p in principles if p not in available]
    if unknown:
        raise MoalignError(f"unknown principle(s) {unknown}; the labels have {', '.join(available)}")
    if not 0 <= config.eval_fraction < 1:
        raise MoalignError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.margin_scale < 0:
        raise MoalignError(f"margin_scale must be ≥ 0, got {config.margin_scale}")
    if config.fit_weights and not frame["human"].isin(["A", "B"]).any():
        raise MoalignError("fit_weights needs human labels: a 'human' column (chosen/rejected data gives one)")
    for principle in principles:
        if not np.isfinite(frame[[f"{principle}.logp_A", f"{principle}.logp_B"]].to_numpy(float)).all():
            raise MoalignError(f"principle {principle}: NaN or infinite logprobs in the labels")
    return principles


def earlier_principles(run_dir: Path, current: list[str]) -> dict[str, dict[str, Any]]:
    """Entries of the run's manifest for principles not trained now whose models are still there."""
    if not (run_dir / MANIFEST).exists():
        return {}
    manifest = read_manifest(run_dir)
    if manifest.get("method") != "pm":
        raise MoalignError(f"{run_dir} holds a {manifest.get('method')!r} run; give pm another output_dir")
    return {
        name: entry
        for name, entry in manifest.get("principles", {}).items()
        if name not in current and finished_stage(run_dir / entry["path"]) is not None
    }


def train(config: PMConfig) -> Path:
    run_dir = Path(config.output_dir)
    frame = load_labels(config.dataset)
    if config.max_samples:
        frame = frame.iloc[: config.max_samples].reset_index(drop=True)
    principles = check(config, frame)
    # Principles trained by an earlier run into the same directory stay usable as objectives.
    earlier = earlier_principles(run_dir, principles)
    run_dir.mkdir(parents=True, exist_ok=True)
    held = heldout_mask(frame["id"], config.eval_fraction)
    log.info(f"pm: {int((~held).sum())} training and {int(held.sum())} held-out pairs, principles {principles}")
    entries: dict[str, dict[str, Any]] = {}
    questions = judge_questions(config.dataset)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = time.perf_counter()
    for principle in principles:
        pairs = judge_pairs(frame[~held], principle, config.min_margin)
        if pairs.empty:
            raise MoalignError(f"principle {principle}: no training pair has a judge margin above {config.min_margin}")
        stats = train_principle(config, principle, pairs, run_dir)
        model_dir = run_dir / PRINCIPLES_DIR / principle
        # Held-out pairs are scored for accuracy; all pairs when weights are fitted on the training ones.
        scored = frame if config.fit_weights else frame[held]
        # on the main process alone: every rank would load the model and score all the pairs again
        r_a, r_b = (
            distributed.run_on_main(score_pairs, model_dir, scored, config.score_batch_size)
            if len(scored)
            else (np.zeros(0),) * 2
        )
        scores[principle] = (r_a, r_b)
        mask = held if config.fit_weights else np.ones(len(scored), dtype=bool)
        entry = {"path": f"{PRINCIPLES_DIR}/{principle}", **stats}
        if principle in questions:
            entry["question"] = questions[principle]
        if mask.any():
            entry.update(accuracies(scored[mask], principle, r_a[mask], r_b[mask]))
            both = np.concatenate([r_a[mask], r_b[mask]])
            entry["score_stats"] = {"mean": float(both.mean()), "std": float(both.std())}
        entries[principle] = entry
        log.info(f"principle {principle}: {_describe(entry)}")
    fields: dict[str, Any] = {}
    if config.fit_weights:
        labelled = frame["human"].isin(["A", "B"]).to_numpy()
        differences = np.column_stack([scores[p][0] - scores[p][1] for p in principles])[labelled]
        prefers_a = (frame["human"] == "A").to_numpy()[labelled]
        stds = np.array([np.concatenate(scores[p]).std() for p in principles])
        fields["linear_weights"] = fit_weights(differences, prefers_a, ~held[labelled], principles, stds)
    entries = {**earlier, **entries}
    specs = [f"pm:{run_dir}/{p}" for p in entries]
    write_run_manifest(
        config,
        "pm",
        None,
        objectives=specs,
        objective_names=list(entries),
        principles=entries,
        feedback=str(config.dataset),
        eval_fraction=config.eval_fraction,
        margin_scale=config.margin_scale,
        training={"seconds": time.perf_counter() - start, "world_size": distributed.world_size()},
        **fields,
    )
    distributed.remove(run_dir / "checkpoints")
    return run_dir


def _describe(entry: dict[str, Any]) -> str:
    parts = [f"{entry.get('steps', 0)} steps"]
    for key in ("judge_accuracy", "human_accuracy"):
        if entry.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {entry[key]:.3f}")
    return ", ".join(parts)


def cli(argv: list[str]) -> None:
    config = parse_config(PMConfig, argv, section="pm")
    run_dir = train(config)
    manifest = read_manifest(run_dir)
    print(f"preference models written to {run_dir}/{PRINCIPLES_DIR}")
    for name, entry in manifest["principles"].items():
        print(f"  pm:{run_dir}/{name:<18} {_describe(entry)}")
    if "linear_weights" in manifest:
        weights = manifest["linear_weights"]
        text = ", ".join(f"{k} {v:+.3f}" for k, v in weights["weights"].items())
        print(f"  linear weights (logistic regression on human labels): {text}")
