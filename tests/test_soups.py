"""Rewarded Soups: the soup for e_i is model i, for (0.5, 0.5) the average; LoRA soups are exact; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moalign.errors import MoalignError
from moalign.generation import SamplingParams
from moalign.methods.soups import SoupPolicy, SoupsConfig, parse_soups_config, soup_state_dict, train
from moalign.policy import load_policy
from moalign.testing import build_causal_lm

OBJECTIVES = ["vader", "brevity"]
PROMPT = "\n\nHuman: what should I do?\n\nAssistant:"


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture
def ingredients(tmp_path: Path) -> list[Path]:
    return [build_causal_lm(tmp_path / "a", seed=1), build_causal_lm(tmp_path / "b", seed=2)]


def soups_run(tmp_path: Path, paths: list[Path], **fields) -> Path:
    config = SoupsConfig(
        output_dir=str(tmp_path / "soups"), objectives=OBJECTIVES, ingredients=[str(p) for p in paths], **fields
    )
    return train(config)


def test_soup_of_a_one_hot_preference_is_that_model_and_half_half_the_average(tmp_path, ingredients):
    run_dir = soups_run(tmp_path, ingredients)
    manifest = json.loads((run_dir / "moalign.json").read_text())
    assert manifest["method"] == "soups"
    assert [i["objective"] for i in manifest["ingredients"]] == OBJECTIVES
    policy = load_policy(run_dir, device="cpu")
    assert isinstance(policy, SoupPolicy) and not policy.lora
    a, b = (load_state(p) for p in ingredients)
    for weights, expected in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        soup = policy.model_for(weights).state_dict()
        assert all(torch.equal(soup[name], expected[name]) for name in expected)
    half = policy.model_for([0.5, 0.5]).state_dict()
    for name in a:
        torch.testing.assert_close(half[name], (a[name] + b[name]) / 2)
    assert any(not torch.equal(a[name], b[name]) for name in a)  # the two models really differ
    torch.testing.assert_close(soup_state_dict([a, b], [0.5, 0.5])["lm_head.weight"], half["lm_head.weight"])


def test_soup_policy_generates_and_caches_by_rounded_preference(tmp_path, ingredients):
    run_dir = soups_run(tmp_path, ingredients, sample_max_new_tokens=4)
    policy = load_policy(run_dir, device="cpu", max_loaded=2)
    texts = policy.generate([PROMPT, PROMPT], [0.3, 0.7], SamplingParams(max_new_tokens=4, seed=3))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert policy.served_by(np.array([0.30001, 0.69999])) == "soup(0.3,0.7)"
    policy.generate([PROMPT], [0.30001, 0.69999])  # rounds to the cached soup
    assert list(policy.soups) == [(0.3, 0.7)]
    policy.generate([PROMPT], [1.0, 0.0])
    policy.generate([PROMPT], [0.0, 1.0])
    assert list(policy.soups) == [(1.0, 0.0), (0.0, 1.0)]  # least recently used dropped
    with pytest.raises(MoalignError, match="expected 2"):
        policy.generate([PROMPT], [0.2, 0.3, 0.5])


def test_lora_soup_is_the_exact_weighted_sum_of_merged_adapters(tmp_path, tiny_lm):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = []
    for seed, rank in ((1, 4), (2, 2)):  # different ranks: "cat" stacks them
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm), config)
        model.save_pretrained(tmp_path / f"adapter{seed}")
        adapters.append(tmp_path / f"adapter{seed}")
    merged = [
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), str(p)).merge_and_unload().state_dict()
        for p in adapters
    ]
    run_dir = soups_run(tmp_path, adapters)
    policy = load_policy(run_dir, device="cpu")
    assert policy.lora
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    ids = torch.tensor([[5, 9, 13, 2, 40, 7]])
    for weights in ([1.0, 0.0], [0.3, 0.7]):
        reference.load_state_dict(soup_state_dict(merged, weights))
        with torch.no_grad():
            expected = reference(ids).logits
            got = policy.model_for(weights)(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert policy.generate([PROMPT], [0.5, 0.5], SamplingParams(max_new_tokens=3))


def test_ingredients_from_a_morl_run_use_its_one_hot_models(tmp_path, ingredients):
    from moalign.run import write_manifest

    morl_dir = tmp_path / "morl"
    models = [{"preference": [0.5, 0.5], "path": str(ingredients[0])}]
    models += [{"preference": [0.0, 1.0], "path": str(ingredients[1])}]
    models += [{"preference": [1.0, 0.0], "path": str(ingredients[0])}]
    write_manifest(morl_dir, {"method": "morlhf", "objective_names": OBJECTIVES[::-1], "models": models})
    run_dir = soups_run(tmp_path, [morl_dir, morl_dir])
    paths = [i["path"] for i in json.loads((run_dir / "moalign.json").read_text())["ingredients"]]
    # that run lists its objectives the other way round: vader is its second objective
    assert paths == [str(ingredients[1]), str(ingredients[0])]
    write_manifest(morl_dir, {"method": "morlhf", "objective_names": OBJECTIVES, "models": models[:1]})
    with pytest.raises(MoalignError, match="one-hot"):
        soups_run(tmp_path, [morl_dir, morl_dir])


def test_bad_soups_input_is_one_line(tmp_path, ingredients):
    with pytest.raises(MoalignError, match="2 objectives"):
        soups_run(tmp_path, ingredients[:1])
    small = build_causal_lm(tmp_path / "small", n_embd=16)
    with pytest.raises(MoalignError, match="different architectures"):
        soups_run(tmp_path, [ingredients[0], small])
    with pytest.raises(MoalignError, match="not a model folder"):
        soups_run(tmp_path, [ingredients[0], tmp_path / "nowhere"])
    config = tmp_path / "soups.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'cli'}\nobjectives: [vader, brevity]\ningredients: [{ingredients[0]}]\n"
    )
    with pytest.raises(MoalignError, match="1 ingredients for 2 objectives"):
        train(parse_soups_config(["--config", str(config)]))
