"""ParetoHqD (Gu et al., AAAI 2026): one model per preference, SFT on the few samples nearest its ray.

- `selection`: the mathematics of choosing a preference's samples
- `stage2`: the representative stage-1 models' fresh, scored answers
- `recipe`: the config, the two SFT stages and the `moalign paretohqd` command
"""

from moalign.methods.paretohqd.recipe import ParetoHqDConfig, cli, train
from moalign.methods.paretohqd.selection import normalise, ray_angle, representatives, select
from moalign.methods.paretohqd.stage2 import usable_responses

__all__ = [
    "ParetoHqDConfig",
    "cli",
    "normalise",
    "ray_angle",
    "representatives",
    "select",
    "train",
    "usable_responses",
]
