"""RiC for text-to-image pipelines: tiny diffusers pipelines made on the spot, trained, evaluated and served
for real (a UNet of 8/16 channels, a CLIP text encoder of width 16, 16×16 images)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moalign.cli import main
from moalign.configs import FOLDER as SHIPPED_CONFIGS
from moalign.demo.images import demo_tokenizer, eval_captions, tiny_pipeline, write_corpus
from moalign.errors import MoalignError
from moalign.image.denoiser import CaptionDropout, trainer_args
from moalign.image.pipeline import conditioned_caption, token_budget
from moalign.image.policy import collapsed
from moalign.image.ric import RiCImageConfig, train
from moalign.methods.config import parse_config
from moalign.methods.ric import QUANTILE_LEVELS, RewardTemplate, parse_prompt, preference_to_targets
from moalign.objectives import build
from moalign.objectives.image import ImageResponse, colorfulness
from moalign.scores import ScoreCache, score

TAGS = ["<rm1>", "<rm2>"]
OBJECTIVES = ["colorfulness", "jpeg_compressibility"]


def red_share(prompts, images):
    """A `python:` objective over images: the mean red channel in [0, 1]."""
    return [float(np.asarray(image.convert("RGB"))[..., 0].mean() / 255) for image in images]


def nan_scores(prompts, images):
    return [math.nan] * len(images)


def tiny_base(folder: Path, captions: list[str]) -> Path:
    tiny_pipeline(demo_tokenizer(captions, TAGS), channels=(8, 16), text_width=16).save_pretrained(folder)
    return folder


def ric_argv(root: Path, base: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(base), "--dataset", str(corpus), "--output_dir", str(output),
        "--objectives", *OBJECTIVES, "--reward_tags", *TAGS, "--max_steps", "4", "--per_device_train_batch_size",
        "4", "--learning_rate", "1e-3", "--sample_steps", "2", "--sample_guidance_scale", "2.0",
        "--score_cache", str(root / "scores.sqlite"), "--report_to", "none", "--logging_steps", "100",
        "--save_steps", "100", "--eval_prompts", str(root / "prompts.jsonl"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ric_image")
    corpus = write_corpus(root / "corpus", 24)
    captions = [json.loads(line)["text"] for line in (corpus / "metadata.jsonl").read_text().splitlines()]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in eval_captions()[:3]))
    return {"root": root, "corpus": corpus, "base": tiny_base(root / "base", captions)}


@pytest.fixture(scope="module")
def ric_run(setup) -> Path:
    root = setup["root"]
    train(parse_config(RiCImageConfig, ric_argv(root, setup["base"], setup["corpus"], root / "ric")))
    return root / "ric"


# --- objectives ---------------------------------------------------------------------------------------------


def test_image_objectives_against_hand_computed_values():
    grey = Image.new("RGB", (16, 16), (128, 128, 128))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    jpeg, colour = build("jpeg_compressibility"), build("colorfulness")
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=95)
    assert jpeg.score(["", ""], [grey, noise])[1] == pytest.approx(-len(buffer.getvalue()) / 1000)
    flat, noisy = jpeg.score(["", ""], [grey, noise])
    assert flat > noisy  # a flat image compresses better than noise
    assert colorfulness(grey) == 0.0
    # Two pixels, red and blue: rg = (255, 0), yb = (127.5, -255).
    two = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8))
    expected = math.hypot(127.5, 191.25) + 0.3 * math.hypot(127.5, -63.75)
    assert colour.score([""], [two])[0] == pytest.approx(expected)


def test_image_scores_are_cached_by_pixels(tmp_path):
    cache = ScoreCache(tmp_path / "cache.sqlite")
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    first = score([build("colorfulness")], ["a"], [ImageResponse(image)], cache=cache, progress=False)
    key = ScoreCache.key(build("colorfulness"), "a", ImageResponse(image.copy()))  # same pixels, new object
    assert cache.get([key]) == {key: pytest.approx(first["colorfulness"][0])}


def test_python_objective_over_images():
    objective = build("python:tests.test_ric_image:red_share")
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    assert objective.score(["", ""], [ImageResponse(red), ImageResponse(blue)]).tolist() == [1.0, 0.0]


def test_aesthetic_with_tiny_clip_and_head(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 16, "patch_size": 8,
        },
        projection_dim=8,
    )  # fmt: skip
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor.save_pretrained(tmp_path / "clip")
    head = {
        "layers.0.weight": torch.randn(4, 8),
        "layers.0.bias": torch.randn(4),
        "layers.2.weight": torch.randn(1, 4),
        "layers.2.bias": torch.randn(1),
    }  # the LAION layout: Linear, Dropout, Linear, … with no activation
    torch.save(head, tmp_path / "head.pth")
    objective = build(f"aesthetic:{tmp_path / 'head.pth'}?clip={tmp_path / 'clip'}")
    images = [Image.new("RGB", (16, 16), (250, 40, 40)), Image.new("RGB", (20, 16), (10, 90, 200))]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        features = clip.get_image_features(pixel_values=pixels)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        embedding = features / features.norm(dim=-1, keepdim=True)
        expected = (embedding @ head["layers.0.weight"].T + head["layers.0.bias"]) @ head["layers.2.weight"].T
        expected = (expected + head["layers.2.bias"]).reshape(-1).numpy()
    assert objective.score(["", ""], images) == pytest.approx(expected, abs=1e-5)
    torch.save({"layers.0.weight": torch.randn(1, 5)}, tmp_path / "wide.pth")
    with pytest.raises(MoalignError, match="5-d embeddings"):
        build(f"aesthetic:{tmp_path / 'wide.pth'}?clip={tmp_path / 'clip'}")


# --- captions, dropout, mapping -------------------------------------------------------------------------------


def test_caption_is_cut_never_the_tags():
    tokenizer = demo_tokenizer(eval_captions() + ["on a striped background"], TAGS, max_length=12)
    template = RewardTemplate(tags=TAGS)
    short = conditioned_caption("a red circle", [0.3, -1.24], template, tokenizer)
    assert short == "a red circle <rm1> 0.3 <rm2> -1.2"
    assert parse_prompt(short, template) == ("a red circle", [0.3, -1.2])
    long = "a red circle on a striped background " * 3
    fitted = conditioned_caption(long, [2.0, -0.04], template, tokenizer)
    caption, values = parse_prompt(fitted, template)
    assert values == [2.0, 0.0]  # the tags survive whole ("-0.0" is written as 0.0)
    assert long.startswith(caption) and len(caption) < len(long)
    assert len(tokenizer(fitted)["input_ids"]) <= tokenizer.model_max_length
    assert len(tokenizer(caption, add_special_tokens=False)["input_ids"]) == token_budget(tokenizer) - 4
    with pytest.raises(MoalignError, match="reward tags"):
        conditioned_caption("a red circle", [1.0, 1.0], template, demo_tokenizer(["a"], TAGS, max_length=4))


def test_caption_dropout_drops_one_in_ten_whole_captions():
    dropout = CaptionDropout(0.1, seed=0)
    rows = [{"pixel_values": torch.zeros(3, 2, 2), "caption": f"a red circle <rm1> {i}"} for i in range(100)]
    captions = [c for _ in range(200) for c in dropout(rows)["caption"]]
    dropped = sum(c == "" for c in captions) / len(captions)
    assert 0.09 < dropped < 0.11
    assert all(c == "" or c.startswith("a red circle <rm1> ") for c in captions)
    assert dropout(rows)["pixel_values"].shape == (100, 3, 2, 2)


def test_quantile_mapping_matches_its_formula():
    z = np.random.default_rng(0).normal(size=(1000, 2)) * [1.0, 2.0]
    table = np.quantile(z, QUANTILE_LEVELS, axis=0)
    low, high = z.min(axis=0), z.max(axis=0)
    for w in ([0.3, 0.7], [0.8, 0.2], [0.5, 0.5], [1.0, 0.0]):
        targets = preference_to_targets(w, low, high, "quantile", table)
        dominant, other = int(np.argmax(w)), int(np.argmin(w))
        assert targets[dominant] == pytest.approx(z[:, dominant].max())  # the top quantile
        assert targets[other] == pytest.approx(np.quantile(z[:, other], min(1.0, 2 * w[other])))  # quantile 2·w


def test_collapse_rule_flags_identical_images_only():
    rng = np.random.default_rng(0)
    distinct = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    assert collapsed(distinct) == [False, False, False]
    same = [Image.new("RGB", (8, 8), (100, 100, 100))] * 2 + [Image.new("RGB", (8, 8), (101, 100, 100))]
    assert collapsed(same + distinct[:1]) == [True, True, True, False]


# --- training, evaluation, generation, serving ------------------------------------------------------------


def test_run_manifest_policy_and_evaluation(ric_run, setup):
    from moalign.evaluate import evaluate_runs
    from moalign.policy import load_policy
    from moalign.run import read_manifest

    manifest = read_manifest(ric_run)
    assert manifest["policy"] == "moalign.image.policy:RiCImagePolicy"
    assert manifest["ric"]["mapping"] == "quantile" and manifest["stats"]["names"] == OBJECTIVES
    policy = load_policy(ric_run, device="cpu")
    z = json.loads((ric_run / "moalign.json").read_text())["ric"]
    targets = preference_to_targets([0.3, 0.7], z["low"], z["high"], "quantile", np.asarray(z["quantiles"]))
    caption = policy.prompt_for("a red circle", np.array([0.3, 0.7]))
    assert parse_prompt(caption, policy.template) == ("a red circle", [round(t, 1) + 0.0 for t in targets])
    images = policy.images(["a red circle", "a blue square"], [0.3, 0.7])
    assert [i.size for i in images] == [(16, 16), (16, 16)]
    again = policy.images(["a red circle"], [0.3, 0.7])  # a row's image does not depend on its batch
    assert again[0].tobytes() == images[0].tobytes()
    del policy

    (front,) = evaluate_runs([ric_run], divisions=2, n_prompts=3, progress=False)
    assert len(front["points"]) == 3 and front["generated_unit"] == "images"
    assert 0.0 <= front["collapse_rate"] <= 1.0
    grid = Image.open(ric_run / "grid.png")
    assert grid.height == 3 * 66  # one row per preference
    assert "alt='grid'" in (ric_run / "report.html").read_text()
    saved = json.loads((ric_run / "front.json").read_text())
    assert saved["samples"][0][0]["response"].startswith("image:")


def test_generate_command_writes_pngs(ric_run, tmp_path, capsys):
    out = tmp_path / "pngs"
    argv = ["generate", str(ric_run), "a red circle", "a blue cross", "--weights", "0.3,0.7", "--out", str(out)]
    assert main([*argv, "--steps", "2", "--seed", "5"]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000-seed5.png", "001-seed6.png"]
    assert Image.open(files[0]).size == (16, 16)
    assert main(["generate", str(ric_run), "a red circle"]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_images_endpoint_through_the_openai_client(ric_run):
    import openai

    from moalign.testing import serve_run

    with serve_run(ric_run, api_key="k") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        ask = {"prompt": "a red circle", "model": "ric", "response_format": "b64_json"}
        answer = client.images.generate(**ask, n=2, extra_body={"preference": [0.3, 0.7], "seed": 3, "steps": 2})
        images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in answer.data]
        assert [i.size for i in images] == [(16, 16), (16, 16)]
        assert images[0].tobytes() != images[1].tobytes()  # n images: n seeds
        assert answer.data[0].revised_prompt.startswith("a red circle <rm1> ")
        same = client.images.generate(**ask, extra_body={"preference": [0.3, 0.7], "seed": 3, "steps": 2})
        assert same.data[0].b64_json == answer.data[0].b64_json
        other = client.images.generate(**ask, extra_body={"preference": [0.9, 0.1], "seed": 3, "steps": 2})
        assert other.data[0].revised_prompt != answer.data[0].revised_prompt
        with pytest.raises(openai.BadRequestError, match="preference"):
            client.images.generate(**ask, extra_body={"preference": [0.5]})
        with pytest.raises(openai.BadRequestError, match="16x16"):
            client.images.generate(**ask, size="1024x1024")


def test_lora_and_ema_save_a_plain_unet(setup, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    argv = ric_argv(setup["root"], setup["base"], setup["corpus"], tmp_path / "run", "--use_peft", "--use_ema")
    train(parse_config(RiCImageConfig, [*argv, "--max_steps", "2", "--lora_r", "4", "--ema_decay", "0.5"]))
    weights = load_file(tmp_path / "run" / "stages" / "offline" / "diffusion_pytorch_model.safetensors")
    assert not any("lora" in key for key in weights)
    base = UNet2DConditionModel.from_pretrained(setup["base"] / "unet").state_dict()
    changed = [k for k in weights if not torch.equal(weights[k], base[k])]
    assert changed and all("attn" in k for k in changed)  # LoRA touched the attention projections only


def test_mors_iteration_relabels_and_filters(setup, tmp_path):
    from moalign.methods.ric import mors_filter

    run = tmp_path / "run"
    argv = ric_argv(setup["root"], setup["base"], setup["corpus"], run, "--max_steps", "2", "--online_iterations", "1")
    argv += ["--online_prompts", "8", "--offline_mix_samples", "4", "--online_max_steps", "2"]
    train(parse_config(RiCImageConfig, argv))
    rows = [json.loads(line) for line in (run / "data" / "online_1" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all((run / "data" / "online_1" / r["file_name"]).exists() for r in rows)
    z = np.array([[r["z_colorfulness"], r["z_jpeg_compressibility"]] for r in rows])
    assert [r["kept"] for r in rows] == mors_filter(z, 0.7).tolist()  # relabelled with the scores obtained
    image = Image.open(run / "data" / "online_1" / rows[0]["file_name"])
    assert rows[0]["colorfulness"] == pytest.approx(colorfulness(image))
    manifest = json.loads((run / "moalign.json").read_text())
    assert manifest["denoiser"] == "stages/online_1"
    assert manifest["training"]["stages"]["online_1"]["kept"] == sum(r["kept"] for r in rows)


# --- resuming and bad input ---------------------------------------------------------------------------------


def test_resume_after_an_interrupted_stage(setup, tmp_path):
    run = tmp_path / "run"
    argv = ric_argv(setup["root"], setup["base"], setup["corpus"], run, "--max_steps", "12", "--save_steps", "2")
    argv += ["--per_device_train_batch_size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "moalign.cli", "ric-image", *argv], env=env)
    checkpoint = run / "checkpoints" / "offline" / "checkpoint-4"
    deadline = time.time() + 240
    while not (checkpoint / "trainer_state.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.kill()
    process.wait()
    assert checkpoint.exists() and not (run / "stages" / "offline").exists()
    prepared = (run / "data" / "offline.parquet").stat().st_mtime_ns
    train(parse_config(RiCImageConfig, argv))
    stats = json.loads((run / "stages" / "offline" / "moalign_stage.json").read_text())
    assert stats["steps"] == 12
    assert (run / "data" / "offline.parquet").stat().st_mtime_ns == prepared  # not scored again
    assert not (run / "checkpoints" / "offline").exists()
    assert json.loads((run / "moalign.json").read_text())["training"]["stages"]["offline"]["resumed_from"] >= 4
    assert main(["ric-image", *argv, "--caption_dropout", "0.2"]) == 2  # other settings: refused, not mixed


def _folder(tmp_path: Path, rows: list[dict], images: dict[str, Image.Image | bytes]) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, image in images.items():
        if isinstance(image, bytes):
            (folder / name).write_bytes(image)
        else:
            image.save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


BAD_INPUT = {
    "unreadable": (
        [{"file_name": "a.png", "text": "a red circle"}, {"file_name": "b.png", "text": "a blue square"}],
        {"a.png": Image.new("RGB", (16, 16)), "b.png": b"not an image"},
        "b.png is not a readable image",
    ),
    "no caption": (
        [{"file_name": "a.png", "text": "a red circle"}, {"file_name": "b.png", "text": ""}],
        {"a.png": Image.new("RGB", (16, 16)), "b.png": Image.new("RGB", (16, 16))},
        "b.png has no caption",
    ),
    "mixed sizes": (
        [{"file_name": "a.png", "text": "a red circle"}, {"file_name": "b.png", "text": "a blue square"}],
        {"a.png": Image.new("RGB", (16, 16)), "b.png": Image.new("RGB", (8, 8))},
        "mixed sizes",
    ),
}


@pytest.mark.parametrize("case", [*BAD_INPUT, "nan objective"])
def test_bad_input_is_one_line_and_writes_nothing(case, setup, tmp_path, capsys):
    if case == "nan objective":
        rows, images, message = (
            [{"file_name": "a.png", "text": "a red circle"}],
            {"a.png": Image.new("RGB", (16, 16))},
            "NaN",
        )
    else:
        rows, images, message = BAD_INPUT[case]
    corpus = _folder(tmp_path, rows, images)
    argv = ric_argv(tmp_path, setup["base"], corpus, tmp_path / "run")
    if case == "nan objective":
        argv[argv.index("colorfulness")] = "python:tests.test_ric_image:nan_scores"
    assert main(["ric-image", *argv]) == 2
    # progress bars share stderr (and a bar cut short by the error, its line)
    errors = re.findall(r"moalign ric-image: error: [^\r\n]*", capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "run").exists()


def test_the_papers_checkpointing_on_a_gpu_is_the_unets_not_the_trainers(monkeypatch, tmp_path):
    """ric_sd15.yaml asks for gradient checkpointing. On a GPU the UNet checkpoints itself; the Trainer's switch
    must stay off (it would call `gradient_checkpointing_enable`, which diffusers' UNet does not have), and turning
    it off by its old name alone does not: transformers keeps the new name's value."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config keeps what a GPU run keeps
    # our config code sees a GPU; transformers places on the CPU (use_cpu), where this machine can
    argv = [
        "--config",
        str(SHIPPED_CONFIGS / "ric_sd15.yaml"),
        "--bf16",
        "false",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
    ]
    config = parse_config(RiCImageConfig, [*argv, "--dataset", "images", "--output_dir", str(tmp_path / "run")])
    assert config.gradient_checkpointing and config.activation_checkpointing  # what the UNet is asked for
    from diffusers import UNet2DConditionModel

    # what the Trainer's switch would call on it, and what it has instead
    assert not hasattr(UNet2DConditionModel, "gradient_checkpointing_enable")
    assert not hasattr(UNet2DConditionModel, "activation_checkpointing_enable")
    assert hasattr(UNet2DConditionModel, "enable_gradient_checkpointing")
    args = trainer_args(config, tmp_path / "stage")
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    assert config.gradient_checkpointing  # the config itself is untouched
