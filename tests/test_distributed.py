"""Methods on two CPU processes (gloo DDP under `torchrun --nproc_per_node 2`), as the README tells users.

One launch trains sft, modpo and rloo and starts RiC, which is killed during its online generation (rank 0
raises after its first chunk, torchrun ends both ranks); a second launch resumes RiC on two processes. A
small driver records, per rank, the rows of every training batch and a digest of the weights after
training (by wrapping the Trainer's own `training_step` and `train`: the recipes run unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moalign import configs, distributed
from moalign.cli import main
from moalign.testing import build_causal_lm

CPU_2PROC = Path(configs.__file__).parent / "accelerate" / "cpu_2proc.yaml"


def install_tracing(trace: dict, path: Path | None = None, patch=setattr) -> None:
    """Record every training batch's rows and, when a stage ends, the weights' digest and the logged losses
    (the Trainer's `train`; moalign's PPO, which has no Trainer, at `finish_stage`); with `path`, saved after
    every stage (a rank killed by the launcher runs no `finally`)."""
    import transformers

    import moalign.methods.ppo

    step, train, finish = (
        transformers.Trainer.training_step,
        transformers.Trainer.train,
        moalign.methods.ppo.finish_stage,
    )

    def record(run: str, model, losses: list[float]) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
        trace["runs"].append({"run": run, "digest": digest.hexdigest(), "losses": losses})
        if path is not None:
            path.write_text(json.dumps(trace))

    def training_step(self, model, inputs, *args, **kwargs):
        if "input_ids" in inputs:
            rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
            trace["batches"].append({"run": self.args.output_dir, "rows": [json.dumps(r) for r in rows]})
        return step(self, model, inputs, *args, **kwargs)

    def traced_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        record(self.args.output_dir, self.accelerator.unwrap_model(self.model), losses)
        return result

    def traced_finish(model, tokenizer, final_dir, stage_dir, *args, **kwargs):
        record(str(stage_dir), model, [])
        return finish(model, tokenizer, final_dir, stage_dir, *args, **kwargs)

    patch(transformers.Trainer, "training_step", training_step)
    patch(transformers.Trainer, "train", traced_train)
    patch(moalign.methods.ppo, "finish_stage", traced_finish)


DRIVER = r"""
import json, os, sys
from pathlib import Path

sys.path.insert(0, os.environ["TESTS_DIR"])
import moalign.generation
from moalign import distributed
from moalign.cli import main
from moalign.errors import MoalignError
from test_distributed import install_tracing

rank, trace = int(os.environ["RANK"]), {"batches": [], "runs": []}
path = Path(os.environ["TRACE_DIR"]) / f"rank{rank}.json"
install_tracing(trace, path)
fail_after, generate, calls = int(os.environ["FAIL_AFTER_CHUNKS"]), moalign.generation.generate, [0]


def failing_generate(*args, **kwargs):  # a kill during generation: rank 0 dies after some chunks
    calls[0] += 1
    if rank == 0 and calls[0] > fail_after:
        raise KeyboardInterrupt
    return generate(*args, **kwargs)


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
    pairs = root / "pairs.jsonl"
    rows = [
        {
            "prompt": f"\n\nHuman: tell me about topic {i}\n\nAssistant:",
            "chosen": "a good day is a sunny day with friends" + " and friends" * (i % 3),
            "rejected": "the weather is bad" + " and sad" * (i % 2),
        }
        for i in range(24)
    ]  # every row distinct, so shards can be compared by content
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = root / "scores.sqlite"
    objectives = ["--objectives", "vader", "brevity"]
    runs = {name: root / name for name in ("sft", "modpo", "rloo", "ppo", "ric", "sft1", "modpo1", "ric1")}
    sft = ["sft", *common(model, pairs, runs["sft"], cache, max_steps=3, per_device_train_batch_size=2)]
    modpo = [
        "modpo",
        *objectives,
        *common(model, pairs, runs["modpo"], cache, max_steps=2, per_device_train_batch_size=2, max_length=64),
        *flags(preferences="0.5,0.5", learning_rate="1e-3"),
    ]
    rloo = [
        "morl",
        *objectives,
        *common(model, pairs, runs["rloo"], cache, max_steps=1, per_device_train_batch_size=2),
        *flags(algorithm="rloo", num_generations=2, max_completion_length=6, save_strategy="no"),
    ]
    ppo = [
        "morl",
        *objectives,
        *common(model, pairs, runs["ppo"], cache, max_steps=2, per_device_train_batch_size=2),
        *flags(algorithm="ppo", max_completion_length=6, save_strategy="no", ppo_epochs=1),
    ]
    ric = [
        "ric",
        *objectives,
        *common(model, pairs, runs["ric"], cache, max_steps=3, per_device_train_batch_size=2),
        *flags(online_iterations=1, online_prompts=16, online_max_steps=2, sample_max_new_tokens=8),
        *flags(generation_chunk_size=4, online_min_words=1),
    ]
    (root / "driver.py").write_text(DRIVER)
    trace_dirs, results = [root / "trace_a", root / "trace_b"], []
    # The README's two CPU launches: accelerate with the shipped config, and torchrun.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launches = zip(trace_dirs, (accelerate, torchrun), ([sft, modpo, rloo, ppo, ric], [ric]), ("1", "0"))
    for trace, launcher, commands, fail in launches:
        trace.mkdir()
        env = {**os.environ, "TRACE_DIR": str(trace), "FAIL_AFTER_CHUNKS": fail, "HF_HUB_OFFLINE": "1"}
        env["TESTS_DIR"] = str(Path(__file__).parent)
        command = [*launcher, str(root / "driver.py"), json.dumps(commands)]
        results.append(subprocess.run(command, env=env, capture_output=True, text=True, cwd=root))
    assert results[1].returncode == 0, results[1].stderr[-3000:]
    traces = [[json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)] for d in trace_dirs]
    # The same global batch (2 ranks × 2 = 4) on one process, for the loss curves.
    one_process = {"batches": [], "runs": []}
    with pytest.MonkeyPatch.context() as patch:
        install_tracing(one_process, patch=patch.setattr)
        one = common(model, pairs, runs["sft1"], cache, max_steps=3, per_device_train_batch_size=4)
        assert main(["sft", *one]) == 0
        one = common(model, pairs, runs["modpo1"], cache, max_steps=2, per_device_train_batch_size=4, max_length=64)
        assert main(["modpo", *objectives, *one, *flags(preferences="0.5,0.5", learning_rate="1e-3")]) == 0
        one = common(model, pairs, runs["ric1"], cache, max_steps=3, per_device_train_batch_size=4)
        assert main(["ric", *objectives, *one, *flags(online_iterations=0)]) == 0
    return {"runs": runs, "results": results, "traces": traces, "one_process": one_process}


def runs_of(trace: dict, folder: Path) -> list[dict]:
    return [run for run in trace["runs"] if Path(run["run"]).is_relative_to(folder)]


def test_first_launch_was_killed_during_ric_generation(launched):
    killed = launched["results"][0]
    assert killed.returncode != 0
    assert "interrupted; run the same command again to resume" in killed.stderr
    chunks = sorted(p.name for p in (launched["runs"]["ric"] / "data" / "online_1_chunks").glob("chunk-*"))
    assert chunks == []  # the resumed run finished and removed them


@pytest.mark.parametrize("name", ["sft", "modpo", "rloo", "ppo", "ric"])
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


@pytest.mark.parametrize("stage", ["sft", "modpo", "ric/checkpoints/offline"])
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
