"""Rewards-in-Context (Yang et al., ICML 2024): one model, SFT only, steered by rewards in its prompt.

- `conditioning`: the reward-in-context prompt, the preference → desired-rewards mappings, MORS
- `recipe`: the config, the prepare / offline / online stages and the `moalign ric` command
- `policy`: the steered model behind `moalign eval`, `generate` and `serve`
"""

from moalign.methods.ric.conditioning import (
    MAPPINGS,
    QUANTILE_LEVELS,
    RewardTemplate,
    format_prompt,
    mapping_settings,
    mors_filter,
    parse_prompt,
    preference_to_targets,
    sample_targets,
)
from moalign.methods.ric.policy import RiCPolicy
from moalign.methods.ric.recipe import RiCConfig, RiCRecipe, cli, train

__all__ = [
    "MAPPINGS",
    "QUANTILE_LEVELS",
    "RewardTemplate",
    "RiCConfig",
    "RiCPolicy",
    "RiCRecipe",
    "cli",
    "format_prompt",
    "mapping_settings",
    "mors_filter",
    "parse_prompt",
    "preference_to_targets",
    "sample_targets",
    "train",
]
