"""A benchmark with a known answer: a candidate-set task whose KL-regularised optimum is exact.

`task` builds the candidate set from the embedded demo task, `front` holds the closed-form optimum π*_w and
the gap/hypervolume yardsticks, `evaluate` reads a trained policy's exact distribution over the candidates,
and `pipeline` trains the methods on the task (`moalign demo --task exact`, `benchmarks/bench_exact.py`).
"""

from moalign.exact.front import beta_for_kl, expected_rewards, front_at_kl, kl, optimal_logp, renormalise
from moalign.exact.task import CandidateTask, build_candidate_task, load_candidate_task

__all__ = [
    "CandidateTask",
    "beta_for_kl",
    "build_candidate_task",
    "expected_rewards",
    "front_at_kl",
    "kl",
    "load_candidate_task",
    "optimal_logp",
    "renormalise",
]
