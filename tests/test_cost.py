"""FLOPs accounting: model sizes from configs alone, and `moalign cost` against the FLOPs a real run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moalign.cli import main
from moalign.cost import LoraShape, estimate, model_size, size_from_config
from moalign.cost.estimators import selected_lengths
from moalign.run import read_manifest
from moalign.testing import CORPUS, build_causal_lm


def test_model_size_counts_linear_layers_and_lora_like_peft(tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    d, vocab = 32, model.config.vocab_size
    # per block: attention c_attn (d×3d) and c_proj (d×d), MLP c_fc (d×4d) and c_proj (4d×d); plus the LM head
    expected = 2 * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + vocab * d
    assert model_size(model).matmul == model_size(model).trained == expected
    assert size_from_config(str(path)).matmul == expected  # from config.json alone, on the meta device

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    measured = model_size(peft_model)
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert measured.trained == peft_trainable == 2 * 4 * (4 * d + 2 * d + 5 * d + 5 * d)
    assert size_from_config(str(path), LoraShape(4, "all-linear")) == measured
    peft_model.save_pretrained(tmp_path / "adapter")  # an adapter folder is sized by its base (PEFT's config)
    assert size_from_config(str(tmp_path / "adapter")).matmul == expected
    # LoRA counted honestly: the frozen base still costs 4·N per trained token
    assert measured.train_per_token() == 4 * measured.matmul + 2 * measured.trained
    assert measured.train_per_token() > 0.6 * model_size(model).train_per_token()


def test_papers_models_from_shipped_configs():
    llama = size_from_config("meta-llama/Llama-2-7b-hf")
    # 32 layers × (4·4096² attention + 3·4096·11008 MLP) + the 32000×4096 LM head (the embedding is a lookup)
    assert llama.matmul == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096 == 6_607_077_376
    lora = size_from_config("meta-llama/Llama-2-7b-hf", LoraShape(64, ("q_proj", "k_proj", "v_proj", "o_proj")))
    assert lora.trained == 32 * 4 * 64 * (4096 + 4096)
    rm = size_from_config("Ray2333/gpt2-large-harmless-reward_model")
    assert rm.matmul == 36 * 12 * 1280**2 + 1280  # GPT-2 large blocks and a one-label score head


def write_data(path: Path, pairs: bool) -> Path:
    rows = []
    for i, text in enumerate(CORPUS[:10]):
        words = text.split()
        prompt, response = " ".join(words[:3]), " ".join(words[3:])
        if pairs:
            rows.append({"prompt": prompt, "chosen": response, "rejected": " ".join(reversed(words[3:])) + " no"})
        else:
            rows.append({"prompt": prompt, "response": response + (" yes" * (i % 3))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, name: str, **values) -> Path:
    path = tmp_path / f"{name}.yaml"
    common = {
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 100,
        "dataloader_num_workers": 0,
        "max_length": 64,
        "output_dir": str(tmp_path / name),
    }
    path.write_text(yaml.safe_dump({k: v for k, v in {**common, **values}.items() if v is not None}))
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_cost_estimate_agrees_with_a_real_sft_run(tmp_path: Path, lora: bool):
    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    extra = {"use_peft": True, "lora_r": 4} if lora else {}
    config = recipe(
        tmp_path,
        "sft",
        model_name_or_path=str(model),
        dataset=str(write_data(tmp_path / "d.jsonl", False)),
        max_steps=5,
        **extra,
    )
    assert main(["sft", "--config", str(config)]) == 0
    training = read_manifest(tmp_path / "sft")["training"]
    measured = training["stages"]["sft"]["flops"]
    assert training["flops"] == measured > 0
    predicted, shape, _ = estimate(str(config))
    assert shape.source == "measured" and predicted.method == "sft"
    assert predicted.flops == pytest.approx(measured, rel=0.10)


def test_evaluation_generation_is_counted(tmp_path: Path):
    """`moalign eval`'s generation: 2·N per prompt token and per generated token, with the model's tokenizer."""
    from transformers import AutoTokenizer

    from moalign.evaluate import evaluate_policy
    from moalign.generation import SamplingParams
    from moalign.objectives import build_all
    from moalign.policy import load_policy

    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    config = recipe(
        tmp_path,
        "sft",
        model_name_or_path=str(model),
        dataset=str(write_data(tmp_path / "d.jsonl", False)),
        objectives=["length", "brevity"],
        max_steps=1,
    )
    assert main(["sft", "--config", str(config)]) == 0
    prompts = [" ".join(text.split()[:3]) for text in CORPUS[:4]]
    policy = load_policy(tmp_path / "sft", device="cpu")
    result = evaluate_policy(
        policy, prompts, build_all(["length", "brevity"]), [[0.5, 0.5], [1.0, 0.0]], SamplingParams(max_new_tokens=5)
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    prefill = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    # one generation (an SFT model serves every preference alike): its answers, re-tokenised, and its prompts
    assert result["generated"] > 0
    assert result["flops"] == 2 * size_from_config(str(model)).matmul * (prefill + result["generated"])


def test_cost_estimate_agrees_with_a_real_modpo_run(tmp_path: Path):
    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    config = recipe(
        tmp_path,
        "modpo",
        model_name_or_path=str(model),
        dataset=str(write_data(tmp_path / "pairs.jsonl", True)),
        objectives=["length", "brevity"],
        preferences=["0.5,0.5", "0.8,0.2"],
        beta=0.1,
        loss_type=["sigmoid"],
        max_steps=3,
    )
    assert main(["modpo", "--config", str(config)]) == 0
    training = read_manifest(tmp_path / "modpo")["training"]
    assert training["stages"]["margins"]["flops"] == 0.0  # lexical margins cost nothing here
    stages = [s for name, s in training["stages"].items() if name != "margins"]
    assert len(stages) == 2 and all(s["forward_tokens"] == s["tokens"] for s in stages)  # a reference pass each
    predicted, _, _ = estimate(str(config))
    assert [s.name for s in predicted.stages][-2:] == ["preference 1", "preference 2"]
    trained = sum(s.flops for s in predicted.stages if s.name.startswith("preference"))
    assert trained == pytest.approx(training["flops"], rel=0.10)


def test_modpo_margin_pass_of_a_dpo_margin_model_is_counted(tmp_path: Path):
    """The paper's recipe: `moalign dpo`, then MODPO with its implicit reward as margin. The margin pass (the DPO
    model and its reference reading every chosen and rejected sequence) is the `margins` stage's FLOPs, and
    `moalign cost` of the MODPO YAML estimates it within 10%."""
    from transformers import AutoTokenizer

    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    data = write_data(tmp_path / "pairs.jsonl", True)
    common = {"model_name_or_path": str(model), "dataset": str(data), "objectives": ["length", "brevity"], "beta": 0.1}
    dpo = recipe(tmp_path, "dpo", **common, objective_index=1, loss_type=["sigmoid"], max_steps=2)
    assert main(["dpo", "--config", str(dpo)]) == 0
    modpo = recipe(
        tmp_path,
        "modpo",
        **common,
        margin_objectives=[f"dpo:{tmp_path / 'dpo'}"],
        preferences=["0.5,0.5"],
        loss_type=["sigmoid"],
        max_steps=2,
    )
    assert main(["modpo", "--config", str(modpo)]) == 0
    margins = read_manifest(tmp_path / "modpo")["training"]["stages"]["margins"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    texts = [r["prompt"] + " " + r[side] + tokenizer.eos_token for r in rows for side in ("chosen", "rejected")]
    tokens = sum(min(64, len(ids)) for ids in tokenizer(texts)["input_ids"])
    assert margins["flops"] == 2 * 2 * size_from_config(str(model)).matmul * tokens  # two models, 2·N per token
    predicted = {s.name: s.flops for s in estimate(str(modpo))[0].stages}
    assert predicted["margins"] == pytest.approx(margins["flops"], rel=0.10)


def test_paretohqd_scoring_by_a_reward_model_is_counted(tmp_path: Path):
    """ParetoHqD's scoring stage: a reward model reads every sample once at 2·N_rm per token; `moalign cost`
    of the same YAML agrees with the run's total within 10%."""
    from transformers import AutoTokenizer

    from moalign.testing import build_classifier

    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    scorer = build_classifier(tmp_path / "rm", n_embd=16, n_layer=1)
    data = write_data(tmp_path / "d.jsonl", False)
    config = recipe(
        tmp_path,
        "paretohqd",
        model_name_or_path=str(model),
        dataset=str(data),
        objectives=[f"hf:{scorer}", "brevity"],
        preferences=["1,0", "0,1"],
        stages=1,
        k=4,
        stage1_max_steps=2,
        selection_plots=False,
    )
    assert main(["paretohqd", "--config", str(config)]) == 0
    training = read_manifest(tmp_path / "paretohqd")["training"]
    tokenizer = AutoTokenizer.from_pretrained(scorer)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    read = sum(len(tokenizer(r["prompt"] + r["response"])["input_ids"]) for r in rows)
    assert training["stages"]["scoring"]["flops"] == 2 * (12 * 16**2 + 16) * read  # one block and a score head
    predicted, _, _ = estimate(str(config))
    assert predicted.flops == pytest.approx(training["flops"], rel=0.10)


def test_cost_command_on_a_papers_recipe(tmp_path: Path, capsys):
    out = tmp_path / "ric.json"
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["cost", str(configs / "ric_hh_rlhf.yaml"), "--gpu", "H100", "--json_output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "meta-llama/Llama-2-7b-hf" in printed and "assumed" in printed and "H100" in printed
    result = json.loads(out.read_text())
    stages = {s["name"]: s["flops"] for s in result["stages"]}
    assert {"offline", "generate_1", "online_2"} <= set(stages)
    assert result["gpu_hours"] == pytest.approx(result["flops"] / (0.4 * 989e12) / 3600)


def test_cost_command_errors_are_one_line(tmp_path: Path, capsys):
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["cost", str(configs / "ric_hh_rlhf.yaml"), "--gpu", "TPU9"]) == 2
    assert capsys.readouterr().err.strip() == "moalign cost: error: gpu 'TPU9' is not known; use one of " + ", ".join(
        __import__("moalign.cost", fromlist=["PEAK_TFLOPS"]).PEAK_TFLOPS
    )
    unknown = recipe(tmp_path, "x", model_name_or_path="meta-llama/Llama-2-7b-hf", dataset="someone/unknown-set")
    assert main(["cost", str(unknown)]) == 2
    assert "pass --rows, --prompt_tokens and --response_tokens" in capsys.readouterr().err
    missing = recipe(tmp_path, "y", model_name_or_path="nobody/no-such-model", dataset="Anthropic/hh-rlhf")
    assert main(["cost", str(missing)]) == 2
    assert "no config for model 'nobody/no-such-model'" in capsys.readouterr().err


def test_a_ppo_stage_counts_rollouts_reference_generation_and_scoring(tmp_path: Path):
    """PPO's FLOPs: ppo_epochs trained passes, two forward passes, the generation of every rollout and the
    reward model's reading of it (2·N_rm per token), the normalisation's scoring as a stage; and `moalign cost`
    of the same YAML within 10% of them."""
    from transformers import AutoTokenizer

    from moalign.cost import ModelSize
    from moalign.testing import build_classifier

    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    scorer = build_classifier(tmp_path / "rm", n_embd=16, n_layer=1)
    data = write_data(tmp_path / "d.jsonl", False)
    config = recipe(
        tmp_path,
        "morl",
        model_name_or_path=str(model),
        dataset=str(data),
        objectives=[f"hf:{scorer}", "brevity"],
        algorithm="ppo",
        preferences=["0.5,0.5"],
        max_steps=2,
        ppo_epochs=3,
        max_completion_length=6,
        temperature=1.0,
        max_length=None,  # not a field of TRL's GRPOConfig, which MORL's config extends
    )
    assert main(["morl", "--config", str(config)]) == 0
    training = read_manifest(tmp_path / "morl")["training"]
    stage = training["stages"]["w0.5-0.5"]
    assert stage["trained_tokens"] == 3 * stage["tokens"] and stage["forward_tokens"] == 2 * stage["tokens"]
    assert stage["prefill_tokens"] + stage["generated_tokens"] == stage["tokens"]
    # the reward model by hand: one block of 12·d² and a one-label score head; it reads prompt + response
    rm_tokenizer, rm_params = AutoTokenizer.from_pretrained(scorer), 12 * 16**2 + 16
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    read = sum(len(rm_tokenizer(r["prompt"] + r["response"])["input_ids"]) for r in rows)
    assert training["stages"]["normalisation"]["flops"] == 2 * rm_params * read
    # each rollout read once: its decoded text re-tokenized is no shorter than the sampled tokens (1.26× here)
    assert 1.0 <= stage["scoring_flops"] / (2 * rm_params * stage["tokens"]) < 2.0
    size = ModelSize(**stage["parameters"])
    expected = size.train_per_token() * stage["trained_tokens"] + size.forward_per_token * 3 * stage["tokens"]
    assert stage["flops"] == pytest.approx(expected + stage["scoring_flops"])
    # `moalign cost` assumes every rollout runs to max_completion_length (the most it can cost): this random
    # tiny policy never samples EOS in 6 tokens, so the count and the estimate agree
    assert stage["generated_tokens"] == 2 * 4 * 6
    predicted, _, _ = estimate(str(config))
    assert predicted.flops == pytest.approx(training["flops"], rel=0.10)


def test_a_generation_stage_counts_prefill_and_generated_tokens(tmp_path: Path):
    from types import SimpleNamespace

    from moalign.generation import SamplingParams
    from moalign.methods.common import generate_stage, model_completer

    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    config = SimpleNamespace(generation_backend="local", generation_base_url=None, generation_batch_size=4)
    prompts = [" ".join(text.split()[:3]) for text in CORPUS[:6]]
    params = [SamplingParams(max_new_tokens=5, seed=i) for i in range(len(prompts))]
    completions, stats = generate_stage(
        tmp_path / "chunks", prompts, params, model_completer(model, config), key="t", model_path=model
    )
    assert stats["prefill_tokens"] == sum(c.prompt_tokens for c in completions) > 0
    assert stats["generated_tokens"] == sum(len(c.token_ids) for c in completions) > 0
    n = size_from_config(str(model)).matmul
    assert stats["flops"] == 2 * n * (stats["prefill_tokens"] + stats["generated_tokens"])


# GRPO runs one epoch: 2 prompts × 2 generations × num_iterations 2 over batches of 4 is 2 steps, as for RLOO
@pytest.mark.parametrize(
    "algorithm, iterations, length", [("rloo", 1, {"max_steps": 2}), ("grpo", 2, {"num_train_epochs": 1})]
)
def test_an_rloo_or_grpo_stage_counts_generation_reference_and_training(tmp_path: Path, algorithm, iterations, length):
    """TRL's trainers: every generated batch is trained num_iterations times, read by the reference (beta ≠ 0)
    and by the old policy (RLOO always, GRPO here because num_iterations > 1); `moalign cost` agrees, its steps
    from max_steps or from the epochs over the unique prompts."""
    from moalign.cost import ModelSize

    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    # two prompts of one token length (5): which of them TRL samples then leaves the count as it is
    rows = [{"prompt": ("the cat sat", "a good day")[i % 2], "response": text} for i, text in enumerate(CORPUS[:8])]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = recipe(
        tmp_path,
        "morl",
        model_name_or_path=str(model),
        dataset=str(tmp_path / "d.jsonl"),
        objectives=["length", "brevity"],
        algorithm=algorithm,
        preferences=["0.5,0.5"],
        **length,
        num_generations=2,
        num_iterations=iterations,
        max_completion_length=6,
        temperature=1.0,
        beta=0.05,
        max_length=None,
    )
    assert main(["morl", "--config", str(config)]) == 0
    stage = read_manifest(tmp_path / "morl")["training"]["stages"]["w0.5-0.5"]
    # 2 steps × 4 completions, generated once every num_iterations steps; the random tiny policy never stops early
    assert stage["generated_tokens"] == 2 * 4 // iterations * 6
    assert stage["prefill_tokens"] == 2 * 4 // iterations * 5
    assert stage["prefill_tokens"] + stage["generated_tokens"] == stage["tokens"]
    assert stage["trained_tokens"] == iterations * stage["tokens"] and stage["forward_tokens"] == 2 * stage["tokens"]
    size = ModelSize(**stage["parameters"])
    expected = size.train_per_token() * stage["trained_tokens"] + size.forward_per_token * 3 * stage["tokens"]
    assert stage["flops"] == pytest.approx(expected)
    predicted, _, _ = estimate(str(config))
    assert predicted.flops == pytest.approx(stage["flops"], rel=0.10)


def eos_every_fifth_token(model, tokenizer) -> None:
    """A policy whose next-token distribution is the same at every position, with EOS at probability 0.2: it
    answers in ~5 tokens whatever the cap (the final layer norm's output is its bias alone)."""
    import math

    import torch

    width = model.config.n_embd
    direction = torch.nn.functional.normalize(torch.randn(width), dim=0)
    model.transformer.ln_f.weight.zero_()
    model.transformer.ln_f.bias.copy_(direction)
    embeddings = model.get_output_embeddings().weight  # tied to the input embeddings
    embeddings.zero_()
    embeddings[tokenizer.eos_token_id] = math.log(0.25 * (len(tokenizer) - 1)) * direction  # odds 1:4


def test_a_pilot_estimates_rollouts_of_a_policy_that_stops_early(tmp_path: Path):
    """`moalign cost --pilot_prompts N` samples the initial policy for the length its rollouts will have: a PPO
    run whose policy stops after ~5 of its 32 allowed tokens is estimated within 10%, where the cap (the
    default, an upper bound) is more than twice the count."""
    model = build_causal_lm(tmp_path / "lm", customize=eos_every_fifth_token)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"question {i}:", "response": "an answer"}) + "\n" for i in range(256))
    )
    config = recipe(
        tmp_path,
        "morl",
        model_name_or_path=str(model),
        dataset=str(data),
        objectives=["length", "brevity"],
        normalization="none",
        algorithm="ppo",
        preferences=["0.5,0.5"],
        max_steps=4,
        per_device_train_batch_size=64,
        ppo_epochs=1,
        max_completion_length=32,
        temperature=1.0,
        learning_rate=1e-6,
        max_length=None,
    )
    assert main(["morl", "--config", str(config)]) == 0
    counted = read_manifest(tmp_path / "morl")["training"]["flops"]
    stage = read_manifest(tmp_path / "morl")["training"]["stages"]["w0.5-0.5"]
    assert 3 < stage["generated_tokens"] / 256 < 8  # the policy stopped early, as built
    at_cap, _, _ = estimate(str(config))
    piloted, _, _ = estimate(str(config), pilot_prompts=256)
    assert at_cap.flops > 2 * counted
    assert piloted.flops == pytest.approx(counted, rel=0.10)
    assert "the initial policy's mean over 256 prompts" in piloted.notes[-1]


def test_paretohqd_estimate_trains_on_the_samples_selection_picks(tmp_path: Path):
    """Stage 1 trains on the k samples nearest each preference's ray: with brevity in the objectives they are the
    short ones. The estimate selects as the run does (lexical objectives: scored in the estimate), so it matches
    the count where the data's mean length would be far off."""
    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    words = ["yes", "the", "answer", "is", "yes", "and", "no"]
    rows = [
        {"prompt": f"q{i}:", "response": " ".join(words[j % len(words)] for j in range(1 + (i * 7) % 40))}
        for i in range(60)
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = recipe(
        tmp_path,
        "paretohqd",
        model_name_or_path=str(model),
        dataset=str(data),
        objectives=["brevity", "length"],
        preferences=["0.9,0.1", "0.8,0.2"],
        stages=1,
        k=8,
        stage1_max_steps=4,
        selection_plots=False,
        max_length=128,
    )
    predicted, shape, parsed = estimate(str(config))  # before the run: scores.parquet does not exist yet
    assert main(["paretohqd", "--config", str(config)]) == 0
    counted = read_manifest(tmp_path / "paretohqd")["training"]["flops"]
    assert predicted.flops == pytest.approx(counted, rel=0.02)
    # what makes the difference: the selected samples are much shorter than the data's mean
    mean = shape.prompt_tokens + shape.response_tokens + 1
    assert all(length < 0.6 * mean for length in selected_lengths(parsed, shape, []))


def test_sft_on_pairs_is_estimated_on_the_chosen_responses(tmp_path: Path):
    """SFT on a pair file trains on each pair's chosen response; with rejected responses five times longer, the
    mean over both would overestimate by half, while the estimate on the chosen ones matches the run."""
    model = build_causal_lm(tmp_path / "lm", n_embd=32, n_layer=2)
    rows = []
    for i, text in enumerate(CORPUS[:10]):
        words = text.split()
        answer = " ".join(words[3:])
        rows.append({"prompt": " ".join(words[:3]) + f" {i}", "chosen": answer, "rejected": " ".join([answer] * 5)})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = recipe(  # two whole epochs: every pair trained twice
        tmp_path, "sft", model_name_or_path=str(model), dataset=str(data), max_steps=4, per_device_train_batch_size=5
    )
    assert main(["sft", "--config", str(config)]) == 0
    counted = read_manifest(tmp_path / "sft")["training"]["flops"]
    predicted, shape, _ = estimate(str(config))
    assert shape.pairs and shape.response_tokens > 1.5 * shape.chosen_tokens
    assert predicted.flops == pytest.approx(counted, rel=0.10)
