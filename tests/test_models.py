"""The one model loader: its options reach the model, adapters load onto their base, missing packages say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moalign.cli import main
from moalign.errors import MoalignError
from moalign.generation import load_model
from moalign.methods.common import load_causal_lm
from moalign.methods.sft import SFTRunConfig
from moalign.models import ModelOptions, adapter_base, installed, load_pretrained, pick_device


def sft_config(tmp_path: Path, **options) -> SFTRunConfig:
    return SFTRunConfig(output_dir=str(tmp_path / "run"), report_to="none", **options)


def test_defaults_are_float32_sdpa_on_cpu(tiny_lm: Path):
    model = load_pretrained(str(tiny_lm))
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"


def test_dtype_and_attention_reach_the_model(tiny_lm: Path):
    model = load_pretrained(str(tiny_lm), ModelOptions(dtype="bfloat16", attn_implementation="eager"))
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"


def test_method_config_options_and_trl_model_init_kwargs_reach_the_model(tiny_lm: Path, tmp_path: Path):
    config = sft_config(tmp_path, dtype="float16", attn_implementation="eager")
    model = load_causal_lm(str(tiny_lm), config)
    assert model.dtype == torch.float16 and model.config._attn_implementation == "eager"
    # TRL's model_init_kwargs go to from_pretrained last: they win over moalign's own defaults
    config = sft_config(tmp_path, model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    model = load_causal_lm(str(tiny_lm), config)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_model_init_kwargs_as_json_text(tiny_lm: Path):
    class Flags:  # what a command line gives TRL: a JSON string
        model_init_kwargs = json.dumps({"dtype": "bfloat16"})

    assert load_pretrained(str(tiny_lm), ModelOptions.from_config(Flags())).dtype == torch.bfloat16


def lora_adapter(base: Path, folder: Path) -> torch.nn.Module:
    """A LoRA adapter with non-zero B (so it changes the logits), saved as PEFT saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def test_adapter_folder_loads_onto_its_base(tiny_lm: Path, tmp_path: Path):
    adapter = tmp_path / "adapter"
    peft_model = lora_adapter(tiny_lm, adapter)
    assert adapter_base(str(adapter)) == str(tiny_lm) and adapter_base(str(tiny_lm)) is None
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        base_logits = load_pretrained(str(tiny_lm))(input_ids=ids).logits
        model, tokenizer = load_model(str(adapter), device="cpu")  # merged for inference
        assert not any("lora" in name for name, _ in model.named_parameters())
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter did change the model
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    # training continues the adapter itself, on the base in the requested dtype
    trainable = load_pretrained(str(adapter), ModelOptions(dtype="bfloat16"), trainable=True)
    names = {name for name, p in trainable.named_parameters() if p.requires_grad}
    assert names and all("lora_" in name for name in names)
    assert trainable.get_base_model().dtype == torch.bfloat16


@pytest.mark.parametrize(
    "options, package",
    [
        ({"load_in_4bit": True}, "bitsandbytes"),
        ({"load_in_8bit": True}, "bitsandbytes"),
        ({"attn_implementation": "flash_attention_2"}, "flash_attn"),
        ({"attn_implementation": "kernels-community/flash-attn"}, "kernels"),
    ],
)
def test_missing_optional_package_is_one_line_naming_it(tiny_lm: Path, options, package):
    if installed(package):
        pytest.skip(f"{package} is installed here")
    with pytest.raises(MoalignError) as error:
        load_pretrained(str(tiny_lm), ModelOptions(**options))
    message = str(error.value)
    assert "\n" not in message and f"the {package} package" in message


def test_bad_dtype_is_named():
    with pytest.raises(MoalignError, match="dtype must be auto, bfloat16, float16 or float32, got 'int8'"):
        ModelOptions(dtype="int8").validate()


def test_cli_reports_a_missing_package_before_any_work(tiny_lm: Path, tmp_path: Path, capsys):
    if installed("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "chosen": " sat", "rejected": " no"}) + "\n")
    out = tmp_path / "run"
    argv = ["sft", "--model_name_or_path", str(tiny_lm), "--dataset", str(data), "--output_dir", str(out)]
    assert main([*argv, "--load_in_4bit", "true"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["moalign sft: error: load_in_4bit needs the bitsandbytes package: pip install bitsandbytes"]
    assert not out.exists()


def test_auto_device_is_this_ranks_gpu_under_a_launcher(monkeypatch):
    """Every rank of an 8-GPU launch loading its reward model on cuda:0 would fill one GPU: "auto" follows
    LOCAL_RANK. (The CUDA check is the one thing faked: the choice is what is tested, on a CPU machine.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("auto") == "cuda:3"
    assert pick_device("cpu") == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == "cpu"
