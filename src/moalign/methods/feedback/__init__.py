"""MORLAIF step 1: AI feedback per principle, read as the judge's log-probabilities of "A" and "B".

For every pair and principle the judge is asked which response better satisfies that one principle,
"regardless of other perspectives" (Williams, 2024), in both orders (A/B and B/A): averaging the two
cancels the judge's position bias, which the paper's reference code did not. Answers are appended to
`feedback.jsonl` as they arrive, keyed by (pair id, principle, order), so a run killed midway loses
nothing and a rerun asks nothing twice. `labels.parquet` (one row per pair, columns per principle) is
what `moalign pm` trains on.

Modules: principles (questions and the prompt), pairs, judges, store (the feedback directory), labels
(order averaging and the summary), recipe (config, stages, command).

Usage: moalign feedback --config configs/morlaif_demo.yaml [--flag value ...]
       moalign feedback --dataset pairs.jsonl --judge openai:MODEL [--base_url URL] --output_dir DIR
       moalign feedback --dataset pairs.jsonl --judge hf:PATH --principles helpfulness,toxicity ...
"""

from moalign.methods.feedback.judges import Answer, HFJudge, Judge, OpenAIJudge, build_judge, letters_from_top
from moalign.methods.feedback.labels import aggregate, combine, summarize
from moalign.methods.feedback.pairs import Pair, load_pairs, pair_id
from moalign.methods.feedback.principles import (
    ORDERS,
    PRINCIPLES,
    TEMPLATE,
    Principle,
    judge_prompt,
    load_principles,
    load_template,
)
from moalign.methods.feedback.recipe import FeedbackConfig, FeedbackRecipe, ask, cli, collect, label
from moalign.methods.feedback.store import FEEDBACK, LABELS, SETTINGS, FeedbackLog, check_settings, iter_answers

__all__ = [
    "FEEDBACK",
    "LABELS",
    "ORDERS",
    "PRINCIPLES",
    "SETTINGS",
    "TEMPLATE",
    "Answer",
    "FeedbackConfig",
    "FeedbackLog",
    "FeedbackRecipe",
    "HFJudge",
    "Judge",
    "OpenAIJudge",
    "Pair",
    "Principle",
    "aggregate",
    "ask",
    "build_judge",
    "check_settings",
    "cli",
    "collect",
    "combine",
    "iter_answers",
    "judge_prompt",
    "label",
    "letters_from_top",
    "load_pairs",
    "load_principles",
    "load_template",
    "pair_id",
    "summarize",
]
