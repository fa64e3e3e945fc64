"""Rewarded Soups: the soup for e_i is model i, for (0.5, 0.5) the average; LoRA soups are exact; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moalign import cli
from moalign.errors import MoalignError
from moalign.generation import SamplingParams
from moalign.methods.soups import SoupPolicy, SoupsConfig, soup_state_dict, train
from moalign.policy import load_policy
from moalign.run import write_manifest
from moalign.testing import build_causal_lm

OBJECTIVES = ["vader", "brevity"]
PROMPT = "\n\nHuman: what should I do?\n\nAssistant:"


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture
def ingredients(tmp_path: Path) -> list[Path]:
    return [build_causal_lm(tmp_path / "a", seed=1), build_causal_lm(tmp_path / "b", seed=2)]


def reference_run(directory: Path, state: dict[str, torch.Tensor], like: Path) -> Path:
    """A plain one-model run whose weights are `state` (a soup averaged by hand), tokenizer from `like`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(like)
    model.load_state_dict(state)
    model.save_pretrained(directory / "model")
    AutoTokenizer.from_pretrained(like).save_pretrained(directory / "model")
    write_manifest(directory, {"method": "base", "model": "model", "objective_names": OBJECTIVES})
    return directory


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


def test_soup_state_dict_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([[4.0]], dtype=torch.bfloat16), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, -6.0]), "h": torch.tensor([[8.0]], dtype=torch.bfloat16), "n": torch.tensor([7])}
    soup = soup_state_dict([a, b], [0.25, 0.75])
    assert soup["w"].tolist() == [2.5, -4.0]  # 0.25·1 + 0.75·3, 0.25·2 − 0.75·6
    assert soup["h"].dtype == torch.bfloat16 and soup["h"].item() == 7.0
    assert soup["n"].tolist() == [3]  # integer buffers (counters, masks) are the first model's, not averaged
    with pytest.raises(MoalignError, match="different parameters"):
        soup_state_dict([a, {"w": b["w"], "h": b["h"]}], [0.5, 0.5])
    with pytest.raises(MoalignError, match=r"w has shape \(3,\)"):
        soup_state_dict([a, {**b, "w": torch.zeros(3)}], [0.5, 0.5])


def test_soup_policy_generates_and_caches_by_rounded_preference(tmp_path, ingredients):
    run_dir = soups_run(tmp_path, ingredients, sample_max_new_tokens=4)
    policy = load_policy(run_dir, device="cpu", max_loaded=2)
    params = SamplingParams(max_new_tokens=8, seed=3)
    texts = policy.generate([PROMPT, PROMPT], [0.3, 0.7], params)
    # The same sampling from a model averaged by hand gives the same texts: the policy samples the soup.
    a, b = (load_state(p) for p in ingredients)
    by_hand = reference_run(tmp_path / "by_hand", {k: 0.3 * a[k] + 0.7 * b[k] for k in a}, ingredients[0])
    assert texts == load_policy(by_hand, device="cpu").generate([PROMPT, PROMPT], None, params)
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
    # Greedy text of the half-half LoRA soup is that of the merged models averaged by hand.
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    by_hand = reference_run(tmp_path / "by_hand", soup_state_dict(merged, [0.5, 0.5]), tiny_lm)
    expected = load_policy(by_hand, device="cpu").generate([PROMPT], None, greedy)
    assert policy.generate([PROMPT], [0.5, 0.5], greedy) == expected and expected[0].strip()


def test_ingredients_from_a_morl_run_use_its_one_hot_models(tmp_path, ingredients):
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


def test_bad_soups_input_is_one_line(tmp_path, ingredients, capsys):
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
    assert cli.main(["soups", "--config", str(config)]) == 2
    assert "1 ingredients for 2 objectives" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
    assert cli.main(["soups", "--objectives", "vader", "brevity", "--ingredients", *map(str, ingredients)]) == 2
    assert capsys.readouterr().err.strip() == "moalign soups: error: output_dir is not set (YAML key or --output_dir)"


def test_soups_command_copies_ingredients_with_kebab_case_flags(tmp_path, ingredients, capsys):
    config = tmp_path / "soups.yaml"
    config.write_text(f"objectives: [vader, brevity]\ningredients: [{ingredients[0]}, {ingredients[1]}]\n")
    argv = ["soups", "--config", str(config), "--output-dir", str(tmp_path / "cli"), "--copy-ingredients", "true"]
    assert cli.main(argv) == 0
    manifest = json.loads((tmp_path / "cli" / "moalign.json").read_text())
    assert [i["path"] for i in manifest["ingredients"]] == ["ingredients/vader", "ingredients/brevity"]
    assert manifest["base_model"] == str(ingredients[0])
    copied = load_state(tmp_path / "cli" / "ingredients" / "brevity")
    assert all(torch.equal(copied[k], v) for k, v in load_state(ingredients[1]).items())
    assert not list((tmp_path / "cli" / "ingredients").glob(".*"))  # no temporary copy left behind
