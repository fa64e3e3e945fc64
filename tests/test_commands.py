"""`moalign generate` and `moalign sft` as a user runs them: real runs, real models, the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_ric import ric_args, write_pairs

from moalign.cli import main
from moalign.generation import SamplingParams
from moalign.policy import FixedPolicy, load_policy
from moalign.testing import build_causal_lm

PROMPTS = ["\n\nHuman: what should I do?\n\nAssistant:", "\n\nHuman: any travel tips?\n\nAssistant:"]


# ----------------------------------------------------------------------------- moalign generate


@pytest.fixture(scope="module")
def ric_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RiC run trained for two steps: its policy writes the preference into the prompt. (That the printed
    answers follow --weights needs a model that learned to steer: tests/test_ric.py checks it on one.)"""
    root = tmp_path_factory.mktemp("generate")
    run, dataset, cache = root / "ric", write_pairs(root / "pairs.jsonl"), root / "scores.sqlite"
    assert main(ric_args(build_causal_lm(root / "lm"), dataset, run, cache, max_steps="2", online_iterations="0")) == 0
    return run


def test_generate_answers_for_the_weights_and_seed(ric_run, capsys):
    def generate(*flags: str) -> str:
        capsys.readouterr()
        assert main(["generate", str(ric_run), *PROMPTS, "--max_new_tokens", "8", *flags]) == 0
        return capsys.readouterr().out

    printed = generate("--weights", "1,0", "--seed", "3")
    # The printed answers are the policy's for that preference and seed, each under its prompt.
    policy = load_policy(ric_run)
    params = SamplingParams(**{**vars(policy.sampling), "max_new_tokens": 8, "seed": 3})
    answers = policy.generate(PROMPTS, [1.0, 0.0], params)
    assert printed == "".join(f"{prompt}\n{answer}\n\n" for prompt, answer in zip(PROMPTS, answers))
    assert any(answers)
    assert generate("--weights", "1,0", "--seed", "3") == printed  # same seed, same text
    assert generate("--weights", "1,0", "--seed", "4") != printed
    # Greedy decoding ignores the seed.
    assert generate("--weights", "1,0", "--temperature", "0", "--seed", "3") == generate(
        "--weights", "1,0", "--temperature", "0", "--seed", "4"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--weights", "0.5"], "expected 2"), (["--weights", "0.2,0.3"], "sum to 1"), (["--seed", "x"], "seed")],
)
def test_generate_bad_input_is_one_line(ric_run, capsys, flags, message):
    capsys.readouterr()
    assert main(["generate", str(ric_run), PROMPTS[0], *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moalign generate: error:") and message in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- moalign sft


def mean_logprob(model_dir: Path, prompts: list[str], texts: list[str]) -> tuple[float, float]:
    """Mean log-probability per token of the prompts' own tokens and of the texts after them, under the model
    saved in `model_dir` (read by transformers, teacher-forced)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_total = prompt_count = text_total = text_count = 0.0
    for prompt, text in zip(prompts, texts):
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            scores = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        prompt_total += float(scores[: len(head) - 1].sum())
        prompt_count += len(head) - 1
        text_total += float(scores[len(head) - 1 :].sum())
        text_count += len(tail)
    return prompt_total / prompt_count, text_total / text_count


def test_sft_trains_on_the_chosen_completions_only(tiny_lm, tmp_path):
    dataset = write_pairs(tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    prompts, chosen, rejected = ([row[key] for row in rows] for key in ("prompt", "chosen", "rejected"))
    run = tmp_path / "sft"
    argv = ["sft", "--model_name_or_path", str(tiny_lm), "--dataset", str(dataset), "--output_dir", str(run)]
    argv += ["--max_steps", "6", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3"]
    argv += ["--report_to", "none", "--save_strategy", "no", "--objectives", "length", "vader"]
    assert main(argv) == 0

    manifest = json.loads((run / "moalign.json").read_text())
    assert manifest["method"] == "sft" and manifest["model"] == "model"
    assert manifest["training"]["stages"]["sft"]["steps"] == 6 and manifest["training"]["tokens"] > 0
    assert isinstance(load_policy(run), FixedPolicy)  # the manifest names the policy that serves it

    prompt_before, chosen_before = mean_logprob(tiny_lm, prompts, chosen)
    prompt_after, chosen_after = mean_logprob(run / "model", prompts, chosen)
    learned = chosen_after - chosen_before  # nats per token; about 0.8 here
    rejected_gain = mean_logprob(run / "model", prompts, rejected)[1] - mean_logprob(tiny_lm, prompts, rejected)[1]
    # The chosen completions became likelier, and much more so than the rejected ones.
    assert learned > 0.5 and learned > rejected_gain + 0.3
    # Loss on the completion only: the prompts' own tokens were not learned the way the completions were.
    assert prompt_after - prompt_before < 0.25 * learned
