"""A feedback directory: the append-only answer log, the settings it was asked with, the labels file."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from moalign.errors import MoalignError
from moalign.methods.feedback.principles import Principle
from moalign.run import read_json, write_json

FEEDBACK = "feedback.jsonl"  # one answer per line, appended as it arrives
LABELS = "labels.parquet"  # one row per pair, columns per principle: what `moalign pm` trains on
SETTINGS = "feedback.json"  # judge, template, questions, and the summary of the last run

Key = tuple[str, str, str]  # (pair id, principle, order)


class FeedbackLog:
    """`feedback.jsonl`: one line per answer, flushed at once; reopening it skips what was answered."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.records: dict[Key, dict] = {}
        if self.path.exists():
            self._repair_tail()
            for record in _read_lines(self.path):
                self.records[(record["id"], record["principle"], record["order"])] = record
        self.handle = open(self.path, "a")  # noqa: SIM115  (held open: one flush per answer)

    def _repair_tail(self) -> None:
        """Drop a half-written last line (a crash mid-write), so appends start on a fresh line."""
        with open(self.path, "rb+") as handle:
            content = handle.read()
            if content and not content.endswith(b"\n"):
                handle.truncate(content.rfind(b"\n") + 1)

    def __contains__(self, key: Key) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        with self.lock:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
            self.records[(record["id"], record["principle"], record["order"])] = record

    def close(self) -> None:
        self.handle.close()


def check_settings(out_dir: Path, spec: str, base_url: str | None, template: str, principles: list[Principle]) -> None:
    """Refuse to mix answers from another judge, template or question into one log; record these."""
    path = out_dir / SETTINGS
    settings = read_json(path) if path.exists() else {}
    if settings.get("judge", spec) != spec:
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
    write_json(path, {**settings, "judge": spec, "base_url": base_url, "template": template, "principles": questions})


def iter_answers(out_dir: str | os.PathLike) -> Iterable[dict]:
    """The raw answers of a feedback directory (for audits and notebooks)."""
    path = Path(out_dir) / FEEDBACK
    if not path.exists():
        raise MoalignError(f"{out_dir} has no {FEEDBACK}; run `moalign feedback` first")
    return _read_lines(path)


def _read_lines(path: Path) -> Iterable[dict]:
    with open(path) as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
