"""Tokenizers: the checkpoint's ``tokenizer.json`` through ``tokenizers``, or raw bytes."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ultrakv.node.model.config import ModelConfig


class Tokenizer(ABC):
    """Text <-> token ids.

    ``vocab_size`` counts the ids the tokenizer can produce (the model's embedding may be
    larger). ``decode`` drops special ids.
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: list[int]

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with the BOS id first when ``add_bos`` and there is one."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special ids are skipped, broken UTF-8 becomes U+FFFD."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; BOS 256, EOS 257. Used by the presets and by checkpoints
    without a ``tokenizer.json``."""

    BOS = 256
    EOS = 257

    def __init__(self) -> None:
        self.vocab_size = 258
        self.bos_token_id = self.BOS
        self.eos_token_ids = [self.EOS]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        # Ids >= 256 are BOS/EOS or ids only the (larger) model vocab has: no text.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library.

    BOS/EOS come from the model config, completed by ``generation_config.json`` (instruct
    models list their end-of-turn ids there) and the ``bos_token``/``eos_token`` of
    ``tokenizer_config.json``.
    """

    def __init__(self, path: str | Path, model_config: ModelConfig | None = None):
        from tokenizers import Tokenizer as _RustTokenizer

        directory = Path(path)
        self._tok = _RustTokenizer.from_file(str(directory / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tok_cfg = _read_json(directory / "tokenizer_config.json")
        gen_cfg = _read_json(directory / "generation_config.json")

        bos = model_config.bos_token_id if model_config is not None else None
        if bos is None:
            bos = self._token_id(tok_cfg.get("bos_token"))
        self.bos_token_id = bos

        eos: list[int] = list(model_config.eos_token_ids) if model_config is not None else []
        gen_eos = gen_cfg.get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else ([] if gen_eos is None else [gen_eos])
        tok_eos = self._token_id(tok_cfg.get("eos_token"))
        if tok_eos is not None:
            eos.append(tok_eos)
        self.eos_token_ids = list(dict.fromkeys(int(e) for e in eos))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Specials are added here, not by the tokenizer's post-processor, so that add_bos
        # means the same thing for every checkpoint.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer configs
            token = token.get("content")
        return None if not token else self._tok.token_to_id(token)


def load_tokenizer(path: str | Path | None, model_config: ModelConfig) -> Tokenizer:
    """``<path>/tokenizer.json`` when present, else the byte tokenizer.

    Raises ValueError when the byte tokenizer's ids would not fit the model's vocabulary.
    """
    if path is not None and (Path(path) / "tokenizer.json").is_file():
        return HFTokenizer(path, model_config)
    tok = ByteTokenizer()
    if model_config.vocab_size < tok.vocab_size:
        raise ValueError(f"vocab_size must be >= {tok.vocab_size} to use the byte tokenizer "
                         f"(no tokenizer.json in {path}), got {model_config.vocab_size}")
    return tok


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
