"""Front evaluation on a hand-made policy whose outputs are known, so every number can be checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moalign import cli, policy
from moalign.data import is_degenerate
from moalign.errors import MoalignError
from moalign.evaluate import evaluate_policy, evaluate_runs
from moalign.fronts import default_reference_point, front_metrics, spearman
from moalign.generation import Completion
from moalign.objectives import build_all
from moalign.pareto import simplex_grid
from moalign.run import write_manifest

FILLER = "this answer talks about the topic"  # six neutral words
POSITIVE = ["good", "great", "wonderful", "happy"]
PROMPTS = ["Tell me about cats.", "Describe the sea."]


class CannedPolicy(policy.Policy):
    """k = 4·w1 positive words after a neutral filler (k = 4·(1 − w1) when `reverse`).

    The second prompt at k = 0 gets an empty answer: the one collapsed response of the grid.
    """

    def __init__(self, manifest, run_dir, **options):
        super().__init__(manifest, run_dir)
        self.reverse = bool(manifest.get("reverse"))

    def _complete(self, prompts, weights, params, on_tokens=None):
        out = []
        for prompt, w in zip(prompts, weights):
            k = round(4 * (1 - w[0] if self.reverse else w[0]))
            text = "" if (k == 0 and prompt == PROMPTS[1]) else " ".join([FILLER, *POSITIVE[:k]])
            out.append(Completion(text=text, token_ids=[], logprobs=[], finish_reason="stop"))
        return out


def expected_response(prompt: str, k: int) -> str:
    return "" if (k == 0 and prompt == PROMPTS[1]) else " ".join([FILLER, *POSITIVE[:k]])


@pytest.fixture
def canned():
    import sys

    assert __name__ in sys.modules  # manifests name f"{__name__}:CannedPolicy"


def make_run(directory: Path, reverse: bool = False, prompts: list[str] = PROMPTS) -> Path:
    directory.mkdir(parents=True)
    (directory / "eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    write_manifest(
        directory,
        {
            "method": "canned",
            "policy": f"{__name__}:CannedPolicy",
            "objectives": ["vader", "brevity"],
            "objective_names": ["vader", "brevity"],
            "eval_prompts": "eval.jsonl",
            "reverse": reverse,
            "stats": {
                "names": ["vader", "brevity"],
                "mean": [0.1, -8.0],
                "std": [0.2, 1.0],
                "min": [0, -10],
                "max": [1, 0],
            },
        },
    )
    return directory


def expected_points(reverse: bool = False) -> np.ndarray:
    vader, brevity = build_all(["vader", "brevity"])
    rows = []
    for w1 in np.linspace(0, 1, 5):
        k = round(4 * (1 - w1 if reverse else w1))
        texts = [expected_response(p, k) for p in PROMPTS]
        rows.append([vader.score(PROMPTS, texts).mean(), brevity.score(PROMPTS, texts).mean()])
    return np.asarray(rows)


def staircase_area(points: np.ndarray, reference: list[float]) -> float:
    """2-D hypervolume by hand: sweep the points by x descending, adding the new strip each time."""
    area, best_y = 0.0, reference[1]
    for x, y in sorted(points.tolist(), key=lambda p: -p[0]):
        if y > best_y:
            area += (x - reference[0]) * (y - best_y)
            best_y = y
    return area


def test_is_degenerate():
    assert is_degenerate("")
    assert is_degenerate("two words")
    assert is_degenerate("happy happy happy happy happy")
    assert is_degenerate("I am here . I am here . I am here .")  # a 3-gram three times
    assert not is_degenerate("the cat sat on the mat and purred")
    assert not is_degenerate(FILLER)


def test_spearman_is_nan_safe():
    assert spearman([0, 1, 2], [1, 5, 9]) == pytest.approx(1.0)
    assert spearman([0, 1, 2], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([0, 1, 2], [4, 4, 4]))
    assert np.isnan(spearman([1], [2]))


def test_evaluate_policy_numbers(tmp_path):
    run = make_run(tmp_path / "run")
    pol = CannedPolicy(json.loads((run / "moalign.json").read_text()), run)
    objectives = build_all(["vader", "brevity"])
    result = evaluate_policy(pol, PROMPTS, objectives, simplex_grid(2, 4))
    points = np.asarray(result["points"])
    np.testing.assert_allclose(points, expected_points())
    assert np.all(np.diff(points[:, 0]) > 0) and np.all(np.diff(points[:, 1]) < 0)  # a real trade-off
    assert result["non_dominated"] == [0, 1, 2, 3, 4]
    assert result["steerability"] == {"vader": pytest.approx(1.0), "brevity": pytest.approx(1.0)}
    assert result["collapse_rate"] == pytest.approx(1 / 10)
    assert result["collapse_rates"] == [0.5, 0.0, 0.0, 0.0, 0.0]
    assert result["samples"][4][0]["response"] == "this answer talks about the topic good great wonderful happy"
    assert result["prompts"] == 2


def test_reversed_policy_has_negative_steerability(tmp_path):
    run = make_run(tmp_path / "run", reverse=True)
    pol = CannedPolicy(json.loads((run / "moalign.json").read_text()), run)
    result = evaluate_policy(pol, PROMPTS, build_all(["vader", "brevity"]), simplex_grid(2, 4))
    assert result["steerability"]["vader"] == pytest.approx(-1.0)
    assert result["steerability"]["brevity"] == pytest.approx(-1.0)


def test_preferences_served_alike_are_generated_once(tmp_path):
    """A policy's `variant` says which preferences give the same text; evaluation generates once for each."""

    class Coarse(CannedPolicy):
        calls = 0

        def variant(self, weights):
            return bool(weights[0] >= 0.5)

        def _complete(self, prompts, weights, params, on_tokens=None):
            Coarse.calls += 1
            return super()._complete(prompts, weights, params)

    run = make_run(tmp_path / "run")
    pol = Coarse(json.loads((run / "moalign.json").read_text()), run)
    result = evaluate_policy(pol, PROMPTS, build_all(["vader", "brevity"]), simplex_grid(2, 4))
    points = np.asarray(result["points"])
    assert Coarse.calls == 2
    np.testing.assert_allclose(points[:2], expected_points()[[0, 0]])
    np.testing.assert_allclose(points[2:], expected_points()[[2, 2, 2]])


def test_front_metrics_by_hand():
    points = np.array([[0.0, 3.0], [1.0, 2.0], [0.5, 1.0], [2.0, 0.0]])  # [0.5, 1] is dominated by [1, 2]
    metrics = front_metrics(points, [-1.0, -1.0])
    assert metrics["non_dominated"] == [0, 1, 3]
    # strips: x=2 → 3·1, x=1 → 2·2, x=0 → 1·1
    assert metrics["hypervolume"] == pytest.approx(3 * 1 + 2 * 2 + 1 * 1)
    assert default_reference_point([points]) == pytest.approx([-0.2, -0.3])


def test_evaluate_runs_writes_fronts_and_shares_the_reference(tmp_path, canned):
    forward, backward = make_run(tmp_path / "forward"), make_run(tmp_path / "backward", reverse=True)
    fronts = evaluate_runs([forward, backward], divisions=4, output_dir=tmp_path / "compare", progress=False)
    all_points = np.vstack([expected_points(), expected_points(reverse=True)])
    low, high = all_points.min(axis=0), all_points.max(axis=0)
    reference = low - 0.1 * (high - low)
    for front in fronts:
        assert front["reference_point"] == pytest.approx(reference)
        points = np.asarray(front["points"])
        assert front["hypervolume"] == pytest.approx(staircase_area(points[front["non_dominated"]], reference))
    for run in (forward, backward):
        for name in ("front.json", "front.png", "report.html"):
            assert (run / name).stat().st_size > 0
        saved = json.loads((run / "front.json").read_text())
        for key in ("objectives", "preferences", "points", "non_dominated", "reference_point", "hypervolume",
                    "collapse_rate", "steerability", "prompts", "method", "samples", "seconds"):  # fmt: skip
            assert key in saved
        assert saved["method"] == "canned" and saved["prompts"] == 2
    page = (forward / "report.html").read_text()
    assert "data:image/png;base64," in page and "Normalisation statistics" in page and "wonderful" in page
    for name in ("fronts.png", "report.html", "fronts.json"):
        assert (tmp_path / "compare" / name).exists()


def test_evaluate_runs_prompt_override_and_n_prompts(tmp_path, canned):
    run = make_run(tmp_path / "run")
    (front,) = evaluate_runs([run], prompts=PROMPTS + ["Extra prompt."], n_prompts=2, divisions=2, progress=False)
    assert front["prompts"] == 2 and len(front["points"]) == 3


def one_line_error(call) -> str:
    with pytest.raises(MoalignError) as error:
        call()
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_bad_inputs_give_one_line_errors(tmp_path, canned):
    run = make_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    assert "moalign.json" in one_line_error(lambda: evaluate_runs([tmp_path / "empty"]))
    assert "reference point" in one_line_error(lambda: evaluate_runs([run], reference_point="1,2,3"))
    assert "empty" in one_line_error(lambda: evaluate_runs([run], prompts=[]))
    pol = CannedPolicy(json.loads((run / "moalign.json").read_text()), run)
    one_line_error(lambda: evaluate_policy(pol, [], build_all(["vader", "brevity"]), simplex_grid(2, 2)))
    one_line_error(lambda: evaluate_policy(pol, PROMPTS, build_all(["vader", "brevity"]), [[0.2, 0.3, 0.5]]))
    other = tmp_path / "other"
    other.mkdir()
    write_manifest(
        other,
        {
            "method": "canned",
            "policy": f"{__name__}:CannedPolicy",
            "objectives": ["vader"],
            "objective_names": ["vader"],
        },
    )
    assert "different objectives" in one_line_error(lambda: evaluate_runs([run, other]))


def test_cli_exit_code_2_without_manifest(tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    assert cli.main(["eval", str(tmp_path / "not-a-run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moalign eval: error:") and len(err.splitlines()) == 1


def test_cli_prints_table(tmp_path, canned, capsys):
    run = make_run(tmp_path / "run")
    assert cli.main(["eval", str(run), "--divisions", "4", "--reference-point", "-1,-20"]) == 0
    out = capsys.readouterr().out
    assert "hypervolume" in out and "canned" in out and str(run / "report.html") in out
    assert json.loads((run / "front.json").read_text())["reference_point"] == [-1.0, -20.0]


def test_a_real_fixed_model_gives_identical_points_and_undefined_steerability(tmp_path, tiny_lm):
    """The base model ignores the preference: same seeds give the same answers on every grid point."""
    run = tmp_path / "base"
    run.mkdir()
    write_manifest(
        run,
        {
            "method": "base",
            "model": str(tiny_lm),
            "objectives": ["length", "brevity"],
            "objective_names": ["length", "brevity"],
            "sampling": {"max_new_tokens": 6, "temperature": 1.0},
        },
    )
    (front,) = evaluate_runs([run], prompts=["the cat", "a good day"], divisions=2, progress=False)
    points = np.asarray(front["points"])
    assert (points == points[0]).all()
    assert front["non_dominated"] == [0, 1, 2]  # duplicates all stay on the front
    assert front["hypervolume"] > 0  # the default reference sits below even a single point
    assert front["generated_unit"] == "tokens" and front["generated"] > 0
    saved = json.loads((run / "front.json").read_text())
    assert saved["steerability"] == {"length": None, "brevity": None}  # NaN is written as null


def test_the_runs_prompt_template_wraps_every_prompt(tmp_path):
    """A run trained on templated prompts (MODPO's safety setup) is asked in the same template."""

    class Recording(CannedPolicy):
        def _complete(self, prompts, weights, params, on_tokens=None):
            self.seen = list(prompts)
            return super()._complete(prompts, weights, params)

    run = make_run(tmp_path / "run")
    manifest = {**json.loads((run / "moalign.json").read_text()), "prompt_template": "USER: {prompt} ASSISTANT:"}
    pol = Recording(manifest, run)
    pol.generate(PROMPTS, [0.5, 0.5])
    assert pol.seen == [f"USER: {p} ASSISTANT:" for p in PROMPTS]
    plain = Recording(json.loads((run / "moalign.json").read_text()), run)
    plain.generate(PROMPTS, [0.5, 0.5])
    assert plain.seen == PROMPTS
