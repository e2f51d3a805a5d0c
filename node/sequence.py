"""A sequence: one request's tokens, where its KV lives, and how far it has been computed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch
from ultrakv.node.chat import ChatMessage
from ultrakv.node.outputs import RequestKey
from ultrakv.node.sampling_params import Priority, SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """The scheduler's unit of work.

    ``token_ids`` is the whole context: (session history +) prompt + generated tokens.
    ``num_computed_tokens`` of them have their KV in the blocks of ``block_table``; the rest
    are computed in later steps (a long prompt in several chunks, then one token per step).
    A preempted sequence drops its blocks and goes back to computed=0; on readmission it
    finds most of them again through the prefix cache.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    priority: Priority = Priority.NORMAL
    session_id: str | None = None
    salt: str = ""
    tenant: str = ""  # who asked: with ``request_id``, the sequence's key (see ``key``)
    deadline: float | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # The chat conversation this turn renders (None for text and token prompts); the
    # session keeps it, with the reply, for its next turn.
    conversation: list[ChatMessage] | None = None
    # A resumed turn (its first attempt's node failed mid-stream): the tokens that attempt
    # generated, now at the end of the prompt; the reply the session keeps begins with them.
    resumed_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # KV found in the cache at first admission (reported)
    num_committed_blocks: int = 0  # leading full blocks registered in the prefix table
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    # Known chained hashes of leading full blocks of ``token_ids`` (a session's history, or
    # what this sequence had before a preemption), so prefix matching hashes only the rest.
    prefix_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    admitted_once: bool = False
    first_token_time: float | None = None
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # Detokenize as tokens arrive (a stream shows text deltas, or stop strings need the
    # text); otherwise the text is decoded once, when the sequence finishes.
    incremental_text: bool = True
    # incremental detokenization state (offsets into the generated tokens)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    emitted_text_len: int = 0
    emitted_tokens: int = 0

    @property
    def key(self) -> RequestKey:
        """The sequence's name among those running: request ids are unique per tenant only."""
        return RequestKey(self.tenant, self.request_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
