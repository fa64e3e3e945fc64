"""The `moalign feedback` recipe: its config, its stages (ask the judge, turn answers into labels) and
its command."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from moalign.methods.config import parse_config
from moalign.methods.feedback.judges import Answer, Judge, build_judge
from moalign.methods.feedback.labels import aggregate, summarize
from moalign.methods.feedback.pairs import Pair, load_pairs
from moalign.methods.feedback.principles import (
    ORDERS,
    TEMPLATE,
    Principle,
    judge_prompt,
    load_principles,
    load_template,
)
from moalign.methods.feedback.store import FEEDBACK, LABELS, SETTINGS, FeedbackLog, Key, check_settings
from moalign.run import atomic_write_parquet, read_json, write_json

log = logging.getLogger("moalign")


@dataclass
class FeedbackConfig:
    """What to ask which judge about which pairs; the `feedback:` section of a MORLAIF recipe file."""

    dataset: str | None = field(
        default=None, metadata={"help": "pairs: prompt/chosen/rejected or prompt/response_a/response_b"}
    )
    dataset_split: str = field(default="train", metadata={"help": "split of the dataset"})
    max_samples: int | None = field(default=None, metadata={"help": "only the first N pairs"})
    output_dir: str | None = field(
        default=None, metadata={"help": "where feedback.jsonl, labels.parquet and feedback.json go"}
    )
    judge: str | None = field(default=None, metadata={"help": "openai:MODEL or hf:PATH"})
    principles: list[str] = field(
        default_factory=list,
        metadata={
            "help": "principle names (also comma-separated), or 'all'; in YAML also {name: question} entries "
            "(default: the twelve built in, or those of principles_file)"
        },
    )
    principles_file: str | None = field(
        default=None, metadata={"help": "YAML mapping of extra principle names to their questions"}
    )
    template: str | None = field(default=None, metadata={"help": "file holding a judge prompt template"})
    base_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"}
    )
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the key"})
    api: str = field(default="chat", metadata={"help": "endpoint of an openai judge: chat or completions"})
    top_logprobs: int | None = field(default=None, metadata={"help": "default: 20 (chat) or 5 (completions)"})
    floor: float | None = field(default=None, metadata={"help": "logprob of a letter missing from the top list"})
    max_retries: int = field(default=6, metadata={"help": "retries on 429, 5xx, timeouts and connection errors"})
    timeout: float = field(default=60.0, metadata={"help": "seconds one request may take"})
    concurrency: int = field(default=4, metadata={"help": "requests in flight to an openai judge"})
    device: str = field(default="auto", metadata={"help": "device of an hf judge"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass of an hf judge"})

    def judge_options(self) -> dict[str, Any]:
        """The options of the judge kind `judge` names."""
        if (self.judge or "").startswith("hf:"):
            return {"device": self.device, "batch_size": self.batch_size}
        keys = ("base_url", "api_key_env", "api", "top_logprobs", "floor", "max_retries", "timeout", "concurrency")
        return {key: getattr(self, key) for key in keys}


# ----------------------------------------------------------------------------- stage 1: ask


def ask(
    pairs: Sequence[Pair],
    principles: Sequence[Principle],
    judge: Judge,
    out_dir: Path,
    template: str = TEMPLATE,
    chunk: int = 64,
    progress: bool = True,
) -> dict[Key, dict]:
    """Ask the judge every (pair, principle, order) not yet in `out_dir/feedback.jsonl`; all answers."""
    check_settings(out_dir, judge.spec, getattr(judge, "base_url", None), template, list(principles))
    store = FeedbackLog(out_dir / FEEDBACK)
    unique = list({pair.id: pair for pair in pairs}.values())  # a duplicated pair is asked about once
    todo = [
        (pair, principle, order)
        for pair in unique
        for principle in principles
        for order in ORDERS
        if (pair.id, principle.name, order) not in store
    ]
    total = len(unique) * len(principles) * len(ORDERS)
    if total > len(todo):
        log.info(f"feedback: {total - len(todo)} of {total} answers already in {store.path}")
    bar = tqdm(total=len(todo), desc="asking the judge", disable=not progress or not todo)
    try:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]

            def record(index: int, answer: Answer, batch=batch) -> None:
                pair, principle, order = batch[index]
                store.add(
                    {
                        "id": pair.id,
                        "principle": principle.name,
                        "order": order,
                        "logp_A": answer.logp_A,
                        "logp_B": answer.logp_B,
                        "found": answer.found,
                        "top": answer.top,
                    }
                )
                bar.update(1)

            judge.ask([judge_prompt(principle, pair, order, template) for pair, principle, order in batch], record)
    finally:
        bar.close()
        store.close()
    return store.records


# ----------------------------------------------------------------------------- stage 2: label


def label(pairs: Sequence[Pair], principles: Sequence[Principle], records: dict, out_dir: Path) -> pd.DataFrame:
    """Write `labels.parquet` and the per-principle summary into the settings; return the labels."""
    labels = aggregate(pairs, principles, records)
    atomic_write_parquet(labels, out_dir / LABELS)
    summary = summarize(labels, principles, records)
    write_json(out_dir / SETTINGS, {**read_json(out_dir / SETTINGS), "pairs": len(pairs), "summary": summary})
    return labels


def collect(
    pairs: Sequence[Pair],
    principles: Sequence[Principle],
    judge: Judge,
    out_dir: str | os.PathLike,
    template: str = TEMPLATE,
    chunk: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Both stages: ask what is missing, then write and return the labels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = ask(pairs, principles, judge, out_dir, template, chunk, progress)
    return label(pairs, principles, records, out_dir)


class FeedbackRecipe:
    """One feedback run: every user mistake in the config is found before the judge is loaded or asked."""

    def __init__(self, config: FeedbackConfig):
        self.config = config
        self.principles = load_principles(config.principles, config.principles_file)
        self.template = load_template(config.template)
        self.pairs = load_pairs(config.dataset, config.dataset_split, config.max_samples)

    def run(self) -> pd.DataFrame:
        judge = build_judge(self.config.judge, **self.config.judge_options())
        return collect(self.pairs, self.principles, judge, self.config.output_dir, self.template)


# ----------------------------------------------------------------------------- command line


def cli(argv: list[str]) -> None:
    config = parse_config(FeedbackConfig, argv, section="feedback", required=("dataset", "output_dir", "judge"))
    recipe = FeedbackRecipe(config)
    labels = recipe.run()
    print(f"feedback on {len(labels)} pairs × {len(recipe.principles)} principles written to {config.output_dir}")
    for name, entry in read_json(Path(config.output_dir) / SETTINGS)["summary"].items():
        extra = f"  human agreement {entry['human_agreement']:.2f}" if "human_agreement" in entry else ""
        print(
            f"  {name:<18} consistent across orders {entry['consistent']:.2f}"
            f"  position bias {entry['position_bias']:+.2f}{extra}"
        )
