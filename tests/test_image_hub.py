"""Hub image–caption datasets, offline: a dataset in the hub's layout (parquet shards under data/, as
`push_to_hub` writes them) is put in a local `datasets` cache exactly as a first online `load_dataset`
leaves it, and `dataset: user/name` is then loaded with HF_HUB_OFFLINE=1 through the real
`datasets.load_dataset`, the same call a hub id takes online."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from moalign.cli import main
from moalign.demo.images import draw_sample, eval_captions
from moalign.errors import MoalignError
from moalign.image.data import load_images
from moalign.run import read_manifest
from tests.test_ric_image import ric_argv, tiny_base

REPO = "moalign-tests/shapes"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """The hub dataset REPO in a fresh datasets cache, with non-default column names (`jpg`, `prompt`)."""
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(3)
    images, captions = zip(*(draw_sample(rng) for _ in range(12)))
    features = datasets.Features({"jpg": datasets.Image(), "prompt": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"jpg": list(images), "prompt": list(captions)}, features=features)
    clone = root / "shapes"  # the repository as the hub stores it
    for shard in range(2):
        table.shard(2, shard, contiguous=True).to_parquet(str(clone / "data" / f"train-{shard:05d}-of-00002.parquet"))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in eval_captions()[:2]))
    cache = root / "datasets_cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # the user's own cache stays untouched
        assert datasets.config.HF_HUB_OFFLINE  # set by conftest: nothing here may reach the network
        # What the online load of REPO leaves in the cache: the prepared config under <namespace>___<name>.
        builder = datasets.load_dataset_builder(str(clone))
        builder.download_and_prepare(output_dir=str(cache / "moalign-tests___shapes" / "default" / "0.0.0" / "a1b2c3"))
        yield {"root": root, "images": images, "captions": list(captions), "base": tiny_base(root / "base", captions)}


def test_hub_dataset_loads_with_its_column_names(hub):
    loaded = load_images(REPO, image_column="jpg", caption_column="prompt")
    assert loaded.column_names == ["image", "caption"]
    assert loaded["caption"] == hub["captions"]
    for row, image in zip(loaded, hub["images"]):
        assert np.array_equal(np.asarray(row["image"]), np.asarray(image))
    first = load_images(REPO, image_column="jpg", caption_column="prompt", max_samples=5)
    assert first["caption"] == hub["captions"][:5]


def test_hub_dataset_errors_are_one_line(hub):
    with pytest.raises(MoalignError, match=r"has no column 'image' \(set image_column\); it has jpg, prompt"):
        load_images(REPO, caption_column="prompt")
    with pytest.raises(MoalignError, match=r"has no column 'text' \(set caption_column\)"):
        load_images(REPO, image_column="jpg")
    with pytest.raises(MoalignError, match=r"cannot load image dataset moalign-tests/absent \(Couldn't reach"):
        load_images("moalign-tests/absent")  # neither on a reachable hub nor in the cache


def test_ric_image_trains_on_a_hub_dataset(hub):
    root = hub["root"]
    argv = ric_argv(root, hub["base"], REPO, root / "run", "--image_column", "jpg", "--caption_column", "prompt")
    assert main(["ric-image", *argv]) == 0
    offline = pd.read_parquet(root / "run" / "data" / "offline.parquet")
    assert offline["caption"].tolist() == hub["captions"]
    manifest = read_manifest(root / "run")
    assert manifest["training"]["stages"]["offline"]["steps"] == 4 and (root / "run" / manifest["denoiser"]).is_dir()


def test_ric_image_on_an_absent_hub_dataset_writes_nothing(hub, capsys):
    root = hub["root"]
    argv = ric_argv(root, hub["base"], "moalign-tests/absent", root / "absent_run")
    assert main(["ric-image", *argv]) == 2
    errors = re.findall(r"moalign ric-image: error: [^\r\n]*", capsys.readouterr().err)
    assert len(errors) == 1 and "moalign-tests/absent" in errors[0]
    assert not Path(root / "absent_run").exists()
