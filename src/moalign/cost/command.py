"""`moalign cost CONFIG.yaml`: a recipe's FLOPs and GPU-hours before running it.

    moalign cost CONFIG.yaml [--method ric] [--gpu A100] [--utilisation 0.4] [--num_processes 1]

GPU-hours = FLOPs / (utilisation × peak), both stated in the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moalign.cost.estimators import estimate
from moalign.errors import MoalignError

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity); H200-measured is the
# 8192³ bf16 torch.matmul measured on an H200.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H200-measured": 779.0, "V100": 125.0, "L40S": 362.0}


def gpu_hours(flops: float, gpu: str, utilisation: float) -> float:
    return flops / (utilisation * PEAK_TFLOPS[gpu] * 1e12) / 3600.0


@dataclass
class CostArguments:
    """`moalign cost CONFIG.yaml`: a recipe's FLOPs and GPU-hours before running it."""

    method: str | None = field(
        default=None, metadata={"help": "sft, ric, morl, modpo or paretohqd (default: from the keys)"}
    )
    gpu: str = field(default="A100", metadata={"help": f"peak from the data sheet: {', '.join(PEAK_TFLOPS)}"})
    utilisation: float = field(default=0.4, metadata={"help": "share of the peak a training run reaches (MFU)"})
    rows: int | None = field(default=None, metadata={"help": "dataset rows (default: measured or known)"})
    prompt_tokens: float | None = field(
        default=None, metadata={"help": "mean prompt tokens (default: measured or known)"}
    )
    response_tokens: float | None = field(default=None, metadata={"help": "mean response tokens"})
    new_tokens: float | None = field(
        default=None, metadata={"help": "mean tokens each generation samples (default: the config's cap)"}
    )
    pilot_prompts: int = field(
        default=0,
        metadata={"help": "estimate generations at the length the initial policy samples on N of the data's prompts"},
    )
    num_processes: int = field(default=1, metadata={"help": "data-parallel processes (GPUs): the global batch"})
    json_output: str | None = field(default=None, metadata={"help": "also write the estimate as JSON here"})


def cli(argv: list[str]) -> None:
    from moalign.methods.config import parse_config
    from moalign.report import markdown_table

    args = parse_config(CostArguments, argv, required=(), positionals=[("recipe", None, "the method's YAML config")])
    if args.gpu not in PEAK_TFLOPS:
        raise MoalignError(f"gpu {args.gpu!r} is not known; use one of {', '.join(PEAK_TFLOPS)}")
    if not 0 < args.utilisation <= 1:
        raise MoalignError(f"utilisation must be in (0, 1], got {args.utilisation}")
    if args.pilot_prompts < 0:
        raise MoalignError(f"pilot_prompts must be ≥ 0, got {args.pilot_prompts}")
    if args.num_processes < 1:
        raise MoalignError(f"num_processes must be ≥ 1, got {args.num_processes}")
    result, _, config = estimate(
        args.recipe,
        args.method,
        args.rows,
        args.prompt_tokens,
        args.response_tokens,
        num_processes=args.num_processes,
        new_tokens=args.new_tokens,
        pilot_prompts=args.pilot_prompts,
    )
    rows = [
        {
            "stage": s.name,
            "PFLOPs": f"{s.flops / 1e15:.4g}",
            "GPU-hours": f"{gpu_hours(s.flops, args.gpu, args.utilisation):.3g}",
            "detail": s.detail,
        }
        for s in result.stages
    ]
    total = gpu_hours(result.flops, args.gpu, args.utilisation)
    rows.append({"stage": "total", "PFLOPs": f"{result.flops / 1e15:.4g}", "GPU-hours": f"{total:.3g}", "detail": ""})
    print(f"{result.method} recipe {args.recipe}: policy {config.model_name_or_path}, {args.num_processes} process(es)")
    print(markdown_table(rows, ["stage", "PFLOPs", "GPU-hours", "detail"]))
    print(f"GPU-hours at {args.utilisation:.0%} of a {args.gpu}'s {PEAK_TFLOPS[args.gpu]:g} TFLOP/s (bf16 dense)")
    for note in result.notes:
        print(note)
    if args.json_output:
        from moalign.run import write_json

        write_json(
            args.json_output,
            {
                "method": result.method,
                "recipe": args.recipe,
                "flops": result.flops,
                "gpu": args.gpu,
                "utilisation": args.utilisation,
                "gpu_hours": total,
                "stages": [vars(s) for s in result.stages],
                "notes": result.notes,
            },
        )
