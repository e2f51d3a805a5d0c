"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral) over a flat batch and a paged KV cache.

Parameter names follow Hugging Face checkpoints (``model.layers.N.self_attn.o_proj.weight``
...) except two fusions made for speed: q/k/v live in one ``qkv_proj`` and gate/up in one
``gate_up_proj``; :meth:`LlamaForCausalLM.load_weights` maps the checkpoint's separate
tensors onto slices of them. With tied embeddings there is no ``lm_head`` module: the
logits reuse ``model.embed_tokens.weight``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from ultrakv.node import kernel_variants
from ultrakv.node.attention.base import AttentionBackend, AttentionMetadata
from ultrakv.node.model.config import ModelConfig
from ultrakv.node.model.packed_linear import PackedLinear, packing_available

# Sums a row-parallel projection's partial output over the tensor-parallel ranks, in place.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


class RotaryEmbedding:
    """RoPE cos/sin tables for every position, computed once per device in float32.

    Not an ``nn.Module`` on purpose: the tables must stay float32 (and must not become
    uninitialised memory) when the model is built on the meta device and cast to a dtype.
    """

    def __init__(self, config: ModelConfig):
        self.head_dim = config.head_dim
        self.max_positions = config.max_position_embeddings
        self.inv_freq = rope_inv_freq(config)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacked: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` float32 ``[max_position_embeddings, head_dim]`` tables.

        ``cos`` repeats over both halves of the head; ``sin`` is negated on the first half,
        so rotation is ``x * cos + roll(x, head_dim // 2) * sin`` (see :func:`apply_rope`).
        """
        device = torch.device(device)
        tables = self._tables.get(device)
        if tables is None:
            pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
            cos, sin = freqs.cos(), freqs.sin()
            tables = (torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1))
            self._tables[device] = tables
        return tables

    def stacked(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Both tables in ``dtype``, ``[max_position_embeddings, 2, head_dim]`` (cos, sin), so a
        step gathers its positions' rows in one launch and converts nothing (rounding each
        entry to ``dtype`` before or after the gather gives the same values)."""
        key = (torch.device(device), dtype)
        table = self._stacked.get(key)
        if table is None:
            cos, sin = self.cos_sin(device)
            table = torch.stack((cos, sin), dim=1).to(dtype)
            self._stacked[key] = table
        return table


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim // 2] (float32, CPU) with the config's scaling applied."""
    dim = config.head_dim
    # Explicit CPU: the model may be built under a meta-device context.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1 paper / HF _compute_llama3_parameters).
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, D] by per-token ``cos``/``sin`` [T, 1, D] from
    :meth:`RotaryEmbedding.cos_sin` (HF half-split convention).

    ``roll`` swaps the halves and the signed ``sin`` supplies HF's ``rotate_half`` minus
    sign: three kernels instead of the split/negate/cat chain.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementations.

    With ``residual`` it first adds ``x`` into the residual stream and returns
    ``(norm(residual + x), residual + x)``: the pre-norm block's residual add and the next
    norm as one op (one kernel when fused kernels are on, updating ``residual`` in place).
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = False

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            out = _fused().rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self.forward(residual), residual
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Fused q/k/v projection, RoPE, paged attention through the backend, output projection."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.head_dim ** -0.5
        self.backend = backend
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.fused = False
        self.all_reduce: AllReduce | None = None  # tensor parallel: sums the ranks' partial outputs

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = self.o_proj(self.attend(self.qkv_proj(h), cos, sin, kv_cache, meta))
        return out if self.all_reduce is None else self.all_reduce(out)

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """From the qkv projection's output [T, (H + 2 KVH) * D]: RoPE, the KV write and
        attention; returns the heads' outputs [T, H * D] (the output projection's input)."""
        t = qkv.shape[0]
        if self.fused and self.backend.fuses_rope:
            # RoPE, KV write and attention in two kernels (Triton backend).
            out = self.backend.forward_qkv(qkv, cos, sin, kv_cache, meta, self.scale, self.num_heads)
        else:
            # Queries and keys are rotated together, in one pass over [T, H + KVH, D].
            qk = qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim)
            rotated = _fused().rope_(qk, cos, sin) if self.fused else apply_rope(qk, cos, sin)
            q, k = rotated.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
            out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return out.reshape(t, self.q_size)


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused = False
        self.all_reduce: AllReduce | None = None  # tensor parallel: sums the ranks' partial outputs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(h)
        if self.fused:
            out = self.down_proj(_fused().silu_and_mul(gate_up))
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            out = self.down_proj(F.silu(gate) * up)
        return out if self.all_reduce is None else self.all_reduce(out)


class DecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm MLP block, each with a residual."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.self_attn = Attention(config, backend)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # One token (decode at batch 1) through the Triton GEMVs (node/model/gemv.py); set by
        # LlamaForCausalLM.use_fused_kernels when ULTRAKV_KERNELS picks them.
        self.gemv = False

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """``h``: the previous block's output, not yet added to ``residual`` (the stream up to
        it; None before the first layer). Returns this layer's MLP output and the stream."""
        if self.gemv and h.shape[0] == 1:
            return self._forward_one_token(h, residual, cos, sin, kv_cache, meta)
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual

    def _forward_one_token(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                           sin: torch.Tensor, kv_cache: torch.Tensor,
                           meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # Six launches: add + norm + qkv, RoPE + KV write, attention, o, add + norm + gate/up
        # + SwiGLU, down.
        gemv = _gemv()
        attn, mlp = self.self_attn, self.mlp
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = gemv.norm_gemv(h, residual, ln1.weight, ln1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias)
        h = gemv.gemv(attn.attend(qkv, cos, sin, kv_cache, meta), attn.o_proj.weight, attn.o_proj.bias)
        if attn.all_reduce is not None:  # tensor parallel: the ranks' partial sums (bias on rank 0 only)
            h = attn.all_reduce(h)
        act, residual = gemv.norm_gemv(h, residual, ln2.weight, ln2.eps, mlp.gate_up_proj.weight, silu=True)
        out = gemv.gemv(act, mlp.down_proj.weight)
        return out if mlp.all_reduce is None else mlp.all_reduce(out), residual


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend):
        super().__init__()
        # An explicit weight skips nn.Embedding's normal_ init, which on the meta device
        # imports torch._dynamo (1-3 s of a node's start); the loader fills every weight anyway.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder for Llama 2/3, Qwen2 and Mistral over a flat batch of new tokens.

    ``forward`` runs the ``T`` new tokens of a step (see ``ultrakv.node.attention.base`` for
    the batch and cache layout) and returns their final hidden states; ``compute_logits``
    turns the rows the sampler needs into float32 logits.
    """

    def __init__(self, config: ModelConfig, attn: AttentionBackend):
        super().__init__()
        self.config = config
        self.attn = attn
        self.rotary = RotaryEmbedding(config)
        self.model = LlamaModel(config, attn)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.packed_lm_head: PackedLinear | None = None  # see use_packed_weights
        # Called with a layer's index before the layer reads the KV caches: the KV tiers'
        # layer-wise loads put that layer's loaded blocks in place then (KVTiers.layer_ready).
        self.kv_ready: Callable[[int], None] | None = None
        # One row's logits through the Triton GEMV (set with the layers' GEMV path).
        self.gemv_logits = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """``input_ids``/``positions`` [T] -> hidden states [T, hidden_size].

        ``kv_caches`` holds one ``[2, num_blocks, block_size, kv_heads, head_dim]`` tensor
        per layer; the new tokens' keys and values are written into it.
        """
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"kv_caches must have {len(self.model.layers)} entries (one per "
                             f"layer), got {len(kv_caches)}")
        h = self.model.embed_tokens(input_ids)
        # Gathered once per step (one launch for both tables) and shared by every layer.
        rows = self.rotary.stacked(input_ids.device, h.dtype)[positions]
        cos, sin = rows[:, 0].unsqueeze(1), rows[:, 1].unsqueeze(1)
        residual = None
        ready = self.kv_ready
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            if ready is not None:
                ready(i)
            h, residual = layer(h, residual, cos, sin, kv_cache, meta)
        return self.model.norm(h, residual)[0]

    def use_fused_kernels(self, enabled: bool = True) -> None:
        """Switch the Triton kernels of ``fused_kernels`` on (norm + residual add, RoPE,
        SwiGLU activation) or off; with ``ULTRAKV_KERNELS=gemv=triton`` a one-token step also
        runs its projections through ``gemv`` (norms and SwiGLU fused in). They need Triton
        and the model on CUDA (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``, which the
        tests use); capture CUDA graphs after switching, not before."""
        if enabled:
            device = next(self.parameters()).device
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"fused_kernels needs the model on a CUDA device, got {device}")
            if self.config.head_dim & (self.config.head_dim - 1):
                raise ValueError(f"fused_kernels needs a power-of-two head_dim, got {self.config.head_dim}")
            _fused()  # import now: a missing Triton fails here, not in the first step
        gemv = enabled and kernel_variants.current().gemv == "triton"
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = enabled
            elif isinstance(module, DecoderLayer):
                module.gemv = gemv
        self.gemv_logits = gemv

    def use_all_reduce(self, all_reduce: AllReduce | None) -> None:
        """Make this model one rank's slice of a tensor-parallel model (built from a
        ``node.parallel.sharding.shard_config``): the attention output and MLP down
        projections sum their partial outputs with ``all_reduce``. None: a whole model."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.all_reduce = all_reduce

    def use_packed_weights(self) -> None:
        """Run every matrix product through oneDNN over packed weights (``packed_linear``):
        a float32 model on a CPU, after its weights are loaded, for inference only. The
        projections' dense weights are replaced (no extra memory); the output projection
        gets a packed copy and a single-row copy beside its dense weight (a tied one is the
        embedding's rows): ``vocab_size * hidden_size`` floats twice more."""
        device, dtype = self.model.embed_tokens.weight.device, self.model.embed_tokens.weight.dtype
        if not packing_available(device, dtype):
            raise ValueError(f"packed weights need a float32 model on a CPU with oneDNN, got {dtype} on {device}")
        for module in list(self.modules()):
            if isinstance(module, Attention):
                module.qkv_proj, module.o_proj = PackedLinear.of(module.qkv_proj), PackedLinear.of(module.o_proj)
            elif isinstance(module, MLP):
                module.gate_up_proj = PackedLinear.of(module.gate_up_proj)
                module.down_proj = PackedLinear.of(module.down_proj)
            elif isinstance(module, DecoderLayer):
                module.gemv = False  # the GEMVs read dense weights
        self.gemv_logits = False
        self.packed_lm_head = PackedLinear(self.lm_head_weight, row_copy=True)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Hidden states [N, hidden_size] -> logits [N, vocab_size], float32 (``upcast``) or
        in the model's dtype (for an argmax, which the exact upcast cannot change)."""
        if self.packed_lm_head is not None:
            return self.packed_lm_head(hidden)
        if self.gemv_logits and hidden.shape[0] == 1:
            # Batch-1 decode: the whole vocabulary matrix is read for one row; with the
            # weights cold the GEMV reads llama-1b's at 3.0 TB/s, cuBLAS at 2.8.
            logits = _gemv().gemv(hidden.contiguous(), self.lm_head_weight)
        else:
            logits = F.linear(hidden, self.lm_head_weight)
        return logits.float() if upcast else logits

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection: the embedding matrix when embeddings are tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ------------------------------------------------------------------ checkpoint loading

    def checkpoint_names(self) -> list[str]:
        """Every tensor name a Hugging Face checkpoint of this model must provide."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if self.lm_head is not None:
            names.append("lm_head.weight")
        c = self.config
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                      p + "self_attn.o_proj.weight", p + "mlp.down_proj.weight",
                      p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
            names += [f"{p}self_attn.{x}_proj.weight" for x in "qkv"]
            if c.attention_bias:
                names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"]
            if c.o_proj_bias:
                names.append(p + "self_attn.o_proj.bias")
        return names

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the parameters; returns the names loaded.

        Raises ValueError naming the tensor for an unknown name or a shape mismatch.
        Tensors the model does not use (``rotary_emb.inv_freq``, a tied ``lm_head``) are
        skipped and not returned.
        """
        params = dict(self.named_parameters())
        c = self.config
        qkv_slices = {"q_proj": (0, c.q_size), "k_proj": (c.q_size, c.kv_size),
                      "v_proj": (c.q_size + c.kv_size, c.kv_size)}
        gate_up_slices = {"gate_proj": (0, c.intermediate_size),
                          "up_proj": (c.intermediate_size, c.intermediate_size)}
        loaded: set[str] = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name.endswith("rotary_emb.inv_freq") or (
                        name == "lm_head.weight" and self.lm_head is None):
                    continue
                target, rows = _fused_target(name, qkv_slices, "qkv_proj")
                if target is None:
                    target, rows = _fused_target(name, gate_up_slices, "gate_up_proj")
                if target is None:
                    target = name
                param = params.get(target)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the "
                                     f"{c.architecture} model (wrong architecture or config?)")
                dest = param if rows is None else param.narrow(0, rows[0], rows[1])
                if tuple(dest.shape) != tuple(tensor.shape):
                    raise ValueError(f"checkpoint tensor {name!r} must have shape "
                                     f"{tuple(dest.shape)}, got {tuple(tensor.shape)}")
                dest.copy_(tensor)
                loaded.add(name)
        return loaded


_FUSED_KERNELS = None


def _fused():
    """The fused-kernel module, imported on first use (it needs Triton)."""
    global _FUSED_KERNELS
    if _FUSED_KERNELS is None:
        try:
            from ultrakv.node.model import fused_kernels
        except ImportError as exc:
            raise ValueError(f"fused_kernels needs Triton, which does not import here: {exc}") from None
        _FUSED_KERNELS = fused_kernels
    return _FUSED_KERNELS


@functools.cache
def _gemv():
    """The Triton GEMV module, imported on first use (the fused kernels are on: Triton is there)."""
    from ultrakv.node.model import gemv

    return gemv


def _fused_target(name: str, slices: dict[str, tuple[int, int]],
                  fused: str) -> tuple[str | None, tuple[int, int] | None]:
    """``...self_attn.k_proj.weight`` -> (``...self_attn.qkv_proj.weight``, (start, rows))."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in slices:
        return ".".join([*parts[:-2], fused, parts[-1]]), slices[parts[-2]]
    return None, None
