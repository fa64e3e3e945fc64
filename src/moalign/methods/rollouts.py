"""A PPO rollout's tensors: [prompt | response] sequences padded into one batch, per-token log-probabilities
and values from one forward pass, generalised advantage estimation (Schulman et al., 2016) and whitening."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class ValueHead(nn.Module):
    """V(s_t) from the hidden state that predicts token t; zero-initialised so early values do not bias GAE."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


@dataclass
class Rollout:
    """One batch of sampled responses. Sequences are [left-padded prompt | right-padded response]; every
    per-token tensor is (B, L) over the response columns, with `mask` marking real response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor  # per sequence: Σ_t log π(y_t) − log π_ref(y_t)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> torch.Tensor:
    """Zero mean, unit variance over the real tokens: advantages then have one scale whatever the reward.

    `total` sums a tensor over the ranks, so that several processes whiten over the global rollout."""
    sums = total(torch.stack([(values * mask).sum(), mask.sum()]))
    mean = sums[0] / sums[1].clamp(min=1.0)
    var = total(((values - mean) ** 2 * mask).sum()) / sums[1].clamp(min=1.0)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, L) tensors that are zero past each response's end."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.size(1)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def logprobs_and_values(
    model,
    head: ValueHead | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) of each response token and V at the state before it, both (B, L)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        output_hidden_states=head is not None,
        use_cache=False,
    )
    logits = out.logits[:, prompt_width - 1 : -1].float() / temperature
    tokens = input_ids[:, prompt_width:]
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    values = head(out.hidden_states[-1][:, prompt_width - 1 : -1]) if head is not None else None
    return logprobs, values


def pad_sequences(
    queries: list[list[int]], responses: list[list[int]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """[left-padded prompt | right-padded response] ids, attention mask, response mask, prompt width."""
    width, length = max(map(len, queries)), max(map(len, responses))
    ids = torch.full((len(queries), width + length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (query, response) in enumerate(zip(queries, responses)):
        ids[row, width - len(query) : width] = torch.tensor(query)
        ids[row, width : width + len(response)] = torch.tensor(response, dtype=torch.long)
        attention[row, width - len(query) : width + len(response)] = 1
    return ids.to(device), attention.to(device), attention[:, width:].float().to(device), width
