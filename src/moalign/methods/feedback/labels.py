"""From answers to labels: the two orders averaged per pair and principle, and a summary per principle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from moalign.errors import MoalignError
from moalign.methods.feedback.pairs import Pair
from moalign.methods.feedback.principles import ORDERS, Principle


def combine(ab: dict, ba: dict) -> tuple[float, float]:
    """Order-averaged (logp_A, logp_B) of response_a and response_b.

    In order AB response_a is letter A; in order BA it is letter B. A bias towards either letter adds
    the same amount to both responses, so it cancels in logp_A − logp_B.
    """
    return (ab["logp_A"] + ba["logp_B"]) / 2, (ab["logp_B"] + ba["logp_A"]) / 2


def aggregate(pairs: Sequence[Pair], principles: Sequence[Principle], records: dict) -> pd.DataFrame:
    """One row per pair; per principle: logp_A, logp_B (order-averaged), preferred, margin, consistent."""
    table: dict[str, list] = {
        "id": [p.id for p in pairs],
        "prompt": [p.prompt for p in pairs],
        "response_a": [p.response_a for p in pairs],
        "response_b": [p.response_b for p in pairs],
        "human": [p.human for p in pairs],
    }
    for principle in principles:
        columns: dict[str, list] = {"logp_A": [], "logp_B": [], "preferred": [], "margin": [], "consistent": []}
        for pair in pairs:
            ab, ba = (records.get((pair.id, principle.name, order)) for order in ORDERS)
            if ab is None or ba is None:
                raise MoalignError(f"pair {pair.id} has no answer for {principle.name}; run feedback again to finish")
            logp_a, logp_b = combine(ab, ba)
            columns["logp_A"].append(logp_a)
            columns["logp_B"].append(logp_b)
            columns["preferred"].append("A" if logp_a > logp_b else "B" if logp_b > logp_a else "tie")
            columns["margin"].append(abs(logp_a - logp_b))
            # Both orders pick the same response (the judge is not just following the position).
            columns["consistent"].append((ab["logp_A"] > ab["logp_B"]) == (ba["logp_B"] > ba["logp_A"]))
        for key, values in columns.items():
            table[f"{principle.name}.{key}"] = values
    return pd.DataFrame(table)


def summarize(labels: pd.DataFrame, principles: Sequence[Principle], records: dict) -> dict[str, dict]:
    """Per principle: position bias (mean logp of letter A minus B), order consistency, agreement with humans."""
    summary = {}
    human = labels["human"].notna()
    for principle in principles:
        answers = [r for r in records.values() if r["principle"] == principle.name]
        entry = {
            "position_bias": float(np.mean([r["logp_A"] - r["logp_B"] for r in answers])),
            "consistent": float(labels[f"{principle.name}.consistent"].mean()),
            "both_letters_found": float(np.mean([len(r.get("found", [])) == 2 for r in answers])),
            "ties": int((labels[f"{principle.name}.preferred"] == "tie").sum()),
        }
        if human.any():
            agree = labels.loc[human, f"{principle.name}.preferred"] == labels.loc[human, "human"]
            entry["human_agreement"] = float(agree.mean())
        summary[principle.name] = entry
    return summary
