"""Reports with one and with three objectives: `moalign eval` writes the PNG and the HTML page, and they show
the objectives, the panels and the numbers expected."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moalign import report
from moalign.evaluate import evaluate_runs
from moalign.generation import Completion
from moalign.policy import Policy
from moalign.run import write_manifest

PROMPTS = ["Tell me about cats.", "Describe the sea."]
WORDS = {"length": "and", "vader": "good", "brevity": ""}  # what each objective's weight adds to an answer


class WordsPolicy(Policy):
    """Answers `round(4·w_i)` copies of objective i's word after "yes": the points are known in advance."""

    def _complete(self, prompts, weights, params, on_tokens=None):
        out = []
        for w in weights:
            words = ["yes"] + [WORDS[name] for name, wi in zip(self.objectives, w) for _ in range(round(4 * wi))]
            text = " ".join(word for word in words if word)
            out.append(Completion(text=text, token_ids=[], logprobs=[], finish_reason="stop"))
        return out


def make_run(directory: Path, objectives: list[str]) -> Path:
    directory.mkdir(parents=True)
    (directory / "eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    write_manifest(
        directory,
        {
            "method": "words",
            "policy": f"{__name__}:WordsPolicy",
            "objectives": objectives,
            "objective_names": objectives,
            "eval_prompts": "eval.jsonl",
        },
    )
    return directory


@pytest.fixture
def figures(monkeypatch) -> list[list[tuple[str, str]]]:
    """Every figure the report module saves, as the (x label, y label) of each of its panels."""
    saved: list[list[tuple[str, str]]] = []
    original = report.save_figure

    def recording(fig, path):
        saved.append([(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes])
        return original(fig, path)

    monkeypatch.setattr(report, "save_figure", recording)
    return saved


def embedded_png(page: str) -> bytes:
    (encoded,) = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    return base64.b64decode(encoded)


def test_one_objective(tmp_path, figures):
    run = make_run(tmp_path / "run", ["length"])
    (front,) = evaluate_runs([run], divisions=4, progress=False)
    # One objective has one preference, w = (1): four "and" after "yes", five words.
    assert front["preferences"] == [[1.0]] and front["points"] == [[5.0]]
    assert figures == [[("", "length (mean)")]]  # one bar chart of the mean score
    png = (run / "front.png").read_bytes()
    assert Image.open(run / "front.png").size == (550, 440)
    page = (run / "report.html").read_text()
    assert embedded_png(page) == png
    assert "<th>mean length</th>" in page and "<th>steerability length</th>" in page
    assert re.search(r"<td>\(1\)</td><td>5( \[5, 5\])?</td>", page)  # the point (and its interval over prompts)
    assert "vader" not in page and "brevity" not in page


def test_three_objectives_one_panel_per_pair(tmp_path, figures):
    names = ["length", "vader", "brevity"]
    runs = [make_run(tmp_path / "a", names), make_run(tmp_path / "b", names)]
    fronts = evaluate_runs(runs, divisions=2, output_dir=tmp_path / "compare", progress=False)
    assert len(fronts[0]["preferences"]) == 6  # the simplex grid with 2 divisions in 3 objectives
    pairs = [("length (mean)", "vader (mean)"), ("length (mean)", "brevity (mean)"), ("vader (mean)", "brevity (mean)")]
    panels = [*pairs, ("", "weight on length")]  # and the colour bar: points are coloured by the first weight
    assert figures == [panels, panels, panels]  # each run's front.png, then the combined fronts.png
    assert Image.open(runs[0] / "front.png").size == (3 * 550, 495)  # three panels side by side
    # w = (0.5, 0.5, 0): "yes and and good good", five words, and what VADER itself says of it.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer().polarity_scores("yes and and good good")["compound"]
    row = fronts[0]["preferences"].index([0.5, 0.5, 0.0])
    assert fronts[0]["points"][row] == pytest.approx([5.0, vader, -5.0])
    page = (runs[0] / "report.html").read_text()
    assert embedded_png(page) == (runs[0] / "front.png").read_bytes()
    for name in names:
        assert f"<th>mean {name}</th>" in page and f"<th>steerability {name}</th>" in page
    cells = [rf"<td>{value}( \[[^]]*\])?</td>" for value in ("5", f"{vader:.4g}", "-5")]  # (an interval)
    assert re.search(r"<td>\(0.5,0.5,0\)</td>" + "".join(cells), page)
    combined = (tmp_path / "compare" / "report.html").read_text()
    assert combined.count("<h2>a (words)</h2>") == 1 and combined.count("<h2>b (words)</h2>") == 1
    assert embedded_png(combined) == (tmp_path / "compare" / "fronts.png").read_bytes()
    assert np.isfinite(fronts[0]["hypervolume"]) and fronts[0]["hypervolume"] > 0
