"""Independent reference for generation tests: small random checkpoints saved by transformers,
and greedy decoding with transformers' own forward pass and KV cache."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384


def build_checkpoint(arch: str, path: Path, seed: int = 0) -> torch.nn.Module:
    """Save a small random ``arch`` ("llama" | "qwen2") checkpoint to ``path``; return the HF model."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="eager",
        bos_token_id=256,
        eos_token_id=257,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            **common,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1e6))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # larger weights than the default init, so greedy paths are not flat
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0, 0.05)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


@torch.no_grad()
def hf_greedy(
    model: torch.nn.Module, prompt: list[int], n: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation of ``prompt`` by ``n`` tokens, with the logits of every step."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens, logits = [], []
    for _ in range(n):
        step_logits = out.logits[0, -1].float()
        tok = int(step_logits.argmax())
        tokens.append(tok)
        logits.append(step_logits)
        out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def assert_greedy_matches(
    ours: list[int], ref: list[int], ref_logits: list[torch.Tensor], tie_tol: float = 1e-3
) -> None:
    """Token-for-token equality; a divergence is accepted only at a near-tie of the reference's
    top logits (float32 rounding may flip an exact tie), and comparison stops there."""
    assert len(ours) == len(ref), f"length {len(ours)} != reference {len(ref)}"
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a != b:
            gap = float(ref_logits[i][b] - ref_logits[i][a])
            assert gap < tie_tol, (
                f"token {i}: got {a}, reference {b} (logit gap {gap:.2e}); ours={ours} ref={ref}"
            )
            return
