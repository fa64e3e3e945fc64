"""The RiC policy: one model, steered by writing the preference's desired rewards into each prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moalign.methods.ric.conditioning import RewardTemplate, format_prompt, preference_to_targets
from moalign.policy import ModelPolicy


class RiCPolicy(ModelPolicy):
    """The one RiC model, steered by writing the preference's desired rewards into each prompt."""

    def __init__(self, manifest: dict[str, Any], run_dir: Path, device: str = "auto", mapping: str | None = None):
        super().__init__(manifest, run_dir, device=device)
        settings = manifest["ric"]
        self.template = RewardTemplate(**settings["template"])
        self.mapping = mapping or settings["mapping"]
        self.low, self.high = np.asarray(settings["low"]), np.asarray(settings["high"])
        self.quantiles = np.asarray(settings["quantiles"])

    def prepare_prompt(self, prompt: str, weights: np.ndarray) -> str:
        targets = preference_to_targets(weights, self.low, self.high, self.mapping, self.quantiles)
        return format_prompt(prompt, targets, self.template)
