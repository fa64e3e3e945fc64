"""`moalign export RUN --for vllm|transformers OUTDIR`: folders an upstream engine can serve, and the commands.

Runs are built on the spot: full tiny GPT-2 models, and LoRA adapters on one base saved with PEFT (what
a per-preference run trained with `save_adapters: true` holds). That `transformers serve` really serves
an exported folder is tested in test_router.py; vLLM does not run on CPU, so its command is checked as text.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from moalign.cli import main  # noqa: E402
from moalign.export import EXPORT_MANIFEST  # noqa: E402
from moalign.run import write_manifest  # noqa: E402
from moalign.testing import build_causal_lm  # noqa: E402


def save_adapter(base: Path, destination: Path, seed: int, rank: int) -> None:
    """A LoRA adapter on `base` with random (non-zero) B, so that merging it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=rank, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    model.save_pretrained(destination)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    base = build_causal_lm(root / "base")
    lora = root / "lora-run"
    save_adapter(base, lora / "models" / "w1-0", seed=1, rank=4)
    save_adapter(base, lora / "models" / "w0-1", seed=2, rank=8)
    models = [{"preference": [1, 0], "path": "models/w1-0"}, {"preference": [0, 1], "path": "models/w0-1"}]
    write_manifest(lora, {"method": "modpo", "objective_names": ["a", "b"], "models": models})
    full = root / "full-run"
    build_causal_lm(full / "models" / "w1-0", seed=3)
    build_causal_lm(full / "models" / "w0-1", seed=4)
    write_manifest(full, {"method": "modpo", "objective_names": ["a", "b"], "models": models})
    single = root / "single"
    build_causal_lm(single / "model", seed=5)
    write_manifest(single, {"method": "sft", "model": "model", "objective_names": ["a", "b"]})
    return {"root": root, "base": base, "lora": lora, "full": full, "single": single}


def test_vllm_export_serves_every_adapter_from_one_base(runs, capsys):
    out = runs["root"] / "vllm-lora"
    assert main(["export", str(runs["lora"]), str(out), "--for", "vllm", "--port", "8123"]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads((out / EXPORT_MANIFEST).read_text())
    command = shlex.split(summary["serve"])
    assert command[:3] == ["vllm", "serve", str(out / "base")]
    assert command[command.index("--lora-modules") + 1 :] == [
        f"w1-0={out / 'adapters' / 'w1-0'}",
        f"w0-1={out / 'adapters' / 'w0-1'}",
    ]
    assert command[command.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in command
    assert summary["route"] == shlex.join(
        ["moalign", "serve", str(runs["lora"]), "--upstream", "http://127.0.0.1:8123/v1"]
    )
    assert f"  {summary['serve']}" in printed and f"  {summary['route']}" in printed
    for name in ("w1-0", "w0-1"):
        adapter = out / "adapters" / name
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (out / "base" / "config.json").exists() and (out / "base" / "tokenizer.json").exists()


def test_transformers_export_merges_adapters_into_full_models(runs):
    from transformers import AutoModelForCausalLM

    from moalign.models import load_pretrained

    out = runs["root"] / "transformers-lora"
    assert main(["export", str(runs["lora"]), str(out), "--for", "transformers"]) == 0
    summary = json.loads((out / EXPORT_MANIFEST).read_text())
    assert summary["models"] == {"w1-0": "w1-0", "w0-1": "w0-1"}
    assert summary["serve"] == f"(cd {out} && transformers serve --port 8001)"
    ids = torch.tensor([[5, 9, 17, 3]])
    base_logits = AutoModelForCausalLM.from_pretrained(runs["base"])(ids).logits
    for name in ("w1-0", "w0-1"):
        assert not (out / name / "adapter_config.json").exists() and (out / name / "tokenizer.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(out / name)(ids).logits
        adapted = load_pretrained(str(runs["lora"] / "models" / name), device="cpu")(ids).logits
        assert torch.allclose(merged, adapted, atol=1e-5)  # the adapter's model, as one full model
        assert not torch.allclose(merged, base_logits, atol=1e-3)  # and not the base


def test_a_one_model_run_is_served_under_its_name(runs):
    out = runs["root"] / "vllm-single"
    assert main(["export", str(runs["single"]), str(out), "--for", "vllm"]) == 0
    summary = json.loads((out / EXPORT_MANIFEST).read_text())
    command = shlex.split(summary["serve"])
    assert command[2] == str(out / "single") and command[command.index("--served-model-name") + 1] == "single"
    assert (out / "single" / "model.safetensors").exists()


def test_bad_exports_are_one_line_and_write_nothing(runs, capsys):
    full_out = runs["root"] / "vllm-full"
    assert main(["export", str(runs["full"]), str(full_out), "--for", "vllm"]) == 2
    error = capsys.readouterr().err.strip()
    assert "2 full models and vLLM serves one full model per process" in error and "save_adapters: true" in error
    assert len(error.splitlines()) == 1 and not full_out.exists()

    taken = runs["root"] / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(runs["single"]), str(taken), "--for", "transformers"]) == 2
    assert "exists; choose a new output folder" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    assert main(["export", str(runs["root"] / "nope"), str(runs["root"] / "x"), "--for", "vllm"]) == 2
    assert "does not exist" in capsys.readouterr().err
