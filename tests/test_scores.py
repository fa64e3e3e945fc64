import json

import numpy as np
import pandas as pd
import pytest

from moalign import objectives
from moalign.cli import main
from moalign.errors import MoalignError
from moalign.objectives.base import Objective
from moalign.scores import NormStats, ScoreCache, score, score_dataset


class CountingObjective(Objective):
    """A real objective (length in characters) that counts the samples it was asked to score."""

    def __init__(self):
        self.spec = self.name = "counting"
        self.calls = 0

    def _score(self, prompts, responses):
        self.calls += len(responses)
        return [float(len(r)) for r in responses]


def test_cache_skips_rescoring(tmp_path):
    objective = CountingObjective()
    cache = ScoreCache(tmp_path / "scores.sqlite")
    first = score([objective], ["p"] * 4, ["a", "bb", "ccc", "a"], cache=cache, batch_size=2, progress=False)
    assert objective.calls == 4
    second = score([objective], ["p"] * 3, ["a", "bb", "dddd"], cache=cache, progress=False)
    assert objective.calls == 5  # only "dddd" was new
    assert first["counting"].tolist() == [1, 2, 3, 1]
    assert second["counting"].tolist() == [1, 2, 4]
    # The cache persists on disk: a new process (new cache object) reuses it.
    score([objective], ["p"], ["ccc"], cache=ScoreCache(tmp_path / "scores.sqlite"), progress=False)
    assert objective.calls == 5


def test_norm_stats_roundtrip():
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0, 0.0, 10.0, 10.0]})
    stats = NormStats.fit(frame, ["a", "b"])
    again = NormStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    z = stats.zscore(stats.matrix(frame))
    assert np.allclose(z.mean(axis=0), 0) and np.allclose(z.std(axis=0), 1)
    assert np.allclose(stats.minmax(stats.matrix(frame))[:, 1], [0, 0, 1, 1])
    assert stats.quantiles["0.5"] == pytest.approx([2.5, 5.0])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_score_dataset_pairs_and_hh_dialogues(tmp_path):
    hh = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: I am great, thanks!",
                "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: bad",
            }
        ],
    )
    frame = score_dataset(str(hh), "length,vader", cache=ScoreCache())
    assert frame["prompt"].tolist() == ["\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"] * 2
    assert frame["response"].tolist() == ["I am great, thanks!", "bad"]
    assert frame["length"].tolist() == [4, 1]
    assert frame["preferred"].tolist() == [True, False]


def test_score_cli_writes_parquet_and_refuses_overwrite(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "a b c"}, {"prompt": "q", "response": "a"}])
    out = tmp_path / "out.parquet"
    cache = str(tmp_path / "cache.sqlite")
    args = ["score", "--dataset", str(data), "--objectives", "length,brevity", "--output", str(out), "--cache", cache]
    assert main(args) == 0
    assert pd.read_parquet(out)["brevity"].tolist() == [-3, -1]
    before = out.read_bytes()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before  # nothing lost or overwritten
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize(
    "rows, objectives_spec, message",
    [
        (None, "length", "does not exist"),
        ([{"question": "q", "answer": "a"}], "length", "needs 'prompt' and 'response'"),
        ([{"prompt": "q", "response": "a"}], "length,unknownthing", "unknown objective 'unknownthing'"),
        ([{"prompt": "q", "response": "a"}], "python:test_objectives:nan_scorer", "NaN"),
        ([{"prompt": "q", "response": "a"}], "python:test_objectives:short_scorer", "one per sample"),
    ],
)
def test_score_cli_bad_input_is_one_line(tmp_path, capsys, rows, objectives_spec, message):
    path = tmp_path / "missing.jsonl" if rows is None else write_jsonl(tmp_path / "d.jsonl", rows)
    if rows is not None and "short" in objectives_spec:
        write_jsonl(path, rows * 2)
    out = tmp_path / "o.parquet"
    code = main(
        [
            "score",
            "--dataset",
            str(path),
            "--objectives",
            objectives_spec,
            "--output",
            str(out),
            "--cache",
            str(tmp_path / "c.sqlite"),
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_duplicate_objective_names_rejected():
    with pytest.raises(MoalignError, match="unique"):
        objectives.build_all(["length", "length"])
