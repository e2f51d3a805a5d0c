"""Chat prompts: messages rendered into the model's prompt text by its chat template.

The template is the model's own jinja2 template (from ``chat_template.jinja``,
``tokenizer_config.json`` or the GGUF's ``tokenizer.chat_template``), rendered in a sandboxed
environment with the variables Hugging Face templates expect (``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``,
``strftime_now``). A model without a template gets ChatML.

Sessions speak chat: a session remembers its conversation, and a new turn renders the whole
conversation again but prefills only what follows the tokens the session already holds
(:func:`template_delta`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")

# For models that ship no template (the synthetic presets, bare checkpoints).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"content must be a string, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def parse_messages(messages: Iterable[ChatMessage | Mapping[str, Any]]) -> list[ChatMessage]:
    """ChatMessages from ChatMessage objects or ``{"role": ..., "content": ...}`` dicts."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            out.append(m)
        elif isinstance(m, Mapping):
            try:
                out.append(ChatMessage(str(m.get("role", "")), m.get("content", "")))
            except ValueError as exc:
                raise ValueError(f"messages[{i}].{exc}") from None
        else:
            raise ValueError(f"messages[{i}] must be a dict with role and content, got {type(m).__name__}")
    return out


def is_chat(prompt: object) -> bool:
    """Whether a prompt is a list of chat messages (rather than text or token ids)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], ChatMessage | Mapping)


class ChatTemplate:
    """A compiled chat template. ``bos_token``/``eos_token`` are the texts templates insert."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML_TEMPLATE
        self.is_default = source is None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _environment().from_string(self.source)

    def __getstate__(self) -> dict:
        # Pickled without the compiled template (it holds the environment's lambdas): a
        # node's engine core sends its tokenizer to the node process (node/engine_core.py).
        return {k: v for k, v in self.__dict__.items() if k != "_template"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._template = _environment().from_string(self.source)

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``; with ``add_generation_prompt`` it ends by opening
        the assistant's turn. Raises ValueError when the template refuses the conversation
        (e.g. roles out of order)."""
        try:
            return self._template.render(
                messages=[m.to_dict() for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise ValueError(f"messages are refused by the chat template: {exc}") from None


def template_delta(rendered: str, held_text: str) -> str | None:
    """The part of ``rendered`` (the whole conversation) after ``held_text`` (the text of the
    tokens a session already holds), or None when the conversation does not continue it
    (the session's reply was cut by a stop string or max_tokens, or the template rewrites
    earlier turns)."""
    return rendered[len(held_text):] if rendered.startswith(held_text) else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates are data from a model file: sandboxed, so they cannot reach Python objects.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    # jinja2's own tojson escapes HTML; templates expect plain JSON.
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
