"""`hf:PATH_OR_HUB_ID`: a Hugging Face sequence-classification reward model."""

from __future__ import annotations

import os

import numpy as np
import torch

from moalign.errors import MoalignError
from moalign.models import ModelOptions, load_pretrained, load_tokenizer, pick_device
from moalign.objectives.base import Objective, register

INPUT_MODES = ("concat", "pair", "response")


@register(
    "hf",
    "a sequence-classification reward model, hf:PATH_OR_HUB_ID; options input=concat|pair|response, "
    "logit=0, max_length=512, batch_size=16, dtype=float32, device=auto, sort=true",
    "transformers; the model on disk or in the hub cache",
)
class HFRewardModel(Objective):
    def __init__(
        self,
        argument: str,
        input: str = "concat",
        logit: int = 0,
        max_length: int = 512,
        batch_size: int = 16,
        dtype: str = "float32",
        device: str = "auto",
        sort: bool = True,
    ):
        from transformers import AutoModelForSequenceClassification

        if not argument:
            raise MoalignError("hf objective needs a model: hf:PATH_OR_HUB_ID")
        if input not in INPUT_MODES:
            raise MoalignError(f"hf:{argument}: input must be one of {', '.join(INPUT_MODES)}, got {input!r}")
        self.path = argument
        self.name = os.path.basename(argument.rstrip("/")) or argument
        self.input, self.logit, self.max_length = input, int(logit), int(max_length)
        self.batch_size, self.sort = int(batch_size), bool(sort)
        self.device = pick_device(device)
        try:
            self.tokenizer = load_tokenizer(argument)
            self.model = load_pretrained(
                argument, ModelOptions(dtype=dtype), self.device, auto_class=AutoModelForSequenceClassification
            )
        except MoalignError as error:
            raise MoalignError(f"hf:{argument}: {error}") from None
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.logit >= self.model.config.num_labels:
            raise MoalignError(
                f"hf:{argument}: logit={self.logit} but the model has {self.model.config.num_labels} labels"
            )

    @property
    def cache_key(self) -> str:
        # A local model retrained in place must not reuse stale scores.
        config = os.path.join(self.path, "config.json")
        stamp = os.path.getmtime(config) if os.path.exists(config) else ""
        return f"{self.spec}@{stamp}"

    def _encode(self, prompts: list[str], responses: list[str]):
        kwargs = dict(truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        if self.input == "pair":
            return self.tokenizer(prompts, responses, **kwargs)
        if self.input == "response":
            return self.tokenizer(responses, **kwargs)
        return self.tokenizer([p + r for p, r in zip(prompts, responses)], **kwargs)

    @torch.inference_mode()
    def _score(self, prompts, responses):
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        # Sorting by length keeps each batch's padding small; scores go back to input order.
        order = np.argsort(lengths, kind="stable") if self.sort else np.arange(len(responses))
        scores = np.empty(len(responses))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self._encode([prompts[i] for i in index], [responses[i] for i in index]).to(self.device)
            logits = self.model(**batch).logits
            scores[index] = logits[:, self.logit].float().cpu().numpy()
        return scores
