"""Token sampling for a whole batch at once: greedy, temperature, top-k, top-p, seeds.

Every row is sampled by the Gumbel-max trick (argmax of log-probs plus Gumbel noise), so
greedy and stochastic rows share one vectorized path; only the noise of rows with their own
seed is drawn row by row, from that row's generator, which makes seeded output reproducible
whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as tensors on the logits' device."""

    temperature: torch.Tensor  # [N] float32; 0 means greedy
    top_k: torch.Tensor  # [N] int64; 0 means off
    top_p: torch.Tensor  # [N] float32; 1 means off
    generators: list[torch.Generator | None]
    # Host-side summaries, so skipping a filter needs no device read: the largest k the
    # top-k filter must keep (a row with top-k off needs the whole vocabulary; 0: no row uses
    # top-k) and whether any row uses top-p.
    max_top_k: int = 0
    any_top_p: bool = False


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Pick one token per row of ``logits`` [N, V] (float32). Returns int64 [N].

    Callers with an all-greedy batch should take ``logits.argmax(-1)`` themselves: deciding
    that here would need a device-to-host read of the temperatures.
    """
    greedy = params.temperature == 0
    temp = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    logits = logits / temp.unsqueeze(1)
    if params.max_top_k > 0:
        logits = _apply_top_k(logits, params.top_k, params.max_top_k)
    if params.any_top_p:
        logits = _apply_top_p(logits, params.top_p)
    logprobs = torch.log_softmax(logits, dim=-1)
    noise = _gumbel(logprobs, params.generators)
    sampled = (logprobs + noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = logits.topk(min(vocab, max_top_k), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p.unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _gumbel(like: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    u = torch.rand(like.shape, device=like.device, dtype=torch.float32)
    for row, gen in enumerate(generators):
        if gen is not None:
            u[row] = torch.rand(like.shape[1], generator=gen, device=gen.device, dtype=torch.float32).to(like.device)
    return -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))
