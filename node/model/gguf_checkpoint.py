"""GGUF files (llama.cpp's format) converted into a Hugging Face checkpoint directory.

A GGUF holds the config as ``llama.*`` metadata, quantized tensors under llama.cpp's names,
and the tokenizer as vocabulary, merges and special-token ids. :func:`convert_gguf` reads it
with the ``gguf`` package (no transformers) and writes an ordinary checkpoint directory
(``config.json``, ``model.safetensors`` in float32, ``tokenizer.json``,
``tokenizer_config.json``) that the checkpoint loader reads like any other. The directory is
cached under the file's sha256, so only the first start pays for parsing and dequantizing.

Two things llama.cpp's converter changes, undone here: the rows of ``attn_q``/``attn_k`` are
permuted (each head's two RoPE halves interleaved), and a model with tied embeddings has no
``output.weight``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

log = logging.getLogger("ultrakv.node.model.gguf")

ARCHITECTURES = ("llama",)
# llama.cpp token types (gguf.TokenType): CONTROL tokens are special; USER_DEFINED are added
# tokens matched whole in text but kept in decoded output.
_CONTROL, _USER_DEFINED = 3, 4
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$ULTRAKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/ultrakv``, else ``~/.cache/ultrakv``."""
    if os.environ.get("ULTRAKV_CACHE_DIR"):
        return Path(os.environ["ULTRAKV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ultrakv"


def converted_checkpoint(path: Path, sha256: str | None = None, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory converted from GGUF ``path``: from the cache when it is there
    (keyed by the file's sha256), else converted now and cached. Several processes may race
    to convert; each writes a private directory and the first rename wins."""
    sha256 = sha256 or file_sha256(path)
    target = (cache_dir or default_cache_dir()) / "gguf" / sha256
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=target.parent))
    try:
        convert_gguf(path, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s to %s in %.1f s (cached for the next start)", path.name, target,
             time.monotonic() - started)
    return target


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Write the checkpoint directory for GGUF ``path`` into ``out_dir``.

    Raises ValueError naming the key for an unsupported architecture, tokenizer or tensor.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = _Metadata(reader)
    hf_config = gguf_config(meta)
    tensors = dict(hf_tensors(reader, hf_config))
    if "lm_head.weight" not in tensors:
        hf_config["tie_word_embeddings"] = True
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"))
    tokenizer, tokenizer_config = gguf_tokenizer(meta)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


class _Metadata:
    """GGUF key-value metadata, read lazily (the vocabulary arrays are large)."""

    def __init__(self, reader: Any):
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise ValueError(f"GGUF metadata must have {key!r}")
        return self.get(key)


def gguf_config(meta: _Metadata) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict from the ``<arch>.*`` metadata."""
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"general.architecture must be one of {ARCHITECTURES}, got {arch!r}")
    heads = int(meta.require(f"{arch}.attention.head_count"))
    hidden = int(meta.require(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or hidden // heads)
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.require("tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length") or 4096),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta.require(f"{arch}.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"{arch}.rope.scaling.type must be 'linear' or 'none', got {scaling!r}")
    return config


def hf_tensors(reader: Any, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor dequantized to float32 under its Hugging Face name, q/k rows unpermuted."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_name(t.name)
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF lists dims innermost first; dequantize returns them outermost first.
        values = values.reshape([int(d) for d in reversed(t.shape)])
        if name.endswith("self_attn.q_proj.weight"):
            values = unpermute_rope_rows(values, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            values = unpermute_rope_rows(values, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(values))  # a copy: F32 tensors are read-only views of the file


def hf_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> the Hugging Face name (ValueError for one we don't know)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a llama model")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation. Hugging Face keeps each head's rows as [first half |
    second half] of the rotary pairs; llama.cpp interleaves them (row 2i from the first
    half, 2i+1 from the second) for its RoPE kernel."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tokenizer(meta: _Metadata) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers`` tokenizer the GGUF describes (byte-level BPE: ``tokenizer.ggml.model``
    ``gpt2``), and its ``tokenizer_config.json`` (special tokens, add_bos_token, chat template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {kind!r}")
    tokens = [str(t) for t in meta.require("tokenizer.ggml.tokens")]
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":  # llama.cpp splits digits one by one first
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    # A CONTROL token outside the byte alphabet would be a new id beyond the vocabulary.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED])

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config: dict[str, Any] = {"bos_token": special("bos_token_id"), "eos_token": special("eos_token_id")}
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        config["add_bos_token"] = bool(add_bos)
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return tok, config
