"""Build a ready model from a preset name, a local Hugging Face checkpoint directory or a GGUF file.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
listed by ``model.safetensors.index.json``; ``tokenizer.json`` is optional (the byte
tokenizer is used without it). A ``.gguf`` file is converted once into such a directory
(cached under its sha256; see gguf_checkpoint.py). Packaged models (``smollm2-135m``) are
GGUF files inside an installed distribution. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from ultrakv.node.attention.base import AttentionBackend
from ultrakv.node.model.config import ModelConfig
from ultrakv.node.model.gguf_checkpoint import converted_checkpoint, file_sha256
from ultrakv.node.model.llama import LlamaForCausalLM
from ultrakv.node.model.packaged import PACKAGED
from ultrakv.node.model.presets import PRESETS, init_random_weights, preset_config
from ultrakv.node.parallel.sharding import WHOLE, TensorShard, shard_checkpoint_tensor, shard_config
from ultrakv.node.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
log = logging.getLogger("ultrakv.node.model")


@dataclass
class LoadedModel:
    """A model ready to run, with what the engine needs to know about it.

    ``fingerprint`` is a stable hash of the config and the weights' source (preset name,
    seed, device type and dtype; or the checkpoint's file names and sizes). Two nodes agree
    on it exactly when their KV caches are interchangeable. ``config`` is the whole model's;
    under tensor parallelism ``model`` is one rank's slice (``model.config`` its shape).
    """

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    fingerprint: str
    dtype: torch.dtype


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> the checkpoint's dtype on CUDA, float32 elsewhere; else the named dtype."""
    if dtype == "auto":
        return _DTYPES[checkpoint_dtype] if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {('auto', *_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def build_empty_model(config: ModelConfig, attn: AttentionBackend, dtype: torch.dtype,
                      device: torch.device) -> LlamaForCausalLM:
    """The model with uninitialised parameters allocated once, directly in dtype on device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, attn)
    # Parameter by parameter rather than `to_empty`: its meta-device path imports
    # torch.fx's symbolic shapes and sympy, half a second of every node's start.
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(
                torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, torch.empty(
                buf.shape, dtype=dtype if buf.is_floating_point() else buf.dtype, device=device),
                persistent=name not in module._non_persistent_buffers_set)
    model.rotary.stacked(device, dtype)  # build the RoPE tables now, not inside the first step
    return model.eval().requires_grad_(False)


def load_model(name_or_path: str, dtype: str, device: torch.device, attn: AttentionBackend,
               seed: int = 0, shard: TensorShard = WHOLE) -> LoadedModel:
    """Load preset ``name_or_path`` (seeded random weights), a packaged model, a ``.gguf``
    file or the checkpoint directory there; only ``shard``'s slice of it (tensor parallelism).

    Raises FileNotFoundError for a missing directory, file, package, config.json or weight
    file, and ValueError for an unsupported config, a missing / misshapen tensor (named) or a
    packaged file whose sha256 is not the expected one.
    """
    device = torch.device(device)
    if name_or_path in PRESETS:
        return _load_preset(name_or_path, dtype, device, attn, seed, shard)
    if name_or_path in PACKAGED:
        packaged = PACKAGED[name_or_path]
        return _load_gguf(packaged.locate(), dtype, device, attn, shard, name=packaged.name,
                          sha256=packaged.sha256)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return _load_gguf(path, dtype, device, attn, shard, name=path.stem)
    return _load_checkpoint(path, dtype, device, attn, shard)


def _load_gguf(path: Path, dtype: str, device: torch.device, attn: AttentionBackend, shard: TensorShard, *,
               name: str, sha256: str | None = None) -> LoadedModel:
    started = time.monotonic()
    actual = file_sha256(path)
    if sha256 is not None and actual != sha256:
        raise ValueError(f"model file {str(path)!r} must have sha256 {sha256}, got {actual} "
                         "(a damaged or different download; reinstall the package)")
    directory = converted_checkpoint(path, actual)
    loaded = _load_checkpoint(directory, dtype, device, attn, shard)
    loaded.name = name
    loaded.fingerprint = _fingerprint(loaded.config, f"gguf:{actual}", loaded.dtype)
    log.info("loaded %s from %s in %.1f s", name, path.name, time.monotonic() - started)
    return loaded


def _load_preset(name: str, dtype: str, device: torch.device, attn: AttentionBackend,
                 seed: int, shard: TensorShard) -> LoadedModel:
    config = preset_config(name)
    torch_dtype = resolve_dtype(dtype, config.torch_dtype, device)
    model = build_empty_model(shard_config(config, shard.size), attn, torch_dtype, device)
    init_random_weights(model, seed, config, shard)
    # Random draws differ between CPU and CUDA generators, hence the device type.
    source = f"preset:{name}:seed={seed}:device={device.type}"
    return LoadedModel(model=model, config=config, tokenizer=ByteTokenizer(), name=name,
                       fingerprint=_fingerprint(config, source, torch_dtype), dtype=torch_dtype)


def _load_checkpoint(path: Path, dtype: str, device: torch.device,
                     attn: AttentionBackend, shard: TensorShard = WHOLE) -> LoadedModel:
    if not path.is_dir():
        raise FileNotFoundError(
            f"model must be a preset {sorted([*PRESETS, *PACKAGED])}, a .gguf file or a checkpoint directory; "
            f"{str(path)!r} is neither")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} has no config.json")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    files = _weight_files(path)
    torch_dtype = resolve_dtype(dtype, config.torch_dtype, device)
    model = build_empty_model(shard_config(config, shard.size), attn, torch_dtype, device)

    loaded: set[str] = set()
    for file in files:
        # Read on CPU and copy into place: the copy casts dtype and moves to the device
        # one tensor at a time, so host memory never holds the whole model twice.
        with safe_open(str(file), framework="pt", device="cpu") as f:
            loaded |= model.load_weights((key, shard_checkpoint_tensor(key, f.get_tensor(key), shard))
                                         for key in f.keys())
    missing = [n for n in model.checkpoint_names() if n not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint {str(path)!r} is missing tensor {missing[0]!r}{more}")

    sizes = sorted((f.name, f.stat().st_size) for f in [config_file, *files])
    source = "checkpoint:" + ";".join(f"{n}={s}" for n, s in sizes)
    return LoadedModel(model=model, config=config, tokenizer=load_tokenizer(path, config),
                       name=path.name, fingerprint=_fingerprint(config, source, torch_dtype),
                       dtype=torch_dtype)


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{INDEX_FILE} in {str(path)!r} must have a non-empty weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"weight file {file.name!r} listed in {INDEX_FILE} "
                                        f"is missing from {str(path)!r}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"checkpoint {str(path)!r} has no {SINGLE_FILE} or {INDEX_FILE}")


def _fingerprint(config: ModelConfig, source: str, dtype: torch.dtype) -> str:
    blob = json.dumps({"config": config.to_dict(), "source": source, "dtype": str(dtype)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
