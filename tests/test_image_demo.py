"""`moalign demo --task images` end to end at toy size: the shipped config with its steps and batches cut, the
real corpus, pipeline, training, evaluation, report and grid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from moalign.cli import main
from moalign.configs import FOLDER as SHIPPED_CONFIGS
from moalign.demo.images import CONFIG
from moalign.run import read_json

ARGS = ["--images", "40", "--eval-prompts", "3", "--divisions", "2"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("configs")
    config = yaml.safe_load((SHIPPED_CONFIGS / CONFIG).read_text())
    for section in ("base", "ric"):
        config[section].update(max_steps=3, per_device_train_batch_size=4, warmup_steps=0, save_steps=100)
    config["ric"].update(sample_steps=2)
    (folder / CONFIG).write_text(yaml.safe_dump(config))
    return folder


def test_image_demo_end_to_end_and_rerun(configs, tmp_path, capsys):
    threads_before = torch.get_num_threads()
    out = tmp_path / "demo"
    argv = ["demo", "--task", "images", "--output-dir", str(out), "--configs", str(configs), *ARGS]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert re.search(r"finished in \d+s wall, \d+s CPU on 1 torch thread \(wall/CPU: corpus .* eval \d+s/\d+s\)", first)
    assert torch.get_num_threads() == threads_before  # the demo's fixed thread count is restored afterwards
    fronts = read_json(out / "fronts.json")
    assert [run["name"] for run in fronts["runs"]] == ["base", "ric"]
    assert len(fronts["runs"][1]["points"]) == 3  # w1 = 0, 0.5, 1
    grid = Image.open(out / "ric" / "grid.png")
    assert grid.height >= 3 * 64 and grid.width >= 3 * 64  # a row per preference, a column per prompt
    # A rerun finds every stage done and evaluates the same models to the same table.
    assert main(argv) == 0
    table = re.compile(r"^(?:base|ric|reference point).*$", re.M)
    assert table.findall(capsys.readouterr().out) == table.findall(first) != []
