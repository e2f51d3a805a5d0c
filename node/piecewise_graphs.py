"""CUDA graphs of an eager step's layers around its attention, one set per token count.

An eager step (several sequences, or a prompt past the prefill graphs) launched every kernel
from Python: about 130 launches for llama-1b, 8-11 ms of host time on the lent H100s' hosts
where its device time is 2 ms at 200 tokens (``benchmarks/profile_eager_host.py``). Its
attention cannot be captured once for all such steps: its launch depends on the batch's
sequences. Everything else depends only on the step's token count, and eager steps run at a
fixed set of padded counts (node/step_shapes.py). So for each count up to
``PIECEWISE_MAX_TOKENS`` the forward is captured in ``L + 1`` pieces:

* piece 0: the embedding, the RoPE rows of the step's positions, layer 0's input norm and
  QKV projection;
* piece i (1..L-1): layer i-1's output projection, its residual add and norm, its MLP, then
  layer i's residual add, input norm and QKV projection;
* piece L: the last layer's output projection and MLP, and the final norm.

Between pieces the attention (RoPE, the KV write and the paged attention) runs eagerly on the
pieces' static buffers. A forward then costs ``L + 1`` replays, ``L`` attention launches
and ``L`` copies instead of every launch. Every tensor that lives from one piece to the next
is a static buffer allocated outside the graphs; what a piece allocates inside is dead when
it ends, so all pieces share one memory pool. Off under tensor parallelism (its all-reduces
run inside the projections) and for models other than the Llama family's layout.
"""

from __future__ import annotations

import logging
import time

import torch
from ultrakv.node.attention.base import AttentionMetadata
from ultrakv.node.step_shapes import token_buckets

log = logging.getLogger("ultrakv.node.piecewise_graphs")

# Above this many tokens a step's device time covers its launches (2304 tokens of llama-1b:
# 9 ms of each), so the pieces are not worth their capture time and memory.
PIECEWISE_MAX_TOKENS = 2048


class PiecewiseForward:
    """The model's forward in pieces around its attention layers: replaying the pieces
    captured for each token count by :meth:`capture_all`, or running them eagerly
    (``forward(..., replay=False)``: the reference the tests compare on a CPU)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_tokens: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.layers = list(model.model.layers)
        c = model.config
        dtype = next(model.parameters()).dtype
        self.sizes = [n for n in token_buckets(max_tokens) if n <= PIECEWISE_MAX_TOKENS]
        m = self.sizes[-1] if self.sizes else 0
        attn = self.layers[0].self_attn
        qkv_width = attn.q_size + 2 * attn.kv_size

        def buf(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        self.input_ids, self.positions = buf(m, dt=torch.int64), buf(m, dt=torch.int64)
        self.residual = buf(m, c.hidden_size)
        self.qkv = buf(m, qkv_width)
        self.rope = buf(m, 2, c.head_dim)  # the positions' (cos, sin) rows
        self.attn_out = buf(m, attn.q_size)
        self.hidden = buf(m, c.hidden_size)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    @staticmethod
    def supports(model: object) -> bool:
        """Whether ``model`` has the layout the pieces assume (a whole Llama-family model)."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(model, torch.nn.Module) or not layers:
            return False
        return all(getattr(layer.self_attn, "all_reduce", None) is None
                   and getattr(layer.mlp, "all_reduce", None) is None for layer in layers)

    def covers(self, num_tokens: int) -> bool:
        return num_tokens in self.graphs

    # -- the pieces ----------------------------------------------------------------------

    def _piece(self, i: int, n: int) -> None:
        """Piece ``i`` on the first ``n`` rows of the static buffers."""
        res = self.residual[:n]
        if i == 0:
            h = self.model.model.embed_tokens(self.input_ids[:n])
            self.rope[:n].copy_(self.model.rotary.stacked(self.device, h.dtype)[self.positions[:n]])
            res.copy_(h)
            self.qkv[:n].copy_(self.layers[0].self_attn.qkv_proj(self.layers[0].input_layernorm(h)))
            return
        prev = self.layers[i - 1]
        x = self._add_norm(prev.post_attention_layernorm, prev.self_attn.o_proj(self.attn_out[:n]), res)
        m = prev.mlp(x)
        if i < len(self.layers):
            layer = self.layers[i]
            self.qkv[:n].copy_(layer.self_attn.qkv_proj(self._add_norm(layer.input_layernorm, m, res)))
        else:
            self.hidden[:n].copy_(self._add_norm(self.model.model.norm, m, res))

    @staticmethod
    def _add_norm(norm: torch.nn.Module, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """norm(res + x), with res + x stored back into ``res`` (the fused norm does so in
        place; the unfused one returns the sum)."""
        out, total = norm(x, res)
        if total is not res:
            res.copy_(total)
        return out

    def _attend(self, i: int, n: int, meta: AttentionMetadata) -> None:
        rope = self.rope[:n]
        cos, sin = rope[:, 0].unsqueeze(1), rope[:, 1].unsqueeze(1)
        self.attn_out[:n].copy_(self.layers[i].self_attn.attend(self.qkv[:n], cos, sin, self.kv_caches[i], meta))

    # -- running -------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                replay: bool = True) -> torch.Tensor:
        """Hidden states [T, hidden] (a view of a static buffer, valid until the next call)
        of a step of ``T = len(input_ids)`` tokens: its pieces replayed when captured for
        ``T`` and ``replay``, else run eagerly."""
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        graphs = self.graphs.get(n) if replay else None
        ready = getattr(self.model, "kv_ready", None)
        for i in range(len(self.layers) + 1):
            if graphs is not None:
                graphs[i].replay()
            else:
                self._piece(i, n)
            if i < len(self.layers):
                if ready is not None:
                    ready(i)
                self._attend(i, n, meta)
        return self.hidden[:n]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every piece at every token count (after warmup compiled the kernels and
        met cuBLAS's shapes); returns how many graphs were captured."""
        t0 = time.monotonic()
        stream = torch.cuda.Stream(self.device)
        # Captured on a stream of this runner's device: torch's default capture stream is one
        # per process, made on whichever device captured first (see CudaGraphRunner._capture).
        capture_stream = torch.cuda.Stream(self.device)
        for n in self.sizes:
            # One eager run on a side stream first, as torch's capture guide asks.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in range(len(self.layers) + 1):
                    self._piece(i, n)
            torch.cuda.current_stream().wait_stream(stream)
            pieces = []
            for i in range(len(self.layers) + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream):
                    self._piece(i, n)
                pieces.append(graph)
            self.graphs[n] = pieces
        count = sum(len(pieces) for pieces in self.graphs.values())
        log.info("captured %d piecewise graphs (%d token counts up to %d) in %.1f s", count, len(self.sizes),
                 self.sizes[-1] if self.sizes else 0, time.monotonic() - t0)
        return count
