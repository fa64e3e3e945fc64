"""Methods on two CPU processes (gloo DDP under `torchrun --nproc_per_node 2`), as the README tells users.

One launch (accelerate, the shipped config) trains sft, modpo, rloo and ppo and starts RiC, which is killed
during its online generation (rank 0 raises after its first chunk, the launcher ends both ranks); a second
(torchrun) resumes RiC, runs ParetoHqD and evaluates the RiC run with `moalign eval`. A small driver
records, per rank, the rows of every training batch, the weights' digest and per-step statistics after
each stage, and how every generation stage was shared out (by wrapping the Trainer's own `training_step`
and `train`, PPO's `rollout`/`update` and `map_chunks`: the recipes run unchanged). The same commands on one
process with the same global batch are the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from moalign import configs, distributed
from moalign.cli import main
from moalign.testing import build_causal_lm

CPU_2PROC = Path(configs.__file__).parent / "accelerate" / "cpu_2proc.yaml"


def install_tracing(trace: dict, path: Path | None = None, patch=setattr) -> None:
    """Record every training batch's rows and, when a stage ends, the weights' digest, the logged losses and
    per-step statistics (the Trainer's `train`; moalign's PPO, which has no Trainer, at `finish_stage`, with
    what each `PPO.update` returned); with `path`, saved after every stage (a rank killed by the launcher
    runs no `finally`)."""
    import transformers

    import moalign.methods.ppo

    step, train, finish = (
        transformers.Trainer.training_step,
        transformers.Trainer.train,
        moalign.methods.ppo.finish_stage,
    )
    rollout, update = moalign.methods.ppo.PPO.rollout, moalign.methods.ppo.PPO.update
    updates: list[dict] = []

    def record(run: str, model, losses: list[float], steps: list[dict]) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
        trace["runs"].append({"run": run, "digest": digest.hexdigest(), "losses": losses, "steps": steps})
        if path is not None:
            path.write_text(json.dumps(trace))

    def batch(run: str, ids, mask) -> None:
        rows = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
        trace["batches"].append({"run": run, "rows": [json.dumps(r) for r in rows]})

    def training_step(self, model, inputs, *args, **kwargs):
        if "input_ids" in inputs:
            batch(self.args.output_dir, inputs["input_ids"], inputs["attention_mask"])
        elif isinstance(inputs, list):  # TRL's RL trainers: the prompts this rank generates for, as text
            trace["batches"].append({"run": self.args.output_dir, "rows": [row["prompt"] for row in inputs]})
        return step(self, model, inputs, *args, **kwargs)

    def traced_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        logged = [entry for entry in self.state.log_history if "loss" in entry]
        record(self.args.output_dir, self.accelerator.unwrap_model(self.model), [e["loss"] for e in logged], logged)
        return result

    def traced_rollout(self, prompts, *args, **kwargs):
        trace["batches"].append({"run": self.config.output_dir, "rows": list(prompts)})
        return rollout(self, prompts, *args, **kwargs)

    def traced_update(self, *args, **kwargs):
        updates.append(update(self, *args, **kwargs))
        return updates[-1]

    def traced_finish(model, tokenizer, final_dir, stage_dir, *args, **kwargs):
        record(str(stage_dir), model, [], list(updates))
        updates.clear()
        return finish(model, tokenizer, final_dir, stage_dir, *args, **kwargs)

    patch(transformers.Trainer, "training_step", training_step)
    patch(transformers.Trainer, "train", traced_train)
    patch(moalign.methods.ppo.PPO, "rollout", traced_rollout)
    patch(moalign.methods.ppo.PPO, "update", traced_update)
    patch(moalign.methods.ppo, "finish_stage", traced_finish)


def pin_rl_sampling(patch=setattr) -> None:
    """TRL's RLOO samples a rank's completions from that rank's global RNG (seeded `seed + rank`), so two
    processes draw other completions than one. For the comparison, every completion is sampled from its
    own seed (its prompt and its place among that prompt's generations): one layout or the other, the
    trainer learns from the same completions, and what remains to compare is the optimisation itself.
    (moalign's PPO needs no pin: it seeds each row by its place in the global rollout.)"""
    import torch
    from trl import RLOOTrainer

    def generate(self, prompt_ids, images, multimodal_fields):
        model, taken, out = self.accelerator.unwrap_model(self.model), {}, []
        for ids in prompt_ids:
            taken[tuple(ids)] = place = taken.get(tuple(ids), -1) + 1
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(zlib.crc32(json.dumps(ids).encode()) + place)
                prompt = torch.tensor([ids], device=model.device)
                row = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), generation_config=self.generation_config
                )
            row = row[0, len(ids) :].tolist()
            ends = [i for i, token in enumerate(row) if token in self.eos_token_ids]
            out.append(row[: ends[0] + 1] if ends else row)  # as TRL keeps it: up to the first EOS
        return out

    patch(RLOOTrainer, "_generate_single_turn", generate)


DRIVER = r"""
import json, os, sys
from pathlib import Path

sys.path.insert(0, os.environ["TESTS_DIR"])
import moalign.generation
from moalign import distributed
from moalign.cli import main
from moalign.errors import MoalignError
from test_distributed import install_tracing, pin_rl_sampling

rank, trace = int(os.environ["RANK"]), {"batches": [], "runs": [], "chunked": []}
path = Path(os.environ["TRACE_DIR"]) / f"rank{rank}.json"
install_tracing(trace, path)
pin_rl_sampling()
fail_after, generate, calls = int(os.environ["FAIL_AFTER_CHUNKS"]), moalign.generation.generate, [0]
map_chunks, command = distributed.map_chunks, [""]


def failing_generate(*args, **kwargs):  # a kill during generation: rank 0 dies after some chunks
    calls[0] += 1
    if rank == 0 and calls[0] > fail_after:
        raise KeyboardInterrupt
    return generate(*args, **kwargs)


def traced_map_chunks(*args, **kwargs):  # how each generation stage was shared out, by command
    rows, stats = map_chunks(*args, **kwargs)
    trace["chunked"].append({"command": command[0], **stats})
    return rows, stats


distributed.map_chunks = traced_map_chunks
if fail_after:
    moalign.generation.generate = failing_generate
else:  # an error on the main process while the other rank waits for it
    def no_space():
        raise MoalignError("no space left on device")

    try:
        distributed.run_on_main(no_space)
    except MoalignError as error:
        trace["main_failure"] = str(error)
code = 0
try:
    for argv in json.loads(sys.argv[1]):
        command[0] = argv[0]
        code = main(argv)
        if code:
            break
finally:
    path.write_text(json.dumps(trace))
sys.exit(code)
"""


def flags(**values: object) -> list[str]:
    flat: list[str] = []
    for key, value in values.items():
        flat += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return flat


def common(model: Path, dataset: Path, out: Path, cache: Path, **extra: object) -> list[str]:
    values = {
        "model_name_or_path": model,
        "dataset": dataset,
        "output_dir": out,
        "score_cache": cache,
        "report_to": "none",
        "logging_steps": 1,
        "seed": 0,
        **extra,
    }
    return flags(**values)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Everything the two launches and the one-process references produce (launched once for the module)."""
    root = tmp_path_factory.mktemp("distributed")
    # No dropout: one process and two would otherwise draw different dropout masks.
    model = build_causal_lm(root / "lm", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    pairs, samples = root / "pairs.jsonl", root / "samples.jsonl"
    rows = [
        {
            "prompt": f"\n\nHuman: tell me about topic {i + 10}\n\nAssistant:",
            "chosen": "a good day is a sunny day with friends" + " and friends" * (i % 3),
            "rejected": "the weather is bad" + " and sad" * (i % 2),
        }
        for i in range(24)
    ]  # every row distinct (shards are compared by content); prompts of one length: TRL's forward passes no
    # position ids, so GPT-2 counts a left-padded prompt's positions from the padding (another input, other logits)
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = [{"prompt": r["prompt"], "response": r[side]} for r in rows for side in ("chosen", "rejected")]
    samples.write_text("".join(json.dumps(r) + "\n" for r in answers))
    cache = root / "scores.sqlite"
    objectives = ["--objectives", "vader", "brevity"]
    names = (
        "sft",
        "modpo",
        "rloo",
        "ppo",
        "ric",
        "paretohqd",
        "pm",
        "sft1",
        "modpo1",
        "rloo1",
        "ppo1",
        "ric1",
        "paretohqd1",
    )
    runs = {name: root / name for name in names}

    def sft(out: Path, batch: int) -> list[str]:
        return ["sft", *common(model, pairs, out, cache, max_steps=3, per_device_train_batch_size=batch)]

    def modpo(out: Path, batch: int) -> list[str]:
        one = common(model, pairs, out, cache, max_steps=2, per_device_train_batch_size=batch, max_length=64)
        return ["modpo", *objectives, *one, *flags(preferences="0.5,0.5", learning_rate="1e-3")]

    def rl(algorithm: str, out: Path, batch: int) -> list[str]:
        # RLOO: 4 completions of each prompt (2 prompts a step), so that they seldom all score alike (no gradient)
        rows = 2 * batch if algorithm == "rloo" else batch
        one = common(model, pairs, out, cache, max_steps=2, per_device_train_batch_size=rows, learning_rate="1e-3")
        one += flags(algorithm=algorithm, max_completion_length=6, save_strategy="no")
        one += flags(num_generations=4) if algorithm == "rloo" else flags(ppo_epochs=1)
        # readability: a tiny model's 6-token answers to one prompt differ in it (in words and VADER, seldom)
        return ["morl", *flags(objectives=["vader", "readability"]), *one]

    def paretohqd(out: Path, batch: int) -> list[str]:
        one = common(model, samples, out, cache, per_device_train_batch_size=batch, save_strategy="no")
        one += flags(preferences=["1,0", "0,1"], k=2, n_layers=3, stage1_max_steps=2, stage2_max_steps=1)
        one += flags(stage2_prompts=8, sample_max_new_tokens=6, selection_plots="false", generation_chunk_size=2)
        return ["paretohqd", *objectives, *one, *flags(stage2_drop_degenerate="false")]

    def evaluate(run: Path) -> list[str]:  # RiC's policy on 8 prompts × 2 preferences, 4 chunks of 2 each
        return ["eval", str(run), *flags(n_prompts=8, divisions=1, max_new_tokens=6, generation_chunk_size=2)]

    ric = [
        "ric",
        *objectives,
        *common(model, pairs, runs["ric"], cache, max_steps=3, per_device_train_batch_size=2),
        *flags(online_iterations=1, online_prompts=16, online_max_steps=2, sample_max_new_tokens=8),
        *flags(generation_chunk_size=4, online_min_words=1, eval_prompts=str(pairs)),
    ]
    (root / "driver.py").write_text(DRIVER)
    trace_dirs, results = [root / "trace_a", root / "trace_b"], []
    # The README's two CPU launches: accelerate with the shipped config, and torchrun. Two processes of 2 rows
    # (ParetoHqD: 1) against one process of the same global batch (4; ParetoHqD: 2) below.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    first = [sft(runs["sft"], 2), modpo(runs["modpo"], 2), rl("rloo", runs["rloo"], 2), rl("ppo", runs["ppo"], 2), ric]
    # MORLAIF's preference model on the toy labels of test_preference_model (one principle, two steps)
    from test_preference_model import toy_labels

    from moalign.testing import build_classifier

    feedback = root / "feedback"
    feedback.mkdir()
    toy_labels().to_parquet(feedback / "labels.parquet")
    pm = ["pm", *common(build_classifier(root / "classifier"), feedback, runs["pm"], cache, max_steps=2)]
    pm += flags(principles="kindness", eval_fraction=0.25, per_device_train_batch_size=4, max_length=64)
    # a soup of the sft model and the modpo one, copied into the soup's run directory (by the main process)
    soups = ["soups", *objectives, "--output_dir", str(root / "soups"), "--copy_ingredients", "true"]
    soups += ["--ingredients", str(runs["sft"] / "model"), str(runs["modpo"] / "models" / "w0.5-0.5")]
    second = [ric, paretohqd(runs["paretohqd"], 1), evaluate(runs["ric"]), pm, soups]
    for trace, launcher, commands, fail in zip(trace_dirs, (accelerate, torchrun), (first, second), ("1", "0")):
        trace.mkdir()
        env = {**os.environ, "TRACE_DIR": str(trace), "FAIL_AFTER_CHUNKS": fail, "HF_HUB_OFFLINE": "1"}
        env["TESTS_DIR"] = str(Path(__file__).parent)
        command = [*launcher, str(root / "driver.py"), json.dumps(commands)]
        results.append(subprocess.run(command, env=env, capture_output=True, text=True, cwd=root))
    assert results[1].returncode == 0, results[1].stderr[-3000:]
    traces = [[json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)] for d in trace_dirs]
    # The same global batch on one process, for the loss curves; eval again on a copy of the RiC run.
    one_process = {"batches": [], "runs": []}
    eval1 = root / "ric_eval1"
    shutil.copytree(runs["ric"], eval1)
    with pytest.MonkeyPatch.context() as patch:
        install_tracing(one_process, patch=patch.setattr)
        pin_rl_sampling(patch.setattr)
        assert main(sft(runs["sft1"], 4)) == 0
        assert main(modpo(runs["modpo1"], 4)) == 0
        assert main(rl("rloo", runs["rloo1"], 4)) == 0
        assert main(rl("ppo", runs["ppo1"], 4)) == 0
        one = common(model, pairs, runs["ric1"], cache, max_steps=3, per_device_train_batch_size=4)
        assert main(["ric", *objectives, *one, *flags(online_iterations=0)]) == 0
        assert main(paretohqd(runs["paretohqd1"], 2)) == 0
        assert main(evaluate(eval1)) == 0
    runs["eval1"] = eval1
    return {"runs": runs, "results": results, "traces": traces, "one_process": one_process}


def runs_of(trace: dict, folder: Path) -> list[dict]:
    return [run for run in trace["runs"] if Path(run["run"]).is_relative_to(folder)]


def test_first_launch_was_killed_during_ric_generation(launched):
    killed = launched["results"][0]
    assert killed.returncode != 0
    assert "interrupted; run the same command again to resume" in killed.stderr
    chunks = sorted(p.name for p in (launched["runs"]["ric"] / "data" / "online_1_chunks").glob("chunk-*"))
    assert chunks == []  # the resumed run finished and removed them


@pytest.mark.parametrize("name", ["sft", "modpo", "rloo", "ppo", "ric", "paretohqd", "pm"])
def test_world_size_two_one_manifest_identical_weights(launched, name):
    run = launched["runs"][name]
    manifest = json.loads((run / "moalign.json").read_text())
    assert manifest["training"]["world_size"] == 2
    assert not list(run.rglob(".*.tmp*"))  # no half-written file or folder left by a second writer
    first, resumed = launched["traces"]
    per_rank = [runs_of(trace, run) + runs_of(other, run) for trace, other in zip(first, resumed)]
    assert per_rank[0] and len(per_rank[0]) == len(per_rank[1])
    for on_rank0, on_rank1 in zip(*per_rank):
        assert on_rank0["digest"] == on_rank1["digest"]  # DDP kept both replicas equal, stage by stage


@pytest.mark.parametrize("stage", ["sft", "modpo", "rloo", "ppo", "ric/checkpoints/offline"])
def test_each_rank_trained_on_a_disjoint_shard(launched, stage):
    folder = launched["runs"]["sft"].parent / stage
    seen = [
        {
            row
            for trace in traces
            for batch in trace["batches"]
            if Path(batch["run"]).is_relative_to(folder)
            for row in batch["rows"]
        }
        for traces in zip(*launched["traces"])
    ]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_ric_online_generation_was_shared_and_resumed(launched):
    stats = json.loads((launched["runs"]["ric"] / "data" / "generate_1.json").read_text())
    assert stats["world_size"] == 2 and stats["chunks"] == 4
    assert stats["resumed_chunks"] == 2  # round 1 (a chunk per rank) was saved before the kill
    assert stats["rows_per_rank"] == {"0": 8, "1": 8}  # chunks 0, 2 on rank 0; 1, 3 on rank 1
    assert stats["generated"] == 16
    # The offline stage finished in the first launch: the second trained only the online stage.
    resumed = runs_of(launched["traces"][1][0], launched["runs"]["ric"])
    assert [Path(r["run"]).name for r in resumed] == ["online_1"]


# DDP averages the ranks' gradients of per-rank mean losses; with the same global batch of 4 rows (the
# same rows: accelerate hands rank r the r-th per-device slice of the one sampler's order) and token
# counts averaged across devices, two processes compute one process's loss up to float32 summation
# order: 1e-4 relative covers that (a wrong shard or an unsynchronised replica moves it by > 1e-2).
@pytest.mark.parametrize("name, reference", [("sft", "sft1"), ("modpo", "modpo1"), ("ric", "ric1")])
def test_loss_curve_matches_one_process_with_the_same_global_batch(launched, name, reference):
    two = runs_of(launched["traces"][0][0], launched["runs"][name])[0]["losses"]
    one_manifest = json.loads((launched["runs"][reference] / "moalign.json").read_text())
    assert one_manifest["training"]["world_size"] == 1
    one = runs_of(launched["one_process"], launched["runs"][reference])[0]["losses"]
    assert len(two) == len(one) > 0
    assert two == pytest.approx(one, rel=1e-4)


def weights_of_model(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def weights(run: Path) -> dict:
    (folder,) = run.glob("models/*/")
    return weights_of_model(folder)


# RL on two processes against one with the same global rollout (RLOO: 2 prompts × 4 completions, the
# completions pinned per row, see `pin_rl_sampling`; PPO: 4 prompts, each row seeded by its place in the
# global rollout). Per step, the gradient norm after the all-reduce and the rollout's statistics must agree to
# 1e-4 relative, float32 summation order again (measured: the saved weights' gap is 0.05% (RLOO) and 0.13% (PPO)
# of training's change, below);
# a rank stepping on its own half's gradient (no all-reduce) or on a wrong share of the rollout changes the
# gradient itself, not its last digits. At ratio 1 (one update per rollout) the policy loss is a mean of
# advantages that sum to zero (RLOO's leave-one-out, PPO's whitening): compared in absolute terms, 1e-6.
@pytest.mark.parametrize("name, keys", [("rloo", ("grad_norm", "reward", "kl")), ("ppo", ("grad_norm", "value_loss"))])
def test_rl_steps_match_one_process_with_the_same_global_batch(launched, name, keys):
    (two,) = runs_of(launched["traces"][0][0], launched["runs"][name])
    (one,) = runs_of(launched["one_process"], launched["runs"][name + "1"])
    assert len(two["steps"]) == len(one["steps"]) == 2
    for step_two, step_one in zip(two["steps"], one["steps"]):
        assert step_two["grad_norm"] > 0
        for key in keys:
            assert step_two[key] == pytest.approx(step_one[key], rel=1e-4), key
        loss = "loss" if name == "rloo" else "policy_loss"
        assert step_two[loss] == pytest.approx(step_one[loss], abs=1e-6)


@pytest.mark.parametrize("name", ["rloo", "ppo"])
def test_rl_weights_match_one_process(launched, name):
    """The saved policies of the two runs differ by float32 rounding, not by training: their largest gap
    is under 1% of the largest change training made (a skipped all-reduce leaves a gap of the change's size)."""
    base = weights_of_model(launched["runs"]["sft"].parent / "lm")
    two, one = weights(launched["runs"][name]), weights(launched["runs"][name + "1"])
    change = max(float((one[k] - base[k]).abs().max()) for k in base)
    gap = max(float((two[k] - one[k]).abs().max()) for k in base)
    assert change > 1e-4 and gap < 0.01 * change, (gap, change)


@pytest.mark.parametrize("name", ["ppo", "rloo"])
def test_rl_manifest_counts_every_ranks_tokens(launched, name):
    manifests = [json.loads((launched["runs"][n] / "moalign.json").read_text()) for n in (name, name + "1")]
    two, one = (manifest["training"]["stages"]["w0.5-0.5"] for manifest in manifests)
    assert two["generated_tokens"] == one["generated_tokens"] > 0  # both ranks' tokens, as one process counts
    assert two["tokens"] == one["tokens"] and two["flops"] == one["flops"]


def chunked(launched: dict, command: str) -> list[dict]:
    return [stage for stage in launched["traces"][1][0]["chunked"] if stage["command"] == command]


def test_paretohqd_stage2_generation_was_shared_and_matches_one_process(launched):
    import pandas as pd

    stages = chunked(launched, "paretohqd")
    assert len(stages) == 2  # the two representative models, 8 prompts each in 4 chunks of 2
    for stage in stages:
        assert stage["world_size"] == 2 and stage["rows_per_rank"] == {"0": 4, "1": 4}
    run, reference = launched["runs"]["paretohqd"], launched["runs"]["paretohqd1"]
    info = json.loads((run / "stage2_generated.json").read_text())
    assert info["world_size"] == 2 and not (run / "stage2_parts").exists()
    two, one = (pd.read_parquet(r / "stage2_generated.parquet") for r in (run, reference))
    # The stage-1 models of the two layouts differ by float rounding only: the same seeded rows, same answers.
    pd.testing.assert_frame_equal(two, one)


def test_eval_on_two_processes_writes_the_front_of_one_process(launched):
    stages = chunked(launched, "eval")
    assert len(stages) == 2  # one generation stage per preference
    for stage in stages:
        assert stage["world_size"] == 2 and stage["rows_per_rank"] == {"0": 4, "1": 4}
    run = launched["runs"]["ric"]
    assert not (run / "eval_chunks").exists() and (run / "report.html").exists()
    fronts = [json.loads((r / "front.json").read_text()) for r in (run, launched["runs"]["eval1"])]
    timing = ("run", "name", "seconds", "generated_per_second")
    # Chunks of the same rows, each row seeded alone: the same responses whichever rank made them, so the
    # same front (points, intervals, samples), not only a close one.
    assert {k: v for k, v in fronts[0].items() if k not in timing} == {
        k: v for k, v in fronts[1].items() if k not in timing
    }


def test_preference_model_on_two_processes(launched):
    entry = json.loads((launched["runs"]["pm"] / "moalign.json").read_text())["principles"]["kindness"]
    assert entry["heldout_pairs"] == 30 and entry["steps"] == 2  # 120 toy pairs, a quarter held out
    assert 0 <= entry["judge_accuracy"] <= 1 and not (launched["runs"]["pm"] / "checkpoints").exists()


def test_soups_on_two_processes_copy_each_ingredient_once(launched):
    run = launched["runs"]["sft"].parent / "soups"
    manifest = json.loads((run / "moalign.json").read_text())
    assert manifest["training"]["world_size"] == 2
    assert [entry["path"] for entry in manifest["ingredients"]] == ["ingredients/vader", "ingredients/brevity"]
    copied = (run / "ingredients" / "vader" / "model.safetensors").read_bytes()
    assert copied == (launched["runs"]["sft"] / "model" / "model.safetensors").read_bytes()
    assert not list(run.rglob(".*.tmp*"))


def test_an_error_on_the_main_process_reaches_the_other_rank_in_one_line(launched):
    first, other = launched["traces"][1]
    assert first["main_failure"] == "no space left on device"
    assert other["main_failure"] == "the main process failed: no space left on device"  # not a hang


def test_cpu_num_processes_trap_is_warned_in_one_line(tmp_path):
    """The real trap: accelerate starts one process for `--cpu --num_processes 2`; moalign says so."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    command += ["-m", "moalign.cli", "objectives"]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0
    warnings = [line for line in done.stderr.splitlines() if line.startswith("moalign objectives: warning:")]
    assert len(warnings) == 1 and "ONE process" in warnings[0]  # one process, one line


def test_cpu_num_processes_trap_is_detected():
    launched_one = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "ONE process" in distributed.launch_warning(launched_one)
    assert distributed.launch_warning({**launched_one, "WORLD_SIZE": "2"}) is None
    assert distributed.launch_warning({"ACCELERATE_USE_CPU": "True"}) is None  # --num_processes 1


def test_ppo_step_does_not_depend_on_how_the_rollout_is_split(tiny_lm, tmp_path):
    """One long response and three short ones, in one micro-batch of 4 rows or two of 2: the same gradient.
    PPO's losses are a token mean over the whole mini-batch, so how its rows are split (into micro-batches
    here, over ranks under a launcher) does not weigh them; the mean of per-split means it replaced weighs the
    short responses' tokens more (measured here: a gradient norm of 3.55 for two micro-batches, 2.07 for one)."""
    import torch

    from moalign.generation import prepare_tokenizer
    from moalign.methods.common import load_tokenizer
    from moalign.methods.config import parse_config
    from moalign.methods.morl import MORLConfig
    from moalign.methods.ppo import PPO
    from moalign.methods.rollouts import Rollout, pad_sequences

    tokenizer = load_tokenizer(str(tiny_lm))
    prepare_tokenizer(tokenizer)
    prompts = ["\n\nHuman: the cat?\n\nAssistant:", "\n\nHuman: plants?\n\nAssistant:"] * 2
    answers = ["a good day is a sunny day with friends and the cat sat on the mat", "yes", "no", "bad"]
    queries = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    responses = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    ids, attention, mask, width = pad_sequences(queries, responses, tokenizer.pad_token_id, "cpu")
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None] * mask
    zeros = torch.zeros_like(mask)

    def step(per_device: int, accumulation: int) -> float:
        argv = ["--model_name_or_path", str(tiny_lm), "--dataset", "unused", "--output_dir", str(tmp_path)]
        argv += ["--objectives", "vader", "--algorithm", "ppo", "--ppo_epochs", "1", "--learning_rate", "1e-3"]
        argv += ["--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", str(accumulation)]
        torch.manual_seed(0)
        ppo = PPO(parse_config(MORLConfig, argv), str(tiny_lm), tokenizer, "cpu")
        with torch.no_grad():
            logprobs = ppo.reference_logprobs(ids, attention, width) * mask
        batch = Rollout(ids, attention, width, mask, logprobs, zeros, advantages, zeros, zeros[:, 0], zeros[:, 0])
        return ppo.update(batch, seed=0)["grad_norm"]

    assert step(2, 2) == pytest.approx(step(4, 1), rel=1e-5)
