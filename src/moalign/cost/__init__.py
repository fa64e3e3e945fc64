"""Cost in FLOPs: what every stage of a run records beside its seconds, and `moalign cost`, the estimate before a run.

Conventions (Kaplan et al., 2020, "Scaling laws for neural language models", §2.1), with N the parameters that
multiply every token (linear layers and the LM head; embedding lookups cost nothing) and N_t those trained:
- a trained token costs 2·N forward, 2·N backward through the activations and 2·N_t for the weight gradients:
  6·N when every weight trains; LoRA still pays 4·N for the frozen base (N then includes the adapters), plus
  2·N for the recomputed forward under gradient checkpointing;
- a forward-only token (reference model, log-probabilities of a rollout, precomputed reference passes) 2·N;
- a generated token 2·N (with the KV cache), and each prompt token once at prefill 2·N;
- a token scored by a model-based objective 2·N_rm; lexical objectives cost nothing here;
- attention's own FLOPs (about 2·layers·context·width per token) are left out: at 512 tokens on a 7B model they
  add about 1%.

`sizes` reads N and N_t (from a model, or from its config alone), `estimators` holds each method's estimate,
`command` the `moalign cost` command.
"""

from moalign.cost.command import PEAK_TFLOPS, cli, gpu_hours
from moalign.cost.estimators import Estimate, estimate
from moalign.cost.sizes import (
    LoraShape,
    ModelSize,
    generation_flops,
    model_size,
    record_stage_flops,
    scoring_flops,
    size_from_config,
    stage_flops,
)

__all__ = [
    "PEAK_TFLOPS",
    "Estimate",
    "LoraShape",
    "ModelSize",
    "cli",
    "estimate",
    "generation_flops",
    "gpu_hours",
    "model_size",
    "record_stage_flops",
    "scoring_flops",
    "size_from_config",
    "stage_flops",
]
