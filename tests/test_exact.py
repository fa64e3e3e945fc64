"""The exact task: π*_w against brute force, the renormalised evaluation against sampling, MODPO → π*_w."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax

from moalign.errors import MoalignError
from moalign.exact.front import (
    beta_for_kl,
    expected_rewards,
    front_at_kl,
    hypervolume_ratio,
    kl,
    objective_gaps,
    optimal_logp,
    reference_point,
    scalarised_gap,
)
from moalign.exact.task import CandidateTask, load_candidate_task, task_from_scores


def toy(seed: int = 0, p: int = 3, k: int = 5, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return log_softmax(rng.normal(size=(p, k)) * 1.5, axis=-1), rng.normal(size=(p, k, n))


def brute_force(ref_logp: np.ndarray, rewards: np.ndarray, w: np.ndarray, beta: float) -> np.ndarray:
    """argmax_π E_π[wᵀr] − β·KL(π‖π_ref) per prompt, by a generic optimiser over softmax logits."""
    rows = []
    for ref, r in zip(ref_logp, rewards @ w):

        def negative(theta: np.ndarray, ref=ref, r=r) -> float:
            logp = log_softmax(theta)
            p = np.exp(logp)
            return -(p @ r - beta * p @ (logp - ref))

        best = min((minimize(negative, start, method="BFGS", options={"gtol": 1e-10}) for start in
                    (np.zeros_like(ref), ref, -ref)), key=lambda result: result.fun)  # fmt: skip
        rows.append(log_softmax(best.x))
    return np.stack(rows)


@pytest.mark.parametrize("w, beta", [((0.5, 0.5), 1.0), ((0.9, 0.1), 0.3), ((0.0, 1.0), 2.0)])
def test_optimal_policy_matches_brute_force(w, beta):
    ref_logp, rewards = toy()
    w = np.asarray(w)
    exact = optimal_logp(ref_logp, rewards, w, beta)
    np.testing.assert_allclose(np.exp(exact), np.exp(brute_force(ref_logp, rewards, w, beta)), atol=1e-5)
    objective = lambda logp: expected_rewards(logp, rewards) @ w - beta * kl(logp, ref_logp)  # noqa: E731
    rng = np.random.default_rng(1)
    for _ in range(200):  # no other policy over the candidates does better
        other = log_softmax(exact + rng.normal(scale=0.5, size=exact.shape), axis=-1)
        assert objective(other) <= objective(exact) + 1e-12


def test_beta_for_kl_spends_the_budget_and_is_the_constrained_optimum():
    ref_logp, rewards = toy(seed=3)
    w = np.array([0.3, 0.7])
    beta = beta_for_kl(ref_logp, rewards, w, 0.25)
    tilted = optimal_logp(ref_logp, rewards, w, beta)
    assert kl(tilted, ref_logp) == pytest.approx(0.25, abs=1e-6)
    best = expected_rewards(tilted, rewards) @ w
    rng = np.random.default_rng(0)
    for _ in range(2000):  # random policies inside the KL budget never beat it
        scale = rng.uniform(0.05, 1.5)
        other = log_softmax(ref_logp + rng.normal(scale=scale, size=ref_logp.shape), axis=-1)
        if kl(other, ref_logp) <= 0.25:
            assert expected_rewards(other, rewards) @ w <= best + 1e-9
    # more budget never lowers the front; the limit is each prompt's best candidate
    fronts = [front_at_kl(ref_logp, rewards, np.array([[1.0, 0.0]]), b)[0, 0] for b in (0.05, 0.3, 1.0, 50.0)]
    assert fronts == sorted(fronts)
    assert fronts[-1] == pytest.approx(rewards[..., 0].max(axis=1).mean(), abs=1e-3)


def test_gaps_and_hypervolume_of_the_optimum_and_of_the_base():
    ref_logp, rewards = toy(seed=5, p=4, k=6)
    w = np.array([0.6, 0.4])
    tilted = optimal_logp(ref_logp, rewards, w, 0.7)
    budget = kl(tilted, ref_logp)
    point = expected_rewards(tilted, rewards)
    assert scalarised_gap(ref_logp, rewards, point, w, budget) == pytest.approx(0.0, abs=1e-6)
    assert (objective_gaps(ref_logp, rewards, point, budget) > 0).all()  # w trades each objective away
    assert np.all(point > reference_point(rewards))
    front = front_at_kl(ref_logp, rewards, np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]), budget)
    method_hv, exact_hv = hypervolume_ratio(ref_logp, rewards, front, budget)
    assert 0.9 * exact_hv < method_hv <= exact_hv + 1e-9  # three exact points cover most of it
    base = expected_rewards(ref_logp, rewards)
    assert hypervolume_ratio(ref_logp, rewards, base[None], budget)[0] < 0.8 * exact_hv


def test_pairs_follow_the_bradley_terry_model_and_carry_margins(tmp_path: Path):
    prompts = ["q one", "q two"]
    candidates = [["a", "b", "c"], ["d", "e", "f"]]
    raw = {"x": [0.0, 1.0, 2.0, 3.0, 0.0, 1.0], "y": [5.0, 3.0, 1.0, 0.0, 2.0, 4.0]}
    task = task_from_scores(prompts, candidates, raw)
    np.testing.assert_allclose(task.rewards.reshape(-1, 2).mean(axis=0), 0.0, atol=1e-12)
    pairs = task.pairs(0, seed=0, draws=2000)
    assert len(pairs) == 2 * 3 * 2000
    ab = pairs[(pairs.prompt == "q one") & pairs.chosen.isin(["a", "c"]) & pairs.rejected.isin(["a", "c"])]
    expected = 1 / (1 + np.exp(task.rewards[0, 0, 0] - task.rewards[0, 2, 0]))  # P(c ≻ a)
    observed = (ab.chosen == "c").mean()
    assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / len(ab))
    row = ab[ab.chosen == "c"].iloc[0]
    assert row.margin_chosen == [task.rewards[0, 2, 1]] and row.margin_rejected == [task.rewards[0, 0, 1]]
    task.save(tmp_path)
    again = load_candidate_task(tmp_path)
    np.testing.assert_allclose(again.rewards, task.rewards, atol=1e-7)
    assert again.candidates == candidates and again.names == ["x", "y"]


def test_bad_tasks_are_refused(tmp_path: Path):
    with pytest.raises(MoalignError, match="same score"):
        task_from_scores(["p"], [["a", "b"]], {"x": [1.0, 1.0], "y": [0.0, 1.0]})
    with pytest.raises(MoalignError, match="N ≥ 2 objectives"):
        CandidateTask(["p"], [["a", "b"]], np.zeros((1, 2, 1)), ["x"], [0.0], [1.0])
    with pytest.raises(MoalignError, match="no candidate task"):
        load_candidate_task(tmp_path)
    with pytest.raises(MoalignError, match="beta must be > 0"):
        optimal_logp(*toy(), [0.5, 0.5], 0.0)


def test_candidate_task_from_the_demo_generator():
    from moalign.exact.task import build_candidate_task

    task = build_candidate_task(n_prompts=6, k=8)
    assert task.shape == (6, 8, 2) and task.names == ["vader", "brevity"]
    assert all(len(set(row)) == 8 for row in task.candidates)
    # brevity and vader conflict on the demo styles: the best candidates for each differ somewhere
    assert (task.rewards[..., 0].argmax(axis=1) != task.rewards[..., 1].argmax(axis=1)).any()


# --------------------------------------------------------------------------------------------- with models

PROMPTS = ["the cat sat on", "the weather is", "cook the rice"]
CANDIDATES = [
    ["the mat", "a good day", "no no no"],
    ["bad and the road is closed", "a sunny day", "yes"],
    ["slowly", "and add some salt", "the answer is no"],
]


def toy_task(seed: int = 0) -> CandidateTask:
    rng = np.random.default_rng(seed)
    raw = {"x": rng.normal(size=9).tolist(), "y": rng.normal(size=9).tolist()}
    return task_from_scores(PROMPTS, CANDIDATES, raw)


def fitted_lm(tmp_path: Path, steps: int) -> tuple[object, object]:
    """A tiny GPT-2 fitted for a few steps to emit the candidates (so that samples often land on them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moalign.testing import build_causal_lm

    path = build_causal_lm(tmp_path / "lm", n_embd=48, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    texts = [f"{p} {c}{tokenizer.eos_token}" for p, row in zip(PROMPTS, CANDIDATES) for c in row]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    return model, tokenizer


def test_renormalised_evaluation_agrees_with_sampling(tmp_path: Path):
    """Samples that land on a candidate follow the renormalised distribution: each candidate's frequency is
    within a 99.9% binomial interval of its exact probability, and so is the sampled mean reward."""
    from moalign.exact.evaluate import candidate_logps
    from moalign.generation import SamplingParams, generate
    from moalign.methods.modpo import completion_text

    task = toy_task()
    model, tokenizer = fitted_lm(tmp_path, steps=120)
    logp = candidate_logps(model, tokenizer, task)
    n = 200
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, seed=i) for i in range(n)]
    for x, prompt in enumerate(task.prompts):
        ids = []
        for y in task.candidates[x]:
            full = tokenizer(prompt + completion_text(y))["input_ids"]
            ids.append(full[len(tokenizer(prompt)["input_ids"]) :] + [tokenizer.eos_token_id])
        completions = generate(model, tokenizer, [prompt] * n, params, batch_size=200)
        paths = [c.token_ids + [tokenizer.eos_token_id] for c in completions if c.finish_reason == "stop"]
        counts = np.array([sum(path == target for path in paths) for target in ids], dtype=float)
        m = counts.sum()
        assert m >= 100, f"only {m:.0f} of {n} samples landed on a candidate"
        p = np.exp(logp[x])
        z = 3.29  # 99.9%
        assert np.all(np.abs(counts / m - p) <= z * np.sqrt(p * (1 - p) / m) + 1 / m), (counts / m, p)
        sampled = (counts @ task.rewards[x, :, 0]) / m
        spread = np.sqrt((p @ task.rewards[x, :, 0] ** 2 - (p @ task.rewards[x, :, 0]) ** 2) / m)
        assert abs(sampled - p @ task.rewards[x, :, 0]) <= z * spread + 1e-9


def test_modpo_approaches_the_exact_optimum(tmp_path: Path):
    """MODPO at w, β on Bradley–Terry pairs of the candidate task: KL(π*_w‖π_θ) falls with steps."""
    import copy

    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig

    from moalign.exact.evaluate import candidate_logps
    from moalign.methods.modpo import MODPOTrainer, training_dataset

    task = toy_task(seed=2)
    w, beta = [0.6, 0.4], 0.5
    # a reference that spreads its mass over the candidates, as an SFT model does over its data
    model, tokenizer = fitted_lm(tmp_path, steps=60)
    ref_logp = candidate_logps(model, tokenizer, task)
    target = optimal_logp(ref_logp, task.rewards, w, beta)
    pairs = task.pairs(0, seed=0, draws=30)
    dataset = training_dataset(
        datasets.Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]]),
        (np.stack(pairs.margin_chosen.to_numpy()), np.stack(pairs.margin_rejected.to_numpy())),
    )
    history: list[tuple[int, float]] = [(0, kl(target, ref_logp))]

    class ExactKL(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % 10 == 0:
                history.append((state.global_step, kl(target, candidate_logps(model, tokenizer, task))))

    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        beta=beta,
        max_steps=40,
        learning_rate=1e-3,
        per_device_train_batch_size=12,
        lr_scheduler_type="linear",
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    # the reference is this fitted model (TRL would otherwise reload the saved, unfitted weights)
    trainer = MODPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        weights=w,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[ExactKL()],
    )
    trainer.train()
    values = [v for _, v in history]
    assert [step for step, _ in history] == [0, 10, 20, 30, 40]
    assert values[0] > 0.2, history  # the reference is far from π*_w
    assert values[1] < 0.5 * values[0], history  # falling while it learns
    assert max(values[2:]) < 0.35 * values[0], history  # and staying near π*_w (label noise keeps it off 0)


def toy_exact_task(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A tiny π_ref whose tokenizer knows the toy task's texts, and `run_exact` sizes for 3 prompts × 4 candidates."""
    from moalign.exact.pipeline import SIZES
    from moalign.exact.task import build_candidate_task
    from moalign.testing import build_causal_lm

    task = build_candidate_task(3, 4, seed=1)  # the task run_exact builds at seed 0: its tokenizer's texts
    texts = [*task.prompts, *(y for row in task.candidates for y in row)]
    base = build_causal_lm(tmp_path / "lm", texts=texts, n_embd=32, n_layer=2, n_positions=1024)
    size = {**SIZES["quick"], "prompts": 3, "k": 4, "ppo_steps": 1, "sft_steps": 2, "hqd_k": 3, "hqd_steps": 2}
    size |= {"modpo_steps": 2, "max_length": 1024}  # the test tokenizer's few merges: texts of hundreds of tokens
    return base, size


def test_methods_trained_in_parallel_processes_give_the_same_numbers(tmp_path: Path):
    """The exact benchmark trains and reads MODPO beside the other methods in two processes: every number
    (points, KL, FLOPs, estimates) is the one a single process gives, because each method trains on one thread
    from its own seed and is read exactly."""
    from moalign.exact.pipeline import run_exact

    base, size = toy_exact_task(tmp_path)
    results = [
        run_exact(
            tmp_path / f"out{workers}", methods=("modpo", "sft"), base_model=str(base), size=size, workers=workers
        )
        for workers in (1, 2)
    ]
    one, two = ([{k: v for k, v in row.items() if k != "seconds"} for row in r["rows"]] for r in results)
    assert [row["name"] for row in one] == ["base (π_ref)", "MODPO", "SFT"]
    assert one[1]["flops"] > 0 and one[1]["points"] != one[0]["points"]  # MODPO moved off π_ref
    assert one == two


def test_every_method_runs_on_the_exact_task_and_is_read_exactly(tmp_path: Path):
    """`moalign demo --task exact` end to end at toy size on a tiny π_ref: MORLHF (and its one-hot models as the
    soup's ingredients), SFT and ParetoHqD trained through their recipes, each read exactly over the candidates,
    with gaps, hypervolume, counted FLOPs and `moalign cost`'s estimate in the table."""
    import json

    from moalign.exact.pipeline import LABELS, run_exact
    from moalign.run import read_manifest

    base, size = toy_exact_task(tmp_path)
    methods = ("morl", "soups", "sft", "paretohqd")
    result = run_exact(tmp_path / "out", methods=methods, base_model=str(base), size=size)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["base (π_ref)", *(LABELS[m] for m in methods)]
    assert result["task"]["prompts"] == 3 and result["task"]["candidates"] == 4
    for name in methods:
        row = rows[LABELS[name]]
        assert len(row["points"]) == 4 and row["flops"] > 0
        assert all(p["kl_ref"] >= -1e-12 for p in row["points"])
        assert 0 < row["hypervolume_ratio"] <= 1 + 1e-6  # no policy over the candidates beats the exact front
        assert min(p["gap"] for p in row["points"]) >= -1e-6
    # SFT serves one model for every preference; ParetoHqD one per preference, each on its own selection (a random
    # π_ref this small puts nearly all its mass on one candidate, so two steps do not move the points apart)
    assert len({tuple(p["rewards"]) for p in rows["SFT"]["points"]}) == 1
    hqd = read_manifest(tmp_path / "out" / "paretohqd")["training"]["stages"]["stage1"]["stages"]
    assert len(hqd) == 4 and len({stage["tokens"] for stage in hqd.values()}) > 1
    # a soup trains nothing: its cost is its ingredients', MORLHF's one-hot models
    morl = read_manifest(tmp_path / "out" / "morlhf")["training"]["stages"]
    assert rows["Rewarded Soups"]["flops"] == pytest.approx(morl["w1-0"]["flops"] + morl["w0-1"]["flops"])
    assert rows["Rewarded Soups"]["estimated_flops"] is None
    assert all(rows[LABELS[m]]["estimated_flops"] > 0 for m in ("morl", "sft", "paretohqd"))
    assert json.loads((tmp_path / "out" / "exact.json").read_text())["rows"][1]["name"] == LABELS["morl"]
    assert "Rewarded Soups" in (tmp_path / "out" / "exact.md").read_text()
    assert (tmp_path / "out" / "exact_front.png").stat().st_size > 0
