"""The principles a MORLAIF judge is asked about, and the question it reads for one pair in one order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from moalign.errors import MoalignError
from moalign.methods.feedback.pairs import Pair

# The twelve principles of MORLAIF (Williams, 2024), one question each.
PRINCIPLES: dict[str, str] = {
    "helpfulness": "Which response is more helpful: does it address what the human asked and give useful help?",
    "ethicality": "Which response is more ethical: does it avoid encouraging harmful, illegal or unethical acts?",
    "factuality": "Which response is more factually accurate, making no false or unsupported claims?",
    "toxicity": "Which response is less toxic: free of rude, hateful, insulting or offensive language?",
    "sycophancy": "Which response is less sycophantic: does it avoid flattering the human or agreeing just to please?",
    "empathy": "Which response shows more empathy and understanding of the human's feelings and situation?",
    "relevance": "Which response is more relevant to the human's last message, staying on its topic?",
    "context": "Which response makes better use of the context of the whole conversation so far?",
    "bias": "Which response is less biased: free of stereotypes and prejudice about groups of people?",
    "understandability": "Which response is easier to understand: clear, well organised and plainly worded?",
    "detail": "Which response gives a more appropriate level of detail, thorough enough to answer in full?",
    "conciseness": "Which response is more concise: does it answer without needless words or repetition?",
}

TEMPLATE = (
    "Consider the following conversation between a human and an AI assistant:\n"
    "{conversation}\n\n"
    "Here are two possible responses of the assistant.\n"
    "(A) {first}\n"
    "(B) {second}\n\n"
    "{question} Judge only this principle, regardless of other perspectives. "
    "Answer with a single letter, A or B.\n"
    "Answer:"
)
TEMPLATE_FIELDS = ("{conversation}", "{first}", "{second}", "{question}")

ORDERS = ("AB", "BA")  # AB: response_a is shown as (A); BA: response_a is shown as (B)


@dataclass(frozen=True)
class Principle:
    name: str
    question: str


def load_principles(selection: Sequence[str | dict] | str | None = None, path: str | None = None) -> list[Principle]:
    """The principles to ask about: built-in names, names from a YAML file, or inline `{name: question}`.

    Names may also come comma-separated ("helpfulness,toxicity"); "all" means every known principle.
    With no selection, the principles of the YAML file if one is given, else the twelve built-in ones.
    """
    known = dict(PRINCIPLES)
    from_file = _principles_file(path) if path else {}
    known.update(from_file)
    items: list[str | dict] = []
    for item in [selection] if isinstance(selection, str) else list(selection or []):
        items += [part.strip() for part in item.split(",") if part.strip()] if isinstance(item, str) else [item]
    if not items:
        items = list(from_file or PRINCIPLES)
    if items == ["all"]:
        items = list(known)
    chosen: dict[str, str] = {}
    for item in items:
        if isinstance(item, dict):
            for name, question in item.items():
                question = question or known.get(str(name))
                if not isinstance(question, str) or not question.strip():
                    raise MoalignError(f"principle {name!r} needs a question (one sentence the judge answers)")
                chosen[str(name)] = question.strip()
            continue
        if item not in known:
            raise MoalignError(
                f"unknown principle {item!r}; built in: {', '.join(PRINCIPLES)} (or define it in a principles file)"
            )
        chosen[item] = known[item]
    for name in chosen:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise MoalignError(f"principle name {name!r} must be letters, digits, '_' or '-' (it names a folder)")
    return [Principle(name, question) for name, question in chosen.items()]


def _principles_file(path: str) -> dict[str, str]:
    """A YAML mapping of principle names to questions (under `principles:` or at the top level)."""
    if not os.path.exists(path):
        raise MoalignError(f"principles file {path} does not exist")
    with open(path) as handle:
        content = yaml.safe_load(handle) or {}
    if isinstance(content, dict) and isinstance(content.get("principles"), dict):
        content = content["principles"]
    if not isinstance(content, dict) or not all(isinstance(q, str) for q in content.values()):
        raise MoalignError(f"principles file {path} must map each principle name to its question")
    return {str(name): question.strip() for name, question in content.items()}


def load_template(path: str | None) -> str:
    """The judge prompt template: the file's text, else TEMPLATE; it must hold every field."""
    if not path:
        return TEMPLATE
    if not os.path.exists(path):
        raise MoalignError(f"template file {path} does not exist")
    template = Path(path).read_text()
    missing = [key for key in TEMPLATE_FIELDS if key not in template]
    if missing:
        raise MoalignError(f"the judge template {path} must contain {', '.join(missing)}")
    return template


def judge_prompt(principle: Principle, pair: Pair, order: str, template: str = TEMPLATE) -> str:
    """The question for one order: in order "BA" response_b is shown first, as (A)."""
    first, second = (pair.response_a, pair.response_b) if order == "AB" else (pair.response_b, pair.response_a)
    return template.format(
        conversation=pair.prompt.strip(), first=first.strip(), second=second.strip(), question=principle.question
    )
