"""Model shape and hyper-parameters: one typed dataclass, parsed from a Hugging Face config.json.

Supported architectures are the Llama family that share one decoder: Llama 2/3
(``LlamaForCausalLM``), Qwen2 (``Qwen2ForCausalLM``, bias on q/k/v) and Mistral
(``MistralForCausalLM``).

Mistral's (and Qwen2's) ``sliding_window`` is ignored: attention is always full causal,
which equals sliding-window attention for contexts no longer than the window (4096 for
Mistral-7B v0.1; later Mistral releases set it to null).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("llama3", "linear")
TORCH_DTYPES = ("float32", "float16", "bfloat16")

# config.json "architectures" entry -> our architecture name.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """Everything the decoder needs to know about its shape.

    ``rope_scaling`` is None (plain RoPE) or a dict with ``rope_type`` ``"llama3"`` (keys
    ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``) or ``"linear"`` (key ``factor``).
    ``attention_bias`` puts a bias on the q/k/v projections (Qwen2 always; Llama when its
    config says so); ``o_proj_bias`` on the output projection (Llama's ``attention_bias``
    covers o_proj too, Qwen2's does not).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    o_proj_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check(self.architecture in ARCHITECTURES, "architecture", f"one of {ARCHITECTURES}",
               self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, ">= 1", value)
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
               f"a multiple of num_key_value_heads ({self.num_key_value_heads})",
               self.num_attention_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (RoPE rotates pairs)", self.head_dim)
        _check(self.rms_norm_eps > 0, "rms_norm_eps", "> 0", self.rms_norm_eps)
        _check(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        _check(self.torch_dtype in TORCH_DTYPES, "torch_dtype", f"one of {TORCH_DTYPES}",
               self.torch_dtype)
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            _check(rope_type in ROPE_TYPES, "rope_scaling.rope_type",
                   f"one of {ROPE_TYPES} (or rope_scaling null)", rope_type)
            needed = _LLAMA3_ROPE_KEYS if rope_type == "llama3" else ("factor",)
            for key in needed:
                _check(key in self.rope_scaling, f"rope_scaling.{key}",
                       f"present for rope_type {rope_type!r}", None)
            _check(float(self.rope_scaling["factor"]) > 0, "rope_scaling.factor", "> 0",
                   self.rope_scaling["factor"])

    @property
    def q_size(self) -> int:
        """Width of the query projection (num_attention_heads * head_dim)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projections (num_key_value_heads * head_dim)."""
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (used for fingerprints and logs)."""
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parse a Hugging Face ``config.json`` dict.

        Reads both the classic ``rope_theta`` + ``rope_scaling`` keys and the
        ``rope_parameters`` dict that transformers >= 5 writes.
        """
        archs = hf.get("architectures") or []
        known = [_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES]
        if not known:
            # Configs saved from a bare *Config object carry no "architectures"; fall back
            # on model_type, which every HF config has.
            model_type = hf.get("model_type")
            if model_type in ARCHITECTURES and not archs:
                known = [model_type]
            else:
                raise ValueError(
                    f"architectures must contain one of {sorted(_HF_ARCHITECTURES)}, "
                    f"got {archs!r} (model_type {model_type!r})")
        arch = known[0]
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias must be false (biased MLPs are not supported), got true")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {act!r}")

        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _parse_rope(hf)
        if arch == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, list)
                                          else [int(eos)])
        bos = hf.get("bos_token_id")
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype),
        )


def _parse_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf.get("rope_scaling") or {})
    # Older configs spell the key "type"; "default" means no scaling.
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if rope_type in (None, "default"):
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}


def _check(ok: bool, name: str, limit: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {limit}, got {got!r}")
