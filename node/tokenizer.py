"""Tokenizers: the checkpoint's ``tokenizer.json`` through ``tokenizers``, or raw bytes.

Whether a prompt starts with BOS is the tokenizer's own setting (``add_bos_token`` in
``tokenizer_config.json``, else what its post-processor adds), never the mere presence of a
``bos_token_id`` in the model config: SmolLM2's BOS id is ``<|im_start|>``, and a prompt
starting with it makes the model answer nonsense.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ultrakv.node.chat import ChatTemplate
from ultrakv.node.model.config import ModelConfig


class Tokenizer(ABC):
    """Text <-> token ids.

    ``vocab_size`` counts the ids the tokenizer can produce (the model's embedding may be
    larger). ``bos_token_id`` is prepended to prompts only where the tokenizer says so
    (``add_bos_token``). ``chat_template`` renders chat messages into prompt text.
    """

    vocab_size: int
    bos_token_id: int | None
    add_bos_token: bool
    eos_token_ids: list[int]
    chat_template: ChatTemplate

    @abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_bos`` the BOS id comes first if the tokenizer adds
        one (``add_bos_token``). Special tokens written in the text become their ids."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; broken UTF-8 becomes U+FFFD. Special ids are dropped unless
        ``skip_special_tokens`` is False (then they come back as their text)."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; BOS 256, EOS 257. Used by the presets and by checkpoints
    without a ``tokenizer.json``."""

    BOS = 256
    EOS = 257

    def __init__(self) -> None:
        self.vocab_size = 258
        self.bos_token_id = self.BOS
        self.add_bos_token = True
        self.eos_token_ids = [self.EOS]
        self.chat_template = ChatTemplate(None)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Ids >= 256 are BOS/EOS or ids only the (larger) model vocab has: no text.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A ``tokenizers`` tokenizer (from a checkpoint's ``tokenizer.json`` or built from a GGUF).

    ``add_bos_token`` is the tokenizer's setting (``tokenizer_config.json`` or the GGUF); when
    it is not stated, whether the post-processor puts a token before the text. EOS ids are the
    model config's, ``generation_config.json``'s (instruct models list their end-of-turn ids
    there) and the tokenizer's ``eos_token``.
    """

    def __init__(self, tokenizer: Any, *, model_config: ModelConfig | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool | None = None, extra_eos_ids: list[int] | None = None,
                 chat_template: str | None = None):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        bos = self._token_id(bos_token)
        if bos is None and model_config is not None:
            bos = model_config.bos_token_id
        self.bos_token_id = bos
        if add_bos_token is None:
            add_bos_token = self._post_processor_adds_prefix()
        self.add_bos_token = bool(add_bos_token) and bos is not None

        eos: list[int] = list(model_config.eos_token_ids) if model_config is not None else []
        eos += extra_eos_ids or []
        tok_eos = self._token_id(eos_token)
        if tok_eos is not None:
            eos.append(tok_eos)
        self.eos_token_ids = list(dict.fromkeys(int(e) for e in eos))
        self.chat_template = ChatTemplate(chat_template, bos_token=self._text(bos),
                                          eos_token=self._text(self.eos_token_ids[0] if self.eos_token_ids else None))

    @classmethod
    def from_directory(cls, path: str | Path, model_config: ModelConfig | None = None) -> HFTokenizer:
        """The tokenizer of a Hugging Face checkpoint directory (``tokenizer.json`` and, when
        present, ``tokenizer_config.json``, ``generation_config.json``, ``chat_template.jinja``)."""
        from tokenizers import Tokenizer as _RustTokenizer

        directory = Path(path)
        tok_cfg = _read_json(directory / "tokenizer_config.json")
        gen_eos = _read_json(directory / "generation_config.json").get("eos_token_id")
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else _config_template(tok_cfg)
        return cls(_RustTokenizer.from_file(str(directory / "tokenizer.json")), model_config=model_config,
                   bos_token=_token_text(tok_cfg.get("bos_token")),
                   eos_token=_token_text(tok_cfg.get("eos_token")),
                   add_bos_token=tok_cfg.get("add_bos_token"),
                   extra_eos_ids=gen_eos if isinstance(gen_eos, list) else ([] if gen_eos is None else [gen_eos]),
                   chat_template=template)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # BOS is added here, not by the post-processor, so that a session's later turns
        # (add_bos=False) never get one mid-conversation.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _post_processor_adds_prefix(self) -> bool:
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        return len(full) > len(plain) and full[len(full) - len(plain):] == plain and full[0] != plain[0]

    def _text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")

    def _token_id(self, token: str | None) -> int | None:
        return None if not token else self._tok.token_to_id(token)


def load_tokenizer(path: str | Path | None, model_config: ModelConfig) -> Tokenizer:
    """``<path>/tokenizer.json`` when present, else the byte tokenizer.

    Raises ValueError when the byte tokenizer's ids would not fit the model's vocabulary.
    """
    if path is not None and (Path(path) / "tokenizer.json").is_file():
        return HFTokenizer.from_directory(path, model_config)
    tok = ByteTokenizer()
    if model_config.vocab_size < tok.vocab_size:
        raise ValueError(f"vocab_size must be >= {tok.vocab_size} to use the byte tokenizer "
                         f"(no tokenizer.json in {path}), got {model_config.vocab_size}")
    return tok


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer configs
        token = token.get("content")
    return token or None


def _config_template(tok_cfg: dict[str, Any]) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None
