"""moalign's SFT step against a plain PyTorch loop on the same model and the same batches (CPU, `make bench`).

The demo base model, 16 rows of at most 128 tokens per step: moalign's trainer (TRL's SFTTrainer as
`moalign sft` builds it) unpacked, and with `packing: true` (where no variable-length attention is
installed moalign trains on length-grouped batches instead, and says so once). The plain loop runs each
variant's own batches: forward with labels, backward, gradient clipping, AdamW. The goal is a ratio
≥ 0.9 (moalign's step within 1.1× of the plain one). benchmarks/gpu.py measures the same on a GPU.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pandas as pd
from bench_methods import sibling


def run(quick: bool) -> list[dict[str, Any]]:
    import datasets

    from moalign.demo.task import prepare_task

    gpu = sibling("gpu")
    task = prepare_task()
    samples = pd.read_parquet(task.train_path).head(2000)
    dataset = datasets.Dataset.from_dict(
        {"prompt": list(samples["prompt"]), "completion": [" " + r for r in samples["response"]]}
    )
    steps = 6 if quick else 20
    shape = {"batch": 16, "max_length": 128, "steps": steps}
    rows = []
    for name, packing in (("unpacked", False), ("packing: true", True)):
        with tempfile.TemporaryDirectory(prefix="moalign-bench-sft-") as tmp:
            config = gpu.sft_config(tmp, shape, packing, bf16=False)
            ours, batches = gpu.moalign_sft_step(str(task.base_model), dataset, config)
            plain = gpu.plain_step(str(task.base_model), batches, False, config)
        rows.append(
            {
                "section": "SFT step",
                "metric": f"moalign SFT step, {name}",
                "value": ours.median * 1e3,
                "unit": "ms",
                "baseline": plain.median * 1e3,
                "ratio": plain.median / ours.median,
                "note": f"ratio: plain loop's time / moalign's (goal ≥ 0.9); median of {steps} steps after one "
                f"warm-up; {ours.tokens_per_second():.0f} vs {plain.tokens_per_second():.0f} real tokens/s",
            }
        )
    return rows
