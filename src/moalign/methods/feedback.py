"""MORLAIF step 1: AI feedback per principle, read as the judge's log-probabilities of "A" and "B".

For every pair and principle the judge is asked which response better satisfies that one principle,
"regardless of other perspectives", in both orders (A/B and B/A): averaging the two cancels the judge's
position bias, which the paper's reference code did not. Answers are appended to `feedback.jsonl` as
they arrive, keyed by (pair id, principle, order), so a run killed midway loses nothing and a rerun
asks nothing twice. `labels.parquet` (one row per pair, columns per principle) is what `moalign pm`
trains on.

Usage: moalign feedback --dataset pairs.jsonl --judge openai:MODEL [--base_url URL] --output_dir DIR
       moalign feedback --dataset pairs.jsonl --judge hf:PATH --principles helpfulness,toxicity ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from moalign import data
from moalign.errors import MoalignError
from moalign.methods.common import config_section
from moalign.run import write_json

log = logging.getLogger("moalign")

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

ORDERS = ("AB", "BA")  # AB: response_a is shown as (A); BA: response_a is shown as (B)
FEEDBACK = "feedback.jsonl"
LABELS = "labels.parquet"
SETTINGS = "feedback.json"


@dataclass(frozen=True)
class Principle:
    name: str
    question: str


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    response_a: str
    response_b: str
    human: str | None = None  # "A" or "B" where a person labelled the pair (chosen/rejected data)


@dataclass
class Answer:
    """The judge's log-probabilities of the letters "A" and "B" as its first answer token."""

    logp_A: float
    logp_B: float
    found: list[str] = field(default_factory=list)  # letters that were in the returned top logprobs
    top: dict[str, float] = field(default_factory=dict)  # kept in the log for auditing


# ----------------------------------------------------------------------------- principles and prompts


def load_principles(selection: Sequence[str | dict] | str | None = None, path: str | None = None) -> list[Principle]:
    """The principles to ask about: built-in names, names from a YAML file, or inline `{name: question}`.

    With no selection, the principles of the YAML file if one is given, else the twelve built-in ones.
    """
    known = dict(PRINCIPLES)
    from_file: dict[str, str] = {}
    if path:
        if not os.path.exists(path):
            raise MoalignError(f"principles file {path} does not exist")
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
        if isinstance(content, dict) and isinstance(content.get("principles"), dict):
            content = content["principles"]
        if not isinstance(content, dict) or not all(isinstance(q, str) for q in content.values()):
            raise MoalignError(f"principles file {path} must map each principle name to its question")
        from_file = {str(k): v.strip() for k, v in content.items()}
        known.update(from_file)
    if selection is None or selection == [] or selection == "":
        selection = list(from_file) if from_file else list(PRINCIPLES)
    if isinstance(selection, str):
        selection = [part.strip() for part in selection.split(",") if part.strip()]
    if selection == ["all"]:
        selection = list(known)
    chosen: dict[str, str] = {}
    for item in selection:
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


def judge_prompt(principle: Principle, pair: Pair, order: str, template: str = TEMPLATE) -> str:
    """The question for one order: in order "BA" response_b is shown first, as (A)."""
    first, second = (pair.response_a, pair.response_b) if order == "AB" else (pair.response_b, pair.response_a)
    return template.format(
        conversation=pair.prompt.strip(), first=first.strip(), second=second.strip(), question=principle.question
    )


# ----------------------------------------------------------------------------- reading letters


def letters_from_top(top: dict[str, float], floor: float | None = None) -> Answer:
    """The log-probabilities of "A" and "B" from one position's top logprobs.

    Tokens that read as the letter (" A", "A", "(A") are summed in probability. A letter missing from the
    top-k list gets `floor`, by default the smallest listed logprob (its true value is at most that).
    """
    if not top:
        raise MoalignError("the judge returned no top logprobs; it must support logprobs (top_logprobs ≥ 2)")
    found: dict[str, list[float]] = {"A": [], "B": []}
    for token, logp in top.items():
        letter = token.strip().strip("()[]*.:").strip()
        if letter in found:
            found[letter].append(float(logp))
    missing = min(top.values()) if floor is None else floor
    values = {letter: _logsumexp(found[letter]) if found[letter] else missing for letter in found}
    return Answer(values["A"], values["B"], [letter for letter in "AB" if found[letter]], dict(top))


def _logsumexp(values: Sequence[float]) -> float:
    peak = max(values)
    return peak + math.log(sum(math.exp(v - peak) for v in values))


# ----------------------------------------------------------------------------- judges


class Judge:
    """Answers judge prompts with the log-probabilities of "A" and "B"; `spec` says which judge."""

    spec: str = ""

    def ask(self, prompts: list[str], on_answer: Callable[[int, Answer], None]) -> None:
        """Answer every prompt, calling `on_answer(index, answer)` as each answer arrives."""
        raise NotImplementedError


class RateLimiter:
    """At most `per_second` calls a second, across threads (0: no limit)."""

    def __init__(self, per_second: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.clock = clock
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self, sleep: Callable[[float], None] = time.sleep) -> None:
        if not self.interval:
            return
        with self.lock:
            now = self.clock()
            slot = max(now, self.next)
            self.next = slot + self.interval
        if slot > now:
            sleep(slot - now)


class OpenAIJudge(Judge):
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, `moalign serve`) through the `openai` client.

    The key is read from the environment variable `api_key_env` and kept only in the client. Rate limits,
    5xx answers and dropped connections are retried with exponential back-off (honouring Retry-After).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        api: str = "chat",
        top_logprobs: int | None = None,
        requests_per_second: float = 0.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 60.0,
        concurrency: int = 4,
        floor: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import openai

        if api not in ("chat", "completions"):
            raise MoalignError(f"judge api must be 'chat' or 'completions', got {api!r}")
        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise MoalignError(f"set ${api_key_env} to the judge's API key (or name another with --api_key_env)")
            key = "EMPTY"  # local OpenAI-compatible servers need no key
        self.model, self.api, self.floor = model, api, floor
        # OpenAI allows 20 top logprobs in chat and 5 in legacy completions.
        self.top_logprobs = int(top_logprobs or (20 if api == "chat" else 5))
        # The model names the judge; the URL may change between runs (a server restarted on another port).
        self.spec, self.base_url = f"openai:{model}", base_url
        self.client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
        self.limiter = RateLimiter(requests_per_second)
        self.max_retries, self.backoff, self.max_backoff = int(max_retries), float(backoff), float(max_backoff)
        self.concurrency = max(1, int(concurrency))
        self.sleep = sleep

    def _request(self, prompt: str) -> dict[str, float]:
        """One HTTP request: the top logprobs of the first answer token."""
        if self.api == "chat":
            response = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=self.top_logprobs,
            )
            content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
            return {entry.token: entry.logprob for entry in content[0].top_logprobs} if content else {}
        response = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=1, temperature=0, logprobs=self.top_logprobs
        )
        logprobs = response.choices[0].logprobs
        return dict(logprobs.top_logprobs[0]) if logprobs and logprobs.top_logprobs else {}

    def _retry_delay(self, attempt: int, error: Exception) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after and retry_after.replace(".", "", 1).isdigit():  # seconds (an HTTP date is ignored)
            delay = max(delay, min(self.max_backoff, float(retry_after)))
        return delay

    def answer(self, prompt: str) -> Answer:
        """Ask one prompt, retrying what a later try can fix; other errors end the run in one line."""
        import openai

        retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
        for attempt in range(self.max_retries + 1):
            self.limiter.wait(self.sleep)
            try:
                return letters_from_top(self._request(prompt), self.floor)
            except retryable as error:
                if attempt == self.max_retries:
                    raise MoalignError(
                        f"judge {self.spec}: {type(error).__name__} after {attempt + 1} tries ({_first_line(error)})"
                    ) from None
                delay = self._retry_delay(attempt, error)
                log.warning(f"judge {self.spec}: {type(error).__name__}; retrying in {delay:.1f}s")
                self.sleep(delay)
            except openai.APIStatusError as error:
                raise MoalignError(f"judge {self.spec}: HTTP {error.status_code} ({_first_line(error)})") from None
        raise AssertionError("unreachable")

    def ask(self, prompts: list[str], on_answer: Callable[[int, Answer], None]) -> None:
        if self.concurrency == 1:
            for index, prompt in enumerate(prompts):
                on_answer(index, self.answer(prompt))
            return
        executor = ThreadPoolExecutor(self.concurrency)
        futures = {executor.submit(self.answer, prompt): index for index, prompt in enumerate(prompts)}
        reported: set[int] = set()
        try:
            for future in as_completed(futures):
                on_answer(futures[future], future.result())
                reported.add(futures[future])
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            # On a failure or Ctrl-C, answers that arrived meanwhile are still recorded (paid for, not lost).
            for future, index in futures.items():
                if index not in reported and future.done() and not future.cancelled() and not future.exception():
                    on_answer(index, future.result())


class HFJudge(Judge):
    """A local causal LM: one forward pass per prompt, the next-token logprobs of "A"/" A" and "B"/" B"."""

    def __init__(self, path: str, device: str = "auto", batch_size: int = 8, top: int = 5):
        import torch

        from moalign.generation import load_model

        self.torch = torch
        self.model, self.tokenizer = load_model(path, device=device)  # float32 on CPU, bfloat16 on a GPU
        self.tokenizer.truncation_side = "left"  # a long conversation loses its start, never the question
        self.max_length = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", 2048
        )
        self.spec, self.batch_size, self.top = f"hf:{path}", max(1, int(batch_size)), int(top)
        self.letter_ids: dict[str, list[int]] = {}
        for letter in "AB":
            ids = {
                encoded[0]
                for variant in (letter, " " + letter)
                if len(encoded := self.tokenizer.encode(variant, add_special_tokens=False)) == 1
            }
            if not ids:
                raise MoalignError(f"judge {self.spec}: its tokenizer has no single token for {letter!r}")
            self.letter_ids[letter] = sorted(ids)

    def ask(self, prompts: list[str], on_answer: Callable[[int, Answer], None]) -> None:
        torch = self.torch
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            encoded = self.tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(device)
            positions = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding
            with torch.inference_mode():
                logits = self.model(**encoded, position_ids=positions).logits[:, -1].float()
            logps = torch.log_softmax(logits, dim=-1)
            top_values, top_ids = logps.topk(min(self.top, logps.size(-1)), dim=-1)
            for row in range(len(batch)):
                letters = {
                    letter: float(torch.logsumexp(logps[row, ids], dim=0)) for letter, ids in self.letter_ids.items()
                }
                top = {self.tokenizer.decode([int(i)]): float(v) for i, v in zip(top_ids[row], top_values[row])}
                on_answer(start + row, Answer(letters["A"], letters["B"], ["A", "B"], top))


def build_judge(spec: str, **options: Any) -> Judge:
    """`openai:MODEL` (with base_url, api_key_env, api, ... options) or `hf:PATH`."""
    kind, _, target = spec.partition(":")
    if not target:
        raise MoalignError(f"judge {spec!r}: give openai:MODEL or hf:PATH")
    if kind == "openai":
        return OpenAIJudge(target, **options)
    if kind == "hf":
        keep = {k: v for k, v in options.items() if k in ("device", "batch_size")}
        return HFJudge(target, **keep)
    raise MoalignError(f"unknown judge kind {kind!r} in {spec!r}; use openai:MODEL or hf:PATH")


# ----------------------------------------------------------------------------- pairs


def pair_id(prompt: str, response_a: str, response_b: str) -> str:
    """A content hash: the same pair has the same id in every run, whatever the row order."""
    return hashlib.sha1("\x00".join((prompt, response_a, response_b)).encode()).hexdigest()[:16]


def load_pairs(source: str, split: str = "train", max_samples: int | None = None) -> list[Pair]:
    """Pairs from (prompt, response_a, response_b) or (prompt, chosen, rejected) data (chosen becomes A)."""
    raw = data.load_raw(source, split)
    columns = set(raw.column_names)
    if {"prompt", "response_a", "response_b"} <= columns:
        dataset, first, second, human = raw, "response_a", "response_b", "human" if "human" in columns else None
    else:
        try:
            dataset = data.standardize(raw, source)
        except MoalignError:
            raise MoalignError(
                f"{source} has columns {sorted(columns)}; feedback needs 'prompt', 'response_a' and 'response_b', "
                "or 'prompt', 'chosen' and 'rejected'"
            ) from None
        if not data.is_pairs(dataset):
            raise MoalignError(f"{source} holds single responses; feedback needs pairs (chosen/rejected)")
        first, second, human = "chosen", "rejected", None
    if max_samples:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    ids = [str(i) for i in dataset["id"]] if "id" in dataset.column_names else None
    pairs = []
    for index, row in enumerate(dataset):
        label = "A" if first == "chosen" else (row.get(human) if human else None)
        if label not in ("A", "B", None):
            raise MoalignError(f"{source}: column 'human' must hold 'A', 'B' or nothing, got {label!r}")
        pid = ids[index] if ids else pair_id(row["prompt"], row[first], row[second])
        pairs.append(Pair(pid, row["prompt"], row[first], row[second], label))
    if not pairs:
        raise MoalignError(f"{source} has no pairs")
    return pairs


# ----------------------------------------------------------------------------- the append-only log


class FeedbackLog:
    """`feedback.jsonl`: one line per answer, flushed at once; reopening it skips what was answered."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.records: dict[tuple[str, str, str], dict] = {}
        if self.path.exists():
            self._repair_tail()
            with open(self.path) as handle:
                for line in handle:
                    if line.strip():
                        record = json.loads(line)
                        self.records[(record["id"], record["principle"], record["order"])] = record
        self.handle = open(self.path, "a")  # noqa: SIM115  (held open: one flush per answer)

    def _repair_tail(self) -> None:
        """Drop a half-written last line (a crash mid-write), so appends start on a fresh line."""
        with open(self.path, "rb+") as handle:
            content = handle.read()
            if content and not content.endswith(b"\n"):
                handle.truncate(content.rfind(b"\n") + 1)

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        with self.lock:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
            self.records[(record["id"], record["principle"], record["order"])] = record

    def close(self) -> None:
        self.handle.close()


def check_settings(out_dir: Path, judge: Judge, template: str, principles: list[Principle]) -> None:
    """Refuse to mix answers from another judge, template or question into one log."""
    path = out_dir / SETTINGS
    settings = json.loads(path.read_text()) if path.exists() else {}
    if settings.get("judge", judge.spec) != judge.spec:
        raise MoalignError(f"{out_dir} holds feedback from judge {settings['judge']}; use another --output_dir")
    if settings.get("template", template) != template:
        raise MoalignError(f"{out_dir} holds feedback asked with another template; use another --output_dir")
    questions = settings.get("principles", {})
    for principle in principles:
        if questions.get(principle.name, principle.question) != principle.question:
            raise MoalignError(
                f"{out_dir} asked principle {principle.name!r} with another question; rename it or use another --output_dir"
            )
        questions[principle.name] = principle.question
    settings.update(judge=judge.spec, base_url=getattr(judge, "base_url", None), template=template)
    write_json(path, {**settings, "principles": questions})


# ----------------------------------------------------------------------------- collecting and aggregating


def collect(
    pairs: Sequence[Pair],
    principles: Sequence[Principle],
    judge: Judge,
    out_dir: str | os.PathLike,
    template: str = TEMPLATE,
    chunk: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Ask the judge everything not yet in `out_dir/feedback.jsonl`, then write and return the labels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, judge, template, list(principles))
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
    labels = aggregate(pairs, principles, store.records)
    _write_parquet(labels, out_dir / LABELS)
    summary = summarize(labels, principles, store.records)
    settings = json.loads((out_dir / SETTINGS).read_text())
    write_json(out_dir / SETTINGS, {**settings, "pairs": len(pairs), "summary": summary})
    return labels


def combine(ab: dict, ba: dict) -> tuple[float, float]:
    """Order-averaged (logp_A, logp_B) of response_a and response_b.

    In order AB response_a is letter A; in order BA it is letter B. A bias towards either letter adds
    the same amount to both responses, so it cancels in logp_A − logp_B.
    """
    return (ab["logp_A"] + ba["logp_B"]) / 2, (ab["logp_B"] + ba["logp_A"]) / 2


def aggregate(pairs: Sequence[Pair], principles: Sequence[Principle], records: dict) -> pd.DataFrame:
    """One row per pair; per principle: logp_A, logp_B (order-averaged), preferred and margin."""
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
        found = [len(r.get("found", [])) == 2 for r in answers]
        entry = {
            "position_bias": float(np.mean([r["logp_A"] - r["logp_B"] for r in answers])),
            "consistent": float(labels[f"{principle.name}.consistent"].mean()),
            "both_letters_found": float(np.mean(found)),
            "ties": int((labels[f"{principle.name}.preferred"] == "tie").sum()),
        }
        if human.any():
            agree = labels.loc[human, f"{principle.name}.preferred"] == labels.loc[human, "human"]
            entry["human_agreement"] = float(agree.mean())
        summary[principle.name] = entry
    return summary


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moalign feedback", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file of these options (its `feedback:` section if it has one)")
    p.add_argument("--dataset", help="pairs: prompt/chosen/rejected or prompt/response_a/response_b")
    p.add_argument("--dataset_split", default="train")
    p.add_argument("--max_samples", type=int, default=None, help="only the first N pairs")
    p.add_argument("--output_dir", help="where feedback.jsonl, labels.parquet and feedback.json go")
    p.add_argument("--judge", help="openai:MODEL or hf:PATH")
    p.add_argument("--principles", default=None, help="comma-separated names, or 'all' (default: the twelve)")
    p.add_argument("--principles_file", default=None, help="YAML mapping of extra principle names to questions")
    p.add_argument("--template", default=None, help="file holding a judge prompt template (see TEMPLATE)")
    p.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--api", default="chat", choices=["chat", "completions"], help="endpoint of the judge")
    p.add_argument("--top_logprobs", type=int, default=None, help="default: 20 (chat) or 5 (completions)")
    p.add_argument("--floor", type=float, default=None, help="logprob of a letter missing from the top list")
    p.add_argument("--requests_per_second", type=float, default=0.0, help="rate limit of a remote judge (0: none)")
    p.add_argument("--max_retries", type=int, default=6, help="retries on 429, 5xx and connection errors")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight to a remote judge")
    p.add_argument("--device", default="auto", help="device of an hf judge")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per forward pass of an hf judge")
    return p


def cli(argv: list[str]) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.config:
        section = config_section(args.config, "feedback")
        unknown = sorted(set(section) - set(vars(p.parse_args([]))))
        if unknown:
            raise MoalignError(f"config {args.config}: unknown feedback options {unknown}")
        p.set_defaults(**section)
        args = p.parse_args(argv)
    for name in ("dataset", "output_dir", "judge"):
        if not getattr(args, name):
            raise MoalignError(f"{name} is not set (--{name} or the config's feedback section)")
    principles = load_principles(args.principles, args.principles_file)
    template = Path(args.template).read_text() if args.template else TEMPLATE
    _check_template(template)
    pairs = load_pairs(args.dataset, args.dataset_split, args.max_samples)
    options: dict[str, Any]
    if args.judge.startswith("openai:"):
        options = {
            "base_url": args.base_url,
            "api_key_env": args.api_key_env,
            "api": args.api,
            "top_logprobs": args.top_logprobs,
            "floor": args.floor,
            "requests_per_second": args.requests_per_second,
            "max_retries": args.max_retries,
            "concurrency": args.concurrency,
        }
    else:
        options = {"device": args.device, "batch_size": args.batch_size}
    judge = build_judge(args.judge, **options)
    labels = collect(pairs, principles, judge, args.output_dir, template)
    print(f"feedback on {len(labels)} pairs × {len(principles)} principles written to {args.output_dir}")
    summary = json.loads((Path(args.output_dir) / SETTINGS).read_text())["summary"]
    for name, entry in summary.items():
        extra = f"  human agreement {entry['human_agreement']:.2f}" if "human_agreement" in entry else ""
        print(
            f"  {name:<18} consistent across orders {entry['consistent']:.2f}"
            f"  position bias {entry['position_bias']:+.2f}{extra}"
        )


def _check_template(template: str) -> None:
    for key in ("{conversation}", "{first}", "{second}", "{question}"):
        if key not in template:
            raise MoalignError(f"the judge template must contain {key}")


def iter_answers(out_dir: str | os.PathLike) -> Iterable[dict]:
    """The raw answers of a feedback directory (for audits and notebooks)."""
    path = Path(out_dir) / FEEDBACK
    if not path.exists():
        raise MoalignError(f"{out_dir} has no {FEEDBACK}; run `moalign feedback` first")
    with open(path) as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
