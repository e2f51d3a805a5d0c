"""The node engine: model + paged KV cache + sessions + continuous batching.

Usage::

    engine = Engine(EngineConfig(model="tiny", device="cpu"))
    outs = engine.generate([[1, 2, 3], "Hello"], SamplingParams(max_tokens=16, temperature=0.0))
    outs[0].token_ids, outs[0].text, outs[0].cached_tokens, outs[0].finish_reason

    async for delta in engine.stream(GenerateRequest(prompt="Hi", session_id="s1")):
        ...  # delta.token_ids, delta.text; the last delta has finished=True and .output

``generate`` drives the step loop on the calling thread; ``stream`` starts a background
thread that steps while there is work, so an asyncio server stays responsive. Every
state change happens under one lock, so both may be used together.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, replace

import torch
from ultrakv.cluster.block_hashing import chain_root, continue_chain, hash_token_blocks
from ultrakv.cluster.errors import (
    IncompatibleSessionError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    SessionNotFoundError,
)
from ultrakv.cluster.session_state import SessionState
from ultrakv.cluster.validation import SessionLayout, validate_history, validate_history_messages
from ultrakv.node import kernel_variants
from ultrakv.node.attention import get_backend
from ultrakv.node.attention.triton_backend import triton_available
from ultrakv.node.chat import ChatMessage, is_chat, parse_messages, template_delta
from ultrakv.node.config import EngineConfig
from ultrakv.node.cuda_graphs import CudaGraphRunner
from ultrakv.node.kv import quantization
from ultrakv.node.kv.block_pool import BlockPool
from ultrakv.node.kv.disk_tier import QUEUE_BLOCKS, DiskTier
from ultrakv.node.kv.host_tier import HostTier
from ultrakv.node.kv.tiers import CALIBRATION_BLOCKS, BlockIdentity, KVTiers, stacked_kv
from ultrakv.node.metrics import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, LatencyHistogram
from ultrakv.node.model.config import ModelConfig
from ultrakv.node.model.loader import load_model
from ultrakv.node.model.packed_linear import packing_available
from ultrakv.node.outputs import (
    GenerateRequest,
    PreparedTurn,
    Prompt,
    RequestKey,
    RequestOutput,
    SessionInfo,
    StreamDelta,
)
from ultrakv.node.parallel.sharding import TensorShard
from ultrakv.node.parallel.tensor_parallel import (
    TensorParallelGraphs,
    TensorParallelGroup,
    tensor_parallel_devices,
)
from ultrakv.node.piecewise_graphs import PiecewiseForward
from ultrakv.node.runner import ModelRunner
from ultrakv.node.sampling_params import Priority, SamplingParams
from ultrakv.node.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from ultrakv.node.sequence import Sequence
from ultrakv.node.sessions import Session, SessionStore, TurnConflictError
from ultrakv.node.speculative import accepted_prefix, propose_ngram

log = logging.getLogger("ultrakv.node.engine")

Listener = Callable[[StreamDelta], None]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# Decode steps per round on CUDA when the config leaves it open (see EngineConfig).
CUDA_SCHEDULER_STEPS = 32
# With nothing to run but requests waiting for disk reads, a step waits this long at most for
# one of the reads (a request arriving meanwhile waits no longer than that).
READ_WAIT_S = 0.005


def batch_of(prompts: list[Prompt] | Prompt,
             params: SamplingParams | list[SamplingParams] | None) -> tuple[list[Prompt], list[SamplingParams]]:
    """``generate``'s arguments as a list of prompts and one SamplingParams per prompt: a single
    prompt (text, token ids, or one chat conversation) becomes a batch of one."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    elif is_chat(prompts):
        prompts = [prompts]  # one conversation
    params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
    return prompts, params_list


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every device type it knows
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be 'cpu' or 'auto' on a machine without CUDA, got {device!r}")
    return dev


def zeroed_kv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV tensor. On CPU its memory comes from calloc (through numpy), whose
    zero pages the kernel maps on first touch: writing zeros into a whole pool up front took
    1-3 s of a node's start (256 MiB by default), and a pool's unused blocks need no memory."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= dim
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def zeroed_kv_layers(layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> list[torch.Tensor]:
    """One zeroed KV tensor per layer, views back to back into a single allocation: the
    KV tiers then gather or scatter a block's every layer in one kernel
    (``node.kv.tiers.stacked_kv``)."""
    return list(zeroed_kv((layers, *shape), dtype, device).unbind(0))


def kv_pool_blocks(config: EngineConfig, vocab_size: int, block_bytes: int, device: torch.device) -> int:
    """How many KV blocks of ``block_bytes`` ``device`` can hold (one tensor-parallel rank's
    heads under tensor parallelism): ``kv_memory_fraction`` of the free CUDA memory less room
    for activations, or ``cpu_kv_cache_bytes`` on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Leave room for activations of the largest step and the sampler's logits.
        reserve = 4 * config.max_num_batched_tokens * vocab_size + (1 << 30)
        budget = max(0, int(free * config.kv_memory_fraction) - reserve)
    else:
        budget = config.cpu_kv_cache_bytes
    blocks = budget // block_bytes
    if blocks < 2:
        raise ValueError(f"KV cache must hold >= 2 blocks; {budget} bytes gives {blocks}")
    return int(blocks)


def kv_block_bytes(block_size: int, model_config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one unquantized KV block over every layer (keys and values)."""
    mc = model_config
    return 2 * block_size * mc.num_key_value_heads * mc.head_dim * dtype.itemsize * mc.num_hidden_layers


def on_own_device(method):
    """Run an engine ``method`` with the engine's CUDA device current. Triton launches, side
    streams and the KV tiers' events go to the current device, and on a node driving several
    GPUs (data parallelism: an engine per device, called from any thread) that is another
    engine's device unless set: its steps failed with "Pointer argument cannot be accessed
    from Triton", and a session's export, import or the shutdown's tier writes would record
    their copy events on the wrong GPU's stream. Every public method that runs device work
    goes through here."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)
    return wrapped


class Engine:
    """One node's inference engine. See the module docstring."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        attn = get_backend(config.attention_backend, self.device)
        tp_size = config.tensor_parallel_size
        tp_devices = tensor_parallel_devices(self.device, tp_size) if tp_size > 1 else []
        loaded = load_model(config.model, config.dtype, self.device, attn, seed=config.seed,
                            shard=TensorShard(0, tp_size))
        self.model = loaded.model
        self.fused_kernels = (config.fused_kernels if config.fused_kernels is not None
                              else self.device.type == "cuda" and triton_available())
        if self.fused_kernels:
            self.model.use_fused_kernels(True)
        # A float32 model on a CPU runs its matrix products through oneDNN over packed weights
        # (node/model/packed_linear.py); tensor-parallel ranks keep the plain layout.
        if tp_size == 1 and packing_available(self.device, next(self.model.parameters()).dtype):
            self.model.use_packed_weights()
        self.num_scheduler_steps = config.num_scheduler_steps or (
            CUDA_SCHEDULER_STEPS if self.device.type == "cuda" else 1)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.model_fingerprint = loaded.fingerprint
        self.attention_backend = attn.name
        self.dtype = next(self.model.parameters()).dtype
        # What the KV cache stores (the model dtype, or int8 / fp8 with packed scales), and the
        # root of its block-hash chains: blocks of different KV dtypes never share a hash.
        self.kv_storage_dtype = quantization.storage_dtype(config.kv_cache_dtype, self.dtype)
        self.chain_root = chain_root(config.kv_cache_dtype)

        mc = self.model_config
        bs = config.block_size
        self.num_blocks = config.num_blocks or self._blocks_from_memory()
        # Tensor parallelism: rank 0 (this engine) drives worker ranks holding the other slices.
        self.tensor_parallel: TensorParallelGroup | None = None
        if tp_size > 1:
            self.tensor_parallel = TensorParallelGroup(config, tp_devices)
            self.num_blocks = self.tensor_parallel.connect(self.num_blocks)
        local = self.model.config  # this rank's heads under tensor parallelism
        shape = (2, self.num_blocks, bs, local.num_key_value_heads,
                 quantization.row_width(local.head_dim, self.kv_storage_dtype))
        self.kv_caches = zeroed_kv_layers(mc.num_hidden_layers, shape, self.kv_storage_dtype, self.device)
        self._kv_stacked = stacked_kv(self.kv_caches)
        self.pool = BlockPool(self.num_blocks, bs, config.eviction_policy, config.enable_prefix_caching)
        self.tiers = self._build_tiers()
        if self.tiers is not None:
            self.pool.on_evict = self.tiers.on_evict
            self.pool.on_commit = self.tiers.on_commit
        limit = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.max_model_len = min(limit, self.num_blocks * bs)
        self.scheduler = Scheduler(
            self.pool,
            block_size=bs,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
            enable_prefix_caching=config.enable_prefix_caching,
            aging_s=config.priority_aging_s,
            max_model_len=self.max_model_len,
            tiers=self.tiers,
            chain_root=self.chain_root,
        )
        self.sessions = SessionStore(config.max_sessions, max_replicas=config.max_replicas,
                                     max_replica_tokens=config.max_replica_tokens)
        graphs = None
        if self.device.type == "cuda" and config.use_cuda_graphs and attn.supports_cuda_graphs:
            # Under tensor parallelism every rank captures and replays the same graphs in
            # step (TensorParallelGraphs tells the workers).
            runner_class = CudaGraphRunner if self.tensor_parallel is None else functools.partial(
                TensorParallelGraphs, self.tensor_parallel)
            graphs = runner_class(
                self.model,
                self.kv_caches,
                bs,
                self.device,
                config.max_num_seqs,
                self.max_model_len,
                max_prefill_tokens=min(config.cuda_graph_max_prefill_tokens, config.max_num_batched_tokens),
            )
        # Eager steps' layers around their attention as graphs per padded token count
        # (node/piecewise_graphs.py), wherever the whole-step graphs run; captured at warmup.
        # (Not under tensor parallelism: its eager steps are the workers' cue.)
        piecewise = None
        if (graphs is not None and kernel_variants.current().eager_steps == "piecewise"
                and self.tensor_parallel is None and PiecewiseForward.supports(self.model)):
            piecewise = PiecewiseForward(self.model, self.kv_caches, config.max_num_batched_tokens, self.device)
        self.runner = ModelRunner(
            self.model if self.tensor_parallel is None else self.tensor_parallel.wrap(self.model),
            self.kv_caches,
            bs,
            self.device,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            graphs=graphs,
            piecewise=piecewise,
        )
        if self.tiers is not None and self.tiers.layerwise:
            self.model.kv_ready = self.tiers.layer_ready
            self.runner.layer_loads = self.tiers
        if isinstance(graphs, TensorParallelGraphs):
            graphs.announce()  # the workers build the same graphs (greedy rounds or not: set by the runner)
        self.cuda_graphs = graphs is not None
        if graphs is not None and graphs.prefill_sizes:
            self.scheduler.graph_prefill_tokens = graphs.prefill_sizes[-1]
        self.max_waiting = 16 * config.max_num_seqs

        self._lock = threading.RLock()  # engine state: queues, sessions, pool
        self._step_lock = threading.Lock()  # one step at a time
        self._work = threading.Condition(self._lock)
        # Running requests by (tenant, request id): two tenants may run the same id.
        self._in_flight: set[RequestKey] = set()  # the requests in the step the model is running
        self._deferred_aborts: set[RequestKey] = set()
        self._seqs: dict[RequestKey, Sequence] = {}
        self._listeners: dict[RequestKey, Listener] = {}
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox] = (
            weakref.WeakKeyDictionary())
        self._loop_thread: threading.Thread | None = None
        self._stopping = False
        self._lone_first_token = False  # the last step was one sequence's, and gave its first token
        self._metrics = _Metrics()
        self._last_progress = time.monotonic()  # a model step ran, or work arrived at an idle engine
        log.info(
            "engine ready: model=%s device=%s dtype=%s kv_cache_dtype=%s attention=%s kv_blocks=%d x %d tokens "
            "(%.1f MiB) policy=%s",
            self.model_name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            config.kv_cache_dtype,
            self.attention_backend,
            self.num_blocks,
            bs,
            self._kv_bytes() / 2**20,
            config.eviction_policy,
        )

    @on_own_device
    def warmup(self) -> None:
        """Capture every CUDA graph and compile every Triton kernel that serving can meet, so
        no request pays for a capture or a JIT compile later (a compile in the serving path
        cost the first 8192-token prefill step 560 ms on an H100).

        Graphs cover decode and short single-sequence prefills. The rest runs eagerly, at
        a fixed set of padded row counts (node/step_shapes.py) whose matrix products run once
        here, so cuBLAS meets no new shape while serving (each new one cost its first step
        up to 3 ms on an H100 host: a heuristic query and a kernel load). Triton
        specializes a kernel on each integer argument being 1 or a multiple of 16, and on the
        constexprs of each path (cold prefill, prefill over a cached prefix, chunked
        prefill, one and several sequences). A few dummy requests walk every such class;
        their blocks and counters are dropped afterwards. On CPU there is nothing to do but,
        as on CUDA, to measure the KV tiers' loads (:meth:`_calibrate_tiers`).
        """
        if self.device.type != "cuda":
            self._calibrate_tiers()
            return
        t0 = time.monotonic()
        n = 0
        if self.runner.graphs is not None:
            with self._lock:
                n = self.runner.graphs.capture_all()
                self.runner.graphs.rank_prefill_sizes()
        t1 = time.monotonic()
        with self._lock:
            products = self.runner.warm_matmuls()
            pieces = self.runner.piecewise.capture_all() if self.runner.piecewise is not None else 0
        t2 = time.monotonic()
        self._run_warmup_requests()
        log.info("warmup: captured %d CUDA graphs in %.1f s, ran %d matrix products at the eager steps' "
                 "padded shapes and captured %d piecewise graphs in %.1f s, eager kernels compiled in %.1f s",
                 n, t1 - t0, products, pieces, t2 - t1, time.monotonic() - t2)
        self._calibrate_tiers()

    def _while_running(self, out: SchedulerOutput) -> None:
        """Host work a step's end would otherwise wait for, done while the device computes it:
        hashing the blocks it fills, telling the eviction policy of the step's prefix hits
        (BlockPool.apply_deferred_hits), and the KV tiers' deferred offload work
        (KVTiers.settle)."""
        self.scheduler.hash_ahead(out)
        with self._lock:
            self.pool.apply_deferred_hits()
            if self.tiers is not None:
                self.tiers.settle()

    def _calibrate_tiers(self) -> None:
        """This device's figures for loads from host memory, before the first request weighs
        load or recompute (KVTiers.calibrate, into free pool blocks given back after)."""
        if self.tiers is None:
            return
        with self._lock:
            blocks = self.pool.allocate(min(CALIBRATION_BLOCKS, self.pool.num_free))
            try:
                self.tiers.calibrate(blocks)
            finally:
                self.pool.free(blocks)

    def _run_warmup_requests(self) -> None:
        gen = torch.Generator().manual_seed(0)
        vocab = self.model_config.vocab_size

        def ids(n: int) -> list[int]:
            return torch.randint(0, vocab, (n,), generator=gen).tolist()

        graphs = self.runner.graphs
        graph_max = graphs.prefill_sizes[-1] if graphs is not None and graphs.prefill_sizes else 0
        budget = self.config.max_num_batched_tokens
        limit = self.max_model_len - 8  # room for the decode tokens
        steps = max(2, self.num_scheduler_steps + 1)  # a multi-step round too
        greedy = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=steps, temperature=0.8, top_p=0.9, top_k=20, seed=1,
                                 ignore_eos=True)
        # Token counts that are 1, a multiple of 16 and neither; one sequence past the prefill
        # graphs; several sequences; a prompt longer than the step budget (chunked prefill).
        singles = [graph_max + 17, graph_max + 32, budget + 100]
        multi = [[37, 50], [16] * 16, [1, 33, 64]]
        prompts = [ids(min(n, limit)) for n in singles]
        for lengths in multi:
            batch = [ids(min(n, limit)) for n in lengths]
            self.generate(batch, [greedy, sampled] * (len(batch) // 2) + [greedy] * (len(batch) % 2))
        self.generate(prompts, greedy)
        # The same prompts again, extended: prefill over a cached prefix, one and several at once.
        self.generate([prompts[0][: limit - 40] + ids(20)], sampled)
        self.generate([p[: limit - 40] + ids(k) for p, k in zip(prompts, (9, 16, 31), strict=True)],
                      greedy)
        # Few new tokens over a long cached context, one sequence and two at once: the launch
        # classes of the split prefill (at most 64 new tokens and more; prefill_partition in
        # node/attention/triton_backend.py).
        long = ids(max(0, min(limit - 300, 1280)))
        if long:
            self.generate([long], greedy)
            for k in (40, 200):
                self.generate([long + ids(k)], greedy)
                self.generate([long + ids(k), long + ids(k)], greedy)
        # More than 64 new tokens over a cached prefix: the other launch shape of such a turn.
        self.generate([prompts[1][: limit - 200] + ids(100)], greedy)
        with self._lock:
            self.pool.evict_unreferenced()
            self.pool.reset_stats()
            self._metrics = _Metrics()
            if self.tiers is not None:
                self.tiers.reset_stats()

    # -- sizing -----------------------------------------------------------------------------

    @property
    def block_identity(self) -> BlockIdentity:
        """What a block hash means here: model, KV dtype (``kv_cache_dtype``, "auto" = the
        model's dtype) and block size; tiers and their files are keyed by it."""
        kv_dtype = getattr(self.config, "kv_cache_dtype", "auto")
        if kv_dtype == "auto":
            kv_dtype = str(self.kv_caches[0].dtype).removeprefix("torch.")
        return BlockIdentity(self.model_fingerprint, kv_dtype, self.config.block_size)

    def _build_tiers(self) -> KVTiers | None:
        c = self.config
        if not (c.kv_cpu_gib or c.kv_disk_dir):
            return None
        shape = KVTiers.block_shape(self.kv_caches)
        dtype = self.kv_caches[0].dtype
        identity = self.block_identity
        host = disk = None
        if c.kv_cpu_gib:
            capacity = int(c.kv_cpu_gib * 2**30) // self._bytes_per_block()
            if capacity < 1:
                raise ValueError(f"kv_cpu_gib must hold >= 1 block of {self._bytes_per_block()} "
                                 f"bytes, got {c.kv_cpu_gib}")
            # Slots that stand in while evicted blocks are written to disk from theirs: as
            # many as the disk writer can hold (its queue and the write in progress).
            spare = min(QUEUE_BLOCKS + 1, capacity // 4) if c.kv_disk_dir else 0
            host = HostTier(capacity - spare, shape, dtype, c.kv_cpu_eviction_policy,
                            pin=self.device.type == "cuda", spare=spare)
        if c.kv_disk_dir:
            disk = DiskTier(c.kv_disk_dir, identity.namespace, identity.key, shape, dtype,
                            int(c.kv_disk_gib * 2**30), c.kv_disk_eviction_policy, QUEUE_BLOCKS)
        log.info("KV tiers: cpu %s, disk %s, %s",
                 f"{host.capacity} blocks" if host is not None else "off",
                 f"{disk.capacity} blocks in {disk.directory}" if disk is not None else "off",
                 c.kv_write_policy)
        # Layer-wise loads need the model's layer hook (LlamaForCausalLM.kv_ready) and run
        # CUDA's batched path; on CPU too when asked (its copies are synchronous there: the
        # same code path, for tests).
        layerwise = c.kv_tier_layerwise and hasattr(self.model, "kv_ready")
        return KVTiers(self.kv_caches, identity, host, disk,
                       write_through=c.kv_write_policy == "write_through", publish=self.pool.publish,
                       batched=True if layerwise else None, layerwise=layerwise)

    def _bytes_per_block(self) -> int:
        mc = self.model.config  # this rank's heads under tensor parallelism
        row = quantization.row_width(mc.head_dim, self.kv_storage_dtype) * self.kv_storage_dtype.itemsize
        return 2 * self.config.block_size * mc.num_key_value_heads * row * mc.num_hidden_layers

    def _kv_bytes(self) -> int:
        """This process's KV pool (one rank's heads under tensor parallelism)."""
        return self.num_blocks * self._bytes_per_block()

    def _blocks_from_memory(self) -> int:
        return kv_pool_blocks(self.config, self.model_config.vocab_size, self._bytes_per_block(), self.device)

    def _read_kv(self, blocks: list[int]) -> torch.Tensor:
        """Every head of ``blocks``: ``[L, 2, n, block_size, kv_heads, head_dim]`` on the device."""
        if self.tiers is not None:  # blocks a layer-wise load is filling hold all layers first
            self.tiers.layers_ready()
        idx = torch.tensor(blocks, device=self.device)
        if self.tensor_parallel is not None:
            return self.tensor_parallel.read_kv(self.kv_caches, idx)
        # As bytes (CPU has no index_select for fp8); quantized KV keeps its packed scales.
        return self._kv_stacked.view(torch.uint8).index_select(2, idx).view(self.kv_storage_dtype)

    def _write_kv(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Store ``kv`` ``[L, 2, n, block_size, kv_heads, head_dim]`` in ``blocks``."""
        if self.tiers is not None:  # no pending layer-wise scatter may land on them later
            self.tiers.layers_ready()
        idx = torch.tensor(blocks, device=self.device)
        if self.tensor_parallel is not None:
            self.tensor_parallel.write_kv(self.kv_caches, idx, kv)
            return
        # As bytes: CPU has no index_copy for fp8 (the same copy for float caches).
        self._kv_stacked.view(torch.uint8).index_copy_(2, idx, kv.view(torch.uint8))

    # -- requests ---------------------------------------------------------------------------

    def validate(self, request: GenerateRequest) -> None:
        """Raise InvalidRequestError / PromptTooLongError for a request that can't be served."""
        self._prompt_for(request)

    def _prompt_for(self, request: GenerateRequest) -> _Prompt:
        prompt = request.prompt
        messages: list[ChatMessage] | None = None
        if isinstance(prompt, str):
            if not prompt and not request.session_id:
                raise InvalidRequestError("prompt", "prompt must be non-empty")
        elif is_chat(prompt):
            try:
                messages = parse_messages(prompt)
            except ValueError as exc:
                raise InvalidRequestError("messages", str(exc)) from None
        elif isinstance(prompt, list):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt must be non-empty")
            self._check_token_ids("prompt", prompt)
        else:
            raise InvalidRequestError(
                "prompt", f"prompt must be text, token ids or chat messages, got {type(prompt).__name__}"
            )
        sp = request.sampling
        if sp.max_tokens > self.config.max_tokens_limit:
            raise InvalidRequestError(
                "max_tokens",
                f"max_tokens must be in [1, {self.config.max_tokens_limit}], got {sp.max_tokens}",
            )
        if request.session_id is not None and (not isinstance(request.session_id, str) or not request.session_id):
            raise InvalidRequestError("session_id", "session_id must be a non-empty string")

        history, earlier = ([], [])
        if request.session_id is not None:
            history = self.sessions.history(request.session_id, request.tenant)
            earlier = self.sessions.conversation(request.session_id)
        result = _Prompt(history, len(history))
        if request.full_context:
            # The prompt is the whole conversation: the history only tells what is cached.
            result = self._full_context_prompt(history, prompt if messages is None else messages)
        elif messages is not None:
            result = self._chat_prompt(history, earlier, messages)
        elif isinstance(prompt, str):
            result.tokens = history + (self.tokenizer.encode(prompt, add_bos=not history) if prompt else [])
        else:
            result.tokens = history + list(prompt)
        if request.resume_token_ids:  # a resumed stream; not copying the context otherwise
            self._check_token_ids("resume_token_ids", request.resume_token_ids)
            result.tokens = result.tokens + list(request.resume_token_ids)
        tokens = result.tokens
        if not tokens:
            raise InvalidRequestError("prompt", "prompt must be non-empty")
        if len(tokens) >= self.max_model_len:
            raise PromptTooLongError(
                "prompt",
                f"prompt must be at most {self.max_model_len - 1} tokens (context {self.max_model_len}), "
                f"got {len(tokens)}" + (" including the session history" if history else ""),
            )
        return result

    def prompt_token_ids(self, request: GenerateRequest) -> list[int]:
        """The token ids ``request`` (without a session) would run: its tokenized text or
        rendered chat, and its resume ids. Coordinators hash them into blocks to route by
        cached prefix."""
        if request.session_id is not None:
            raise InvalidRequestError("session_id",
                                      "session_id must be unset: a session's tokens depend on its history")
        return self._prompt_for(request).tokens

    def _full_context_prompt(self, history: list[int], prompt: str | list[int] | list[ChatMessage]) -> _Prompt:
        """Tokens for a prompt that holds the whole conversation (an OpenAI-style client resends
        it each turn); the part that repeats the session's history is its cached prefix."""
        if is_chat(prompt):
            return self._chat_prompt(history, [], prompt, whole=True)
        tokens = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        return _Prompt(tokens, _common_prefix(history, tokens))

    def _chat_prompt(self, history: list[int], earlier: list[ChatMessage], new: list[ChatMessage],
                     whole: bool = False) -> _Prompt:
        """Tokens for a chat turn: the whole conversation rendered, of which only what follows
        the session's tokens is tokenized (so only that is prefilled). Templates put their own
        BOS in the text, hence add_bos=False, as transformers' apply_chat_template does.
        ``whole``: ``new`` is the whole conversation, not the messages after the session's."""
        template, tok = self.tokenizer.chat_template, self.tokenizer
        conversation = earlier + new
        try:
            if history and not earlier and not whole:  # a session of text or token turns: chat continues it
                return _Prompt(history + tok.encode(template.render(new), add_bos=False), len(history), conversation)
            text = template.render(conversation)
        except ValueError as exc:
            raise InvalidRequestError("messages", str(exc)) from None
        if history:
            delta = template_delta(text, tok.decode(history, skip_special_tokens=False))
            if delta is not None:
                return _Prompt(history + tok.encode(delta, add_bos=False), len(history), conversation)
            log.debug("chat template does not continue the session's tokens; prefilling the conversation anew")
        tokens = tok.encode(text, add_bos=False)
        return _Prompt(tokens, _common_prefix(history, tokens), conversation)

    def _check_token_ids(self, name: str, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        # Plain ints in range pass with three loops in C (a request's prompt is checked on
        # the way to its first token); anything else is looked at id by id, to name it.
        if not ids or (set(map(type, ids)) == _INT_ONLY and min(ids) >= 0 and max(ids) < vocab):
            return
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(name, f"{name} token ids must be in [0, {vocab - 1}], got {bad!r}")

    @on_own_device
    def add_request(
        self, request: GenerateRequest, listener: Listener | None = None, *, stream_text: bool = True
    ) -> Sequence:
        """Validate and queue a request; ``listener`` receives its deltas (on the engine thread).

        With ``stream_text=False`` the deltas carry tokens only and the text is decoded once, at
        the end (the final output always has the full text).
        """
        with self._lock:
            if request.key in self._seqs:  # the same tenant's: another's may share the id
                raise InvalidRequestError("request_id", f"request_id {request.request_id!r} is already running")
            if len(self.scheduler.waiting) >= self.max_waiting:
                raise QueueFullError(f"admission queue is full ({self.max_waiting} waiting); retry later")
            prompt = self._prompt_for(request)
            tokens = prompt.tokens
            salt = request.tenant
            known_hashes: list[int] = []
            if request.session_id is not None:
                session = self.sessions.begin_turn(request.session_id, salt)
                salt = session.salt
                # A re-rendered chat keeps only the hashes of blocks it shares with the history.
                known_hashes = session.block_hashes[: prompt.kept_history_tokens // self.config.block_size]
            sp = request.sampling
            seq = Sequence(
                request_id=request.request_id,
                tenant=request.tenant,
                token_ids=tokens,
                num_prompt_tokens=len(tokens),
                conversation=prompt.conversation,
                resumed_token_ids=list(request.resume_token_ids),
                sampling=sp,
                priority=Priority(request.priority),
                session_id=request.session_id,
                salt=salt,
                deadline=request.deadline,
                prefix_hashes=known_hashes,
            )
            seq.incremental_text = stream_text or bool(sp.stop)
            if sp.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(sp.seed)
            self._seqs[seq.key] = seq
            if listener is not None:
                self._listeners[seq.key] = listener
            if not self.scheduler.has_unfinished:
                self._last_progress = time.monotonic()
            self.scheduler.add(seq)
            if self.tiers is not None:  # its blocks on disk start loading before it is scheduled
                hashes = seq.prefix_hashes = self.scheduler.block_hashes_of(seq)  # matched without rehashing
                self.tiers.prefetch(hashes[len(self.pool.cached_prefix(hashes)):])
            self._metrics.requests += 1
            self._work.notify_all()
            return seq

    def abort(self, request_id: str, tenant: str = "") -> bool:
        """Stop ``tenant``'s request ``request_id`` and free its blocks now (or, if the model
        is computing it right now, as soon as that step ends). Returns False if it is not
        running (another tenant's request of that id is not touched)."""
        key = RequestKey(tenant, request_id)
        with self._lock:
            seq = self._seqs.get(key)
            if seq is None:
                return False
            if key in self._in_flight:
                self._deferred_aborts.add(key)
            else:
                self._finish(seq, "abort")
            return True

    # -- the step loop ------------------------------------------------------------------------

    @on_own_device
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the requests that finished in it.

        Steps are serialized by ``_step_lock``; the state lock is released while the model
        runs, so requests can be added, aborted and inspected (the server's event loop never
        waits out a forward pass). Nothing else can touch the scheduled sequences' blocks
        meanwhile: only ``schedule`` allocates, and aborts of in-flight sequences wait for the
        step to end before their blocks are released.
        """
        with self._step_lock:
            with self._lock:
                finished: list[RequestOutput] = []
                now = time.monotonic()
                for seq in [s for s in self._seqs.values() if s.deadline is not None and now > s.deadline]:
                    finished.append(self._finish(seq, "abort", error="deadline exceeded"))
                out = self.scheduler.schedule()
                self._metrics.preemptions += len(out.preempted)
                reads = self.tiers.reads_in_flight() if out.is_empty and self.tiers is not None else []
                if out.is_empty and (finished or not reads):
                    return finished
            if out.is_empty:  # requests wait for their disk blocks: wait for one, don't spin
                wait_futures(reads, READ_WAIT_S, return_when="FIRST_COMPLETED")
                return finished
            with self._lock:
                # A batch that may speculate runs one (verified) step at a time: multi-step
                # rounds would leave no step to draft for.
                speculates = self._speculates(out)
                drafted = speculates and self._draft(out)
                num_steps = 1 if speculates else self.scheduler.plan_decode_steps(out, self.num_scheduler_steps)
                if self.tiers is not None:  # evicted blocks leave before the step overwrites them
                    self.tiers.flush()
                self._in_flight = {item.seq.key for item in out.scheduled}
            if num_steps > 1 and not drafted:
                return finished + self._decode_round(out.scheduled, num_steps)
            items = out.scheduled
            try:
                if drafted:
                    sampled_steps = self._verify_drafts(out.scheduled)
                    # Verified tokens replay one per step, as with multi-step decoding.
                    items = [ScheduledSeq(item.seq, 1) for item in out.scheduled]
                else:
                    t0 = time.perf_counter()
                    sampled_steps = [self.runner.execute(out.scheduled, while_running=lambda: self._while_running(out))]
                    if self.tiers is not None:  # prefill speed: what a tier load must beat
                        prompt = sum(i.num_new_tokens for i in out.scheduled if i.num_new_tokens > 1)
                        if prompt:
                            self.tiers.observe_prefill(out.num_batched_tokens, time.perf_counter() - t0)
            except Exception as exc:  # a broken step must not take the node down
                return finished + self._fail_step(out.scheduled, exc)
            with self._lock:
                if self.tiers is not None:  # settled during the step, unless it took another path
                    self.tiers.layers_ready()  # a layer-wise load outlives no step
                    self.tiers.settle()
                self._in_flight = set()
                self._metrics.schedules += 1
                rows = range(len(items))
                for i, sampled in enumerate(sampled_steps):
                    if i:  # later steps carry on only the sequences still going (rows index ``items``)
                        rows = [j for j in self._rows_going(items, rows) if sampled[j] is not None]
                        if not rows:
                            break
                    step = SchedulerOutput([items[j] for j in rows])
                    finished.extend(self._after_step(step, [sampled[j] for j in rows]))
                finished.extend(self._apply_deferred_aborts())
            return finished

    def _decode_round(self, items: list[ScheduledSeq], num_steps: int) -> list[RequestOutput]:
        """Run a multi-step decode round, handling each step's tokens (streaming them, checking
        stops) while the device computes the next ones. Launches stop early once every row has
        ended, or when the round should give way: a waiting request could take a freed seat,
        or a quarter of the batch has ended (the rest is better rescheduled as a smaller batch).
        The rows the device still computes for ended sequences are discarded."""
        rows: list[int] = list(range(len(items)))

        def keep_going() -> bool:
            with self._lock:
                live = len(self._rows_going(items, rows))
                if live == 0 or live * 4 < len(items) * 3:
                    return False
                return not (self.scheduler.waiting and len(self.scheduler.running) < self.config.max_num_seqs)

        finished: list[RequestOutput] = []
        try:
            for i, sampled in enumerate(self.runner.decode_steps(items, num_steps, keep_going)):
                with self._lock:
                    if i:
                        rows = self._rows_going(items, rows)
                    else:
                        self._metrics.schedules += 1
                    if rows:
                        step = SchedulerOutput([items[j] for j in rows])
                        finished.extend(self._after_step(step, [sampled[j] for j in rows]))
        except Exception as exc:  # a broken step must not take the node down
            return finished + self._fail_step([items[j] for j in rows], exc)
        with self._lock:
            self._in_flight = set()
            finished.extend(self._apply_deferred_aborts())
        return finished

    def _rows_going(self, items: list[ScheduledSeq], rows: Iterable[int]) -> list[int]:
        """The rows of ``rows`` whose sequences are still going (not ended, not aborted)."""
        return [j for j in rows
                if not items[j].seq.is_finished and items[j].seq.key not in self._deferred_aborts]

    def _fail_step(self, scheduled: list[ScheduledSeq], exc: Exception) -> list[RequestOutput]:
        log.exception("model step failed; failing its %d requests", len(scheduled))
        finished = []
        with self._lock:
            if self.tiers is not None:  # a layer-wise load outlives no step, a failed one either
                self.tiers.layers_ready()
            self._in_flight = set()
            for item in scheduled:
                if not item.seq.is_finished:
                    finished.append(self._finish(item.seq, "error", error=f"model step failed: {exc}"))
            finished.extend(self._apply_deferred_aborts())
        return finished

    def _apply_deferred_aborts(self) -> list[RequestOutput]:
        """Finish the requests aborted while the model was computing them (lock held)."""
        finished = [self._finish(self._seqs[key], "abort") for key in self._deferred_aborts & self._seqs.keys()]
        self._deferred_aborts.clear()
        return finished

    def _speculates(self, out: SchedulerOutput) -> bool:
        """Whether this step's batch speculates (node/speculative.py). Only all-greedy decode
        batches of at most ``speculative_max_batch`` sequences do: a large batch is already
        compute-bound, and the extra positions would cost more than the steps they save."""
        c = self.config
        if not c.speculative_tokens or out.preempted or len(out.scheduled) > c.speculative_max_batch:
            return False
        return all(item.num_new_tokens == 1 and item.samples and item.seq.sampling.temperature == 0
                   for item in out.scheduled)

    def _draft(self, out: SchedulerOutput) -> bool:
        """Give a speculating step's sequences n-gram drafts to verify; False when none was
        found (the step then decodes one token as usual)."""
        c = self.config
        drafted = False
        budget = c.max_num_batched_tokens - len(out.scheduled)  # the runner's buffers hold no more
        for item in out.scheduled:
            seq = item.seq
            k = min(c.speculative_tokens, self.scheduler.steps_left(seq) - 1, budget)
            draft = propose_ngram(seq.token_ids, k, c.speculative_max_ngram) if k > 0 else []
            if draft and self.scheduler.reserve(seq, 1 + len(draft)):
                item.draft, item.num_new_tokens = draft, 1 + len(draft)
                budget -= len(draft)
                drafted = True
        return drafted

    def _verify_drafts(self, scheduled: list[ScheduledSeq]) -> list[list[int | None]]:
        """Verify the drafts in one forward; the tokens each sequence gets, step by step (None
        once a sequence has no more)."""
        predicted = self.runner.execute_verify(scheduled)
        tokens = [accepted_prefix(item.draft, p) for item, p in zip(scheduled, predicted, strict=True)]
        with self._lock:
            self._metrics.draft_proposed += sum(len(item.draft) for item in scheduled)
            self._metrics.draft_accepted += sum(len(t) - 1 for t in tokens)
        return [[t[i] if i < len(t) else None for t in tokens] for i in range(max(map(len, tokens)))]

    def _after_step(self, out: SchedulerOutput, sampled: list[int | None]) -> list[RequestOutput]:
        # The tokens reach their listeners before the step's filled blocks are committed
        # (on_step_done): committing a returning turn's prompt blocks is no part of its time
        # to first token. Sequences that end are finished after the commit, since the chain
        # their session keeps is the committed one.
        ending: list[tuple[Sequence, str, str]] = []
        now = time.monotonic()
        pairs = list(zip(out.scheduled, sampled, strict=True))
        # First tokens are emitted before the batch's other tokens: every hop after this one
        # (the mailbox, the streams' writers, a coordinator's relay) serves its work in
        # arrival order, so a new request's first token would otherwise wait for the writes
        # of every running stream's token (the scheduler puts running sequences first).
        pairs.sort(key=lambda pair: pair[0].seq.first_token_time is not None)
        for item, token in pairs:
            if token is None:
                continue
            seq = item.seq
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
                # A lone sequence's first token (a quiet node's turn): see _loop.
                self._lone_first_token = len(out.scheduled) == 1
                self._metrics.ttft.append(now - seq.arrival_time)
            self._metrics.generated_tokens += 1
            reason = self._stop_reason(seq, token)
            delta_text = self._detokenize(seq, final=reason is not None) if seq.incremental_text else ""
            if seq.finish_reason == "stop":  # a stop string completed in the text
                reason = "stop"
            if reason is not None:
                ending.append((seq, reason, delta_text))
            else:
                self._emit(seq, delta_text)
        self.scheduler.on_step_done(out)
        self._last_progress = time.monotonic()
        self._metrics.steps += 1
        self._metrics.batched_tokens += out.num_batched_tokens
        return [self._finish(seq, reason, pending_text=text) for seq, reason, text in ending]

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished

    def seconds_without_progress(self) -> float:
        """How long requests have been waiting or running without a model step completing;
        0 while the engine is idle. A pool whose blocks are all held by nobody, or a step
        that never returns, makes this grow: the node must stop reporting SERVING. A broken
        tensor-parallel group (its ranks out of step) is no progress for good."""
        if self.tensor_parallel is not None and self.tensor_parallel.broken is not None:
            return math.inf
        with self._lock:
            if not self.scheduler.has_unfinished:
                return 0.0
            return time.monotonic() - self._last_progress

    def generate(
        self,
        prompts: list[Prompt] | Prompt,
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        session_ids: list[str | None] | None = None,
        priorities: list[Priority] | None = None,
    ) -> list[RequestOutput]:
        """Generate for a batch of prompts (text, token ids or chat messages) in one continuous batch."""
        prompts, params_list = batch_of(prompts, params)
        n = len(prompts)
        requests = [
            GenerateRequest(
                prompt=p,
                sampling=params_list[i],
                session_id=session_ids[i] if session_ids else None,
                priority=priorities[i] if priorities else Priority.NORMAL,
            )
            for i, p in enumerate(prompts)
        ]
        for r in requests:
            self.validate(r)
        done: dict[str, RequestOutput] = {}
        event = threading.Event()

        def listener(delta: StreamDelta) -> None:
            if delta.finished and delta.output is not None:
                done[delta.request_id] = delta.output
                if len(done) == n:
                    event.set()

        for r in requests:
            self.add_request(r, listener, stream_text=False)
        if self._loop_thread is not None:
            event.wait()
        else:
            while len(done) < n:
                self.step()
        return [done[r.request_id] for r in requests]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamDelta]:
        """Yield deltas of one request as they are produced; aborts it if the consumer leaves."""
        queue: asyncio.Queue[StreamDelta] = asyncio.Queue()
        self.stream_to(request, queue.put_nowait)
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self.abort(request.request_id, request.tenant)

    def stream_to(self, request: GenerateRequest, on_delta: Listener) -> None:
        """Queue ``request`` and call ``on_delta`` with each of its deltas on the running event
        loop (the caller's), all of a step's deltas in one wakeup of that loop.

        For a server that handles a delta at once (turns it into a wire message): it spares
        the task switch per token that reading :meth:`stream` costs. Nothing aborts the request
        for the caller; ``on_delta`` must not block.
        """
        loop = asyncio.get_running_loop()
        self.start_background_loop()
        with self._lock:
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = _LoopMailbox(loop)
        self.add_request(request, lambda d: mailbox.post(on_delta, d))

    def start_background_loop(self) -> None:
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = threading.Thread(target=self._loop, name="ultrakv-engine", daemon=True)
                self._loop_thread.start()

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._stopping and not self.scheduler.has_unfinished:
                    self._work.wait()
                if self._stopping:
                    return
            try:
                self.step()  # outside the state lock: the step takes it only around bookkeeping
            except Exception:  # keep serving: one broken step must not stop the node
                log.exception("engine step failed")
            if self._lone_first_token:
                # The first token of a turn served alone is on its way to an event loop (its
                # mailbox has woken it): let go of the GIL now, so that the loop sends it before
                # this thread runs the next step's host work, which would hold the GIL until
                # that step waits for the device (on the shared 2-core CPU: 85-106 us from emit
                # to the loop either way in one set of runs, 63-410 us without this against
                # 63-152 us with it in another). Only after a lone step: in a batch the next
                # step's launch goes first, and the loop sends while it runs.
                self._lone_first_token = False
                time.sleep(0)

    @on_own_device
    def shutdown(self) -> None:
        with self._work:
            self._stopping = True
            for seq in list(self._seqs.values()):
                self._finish(seq, "abort", error="engine shutting down")
            self._work.notify_all()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=10)
        if self.tiers is not None:
            with self._lock:
                written = self.tiers.persist(self.pool.hashed_blocks())
                self.tiers.close()
            if written:
                log.info("KV tiers: %d blocks written to disk at shutdown", written)
        if self.tensor_parallel is not None:
            with self._step_lock:  # no forward may be broadcast after the workers stop
                self.tensor_parallel.shutdown()

    # -- finishing and streaming ------------------------------------------------------------

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        sp = seq.sampling
        if not sp.ignore_eos and token in self.tokenizer.eos_token_ids:
            return "stop"
        if token in sp.stop_token_set:
            return "stop"
        if seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _detokenize(self, seq: Sequence, final: bool) -> str:
        """Advance the sequence's text; returns the new text that is safe to show now."""
        out = seq.output_token_ids
        # Nothing before the new tokens yet (a request's first token): no decode for it.
        prefix_text = (self.tokenizer.decode(out[seq.prefix_offset : seq.read_offset])
                       if seq.read_offset > seq.prefix_offset else "")
        new_text = self.tokenizer.decode(out[seq.prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            seq.text += new_text[len(prefix_text) :]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(out)
        if seq.sampling.stop:
            cut = _find_stop(
                seq.text,
                seq.sampling.stop,
                start=max(0, seq.emitted_text_len - _longest(seq.sampling.stop)),
            )
            if cut is not None:
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
        # Hold back what could still grow into a stop string.
        hold = 0 if final or seq.finish_reason else _longest(seq.sampling.stop) - 1 if seq.sampling.stop else 0
        visible = max(seq.emitted_text_len, len(seq.text) - hold)
        delta = seq.text[seq.emitted_text_len : visible]
        seq.emitted_text_len = visible
        return delta

    def _emit(self, seq: Sequence, text: str) -> None:
        listener = self._listeners.get(seq.key)
        new_tokens = seq.output_token_ids[seq.emitted_tokens :]
        seq.emitted_tokens = seq.num_output_tokens
        if listener is not None and (new_tokens or text):
            _notify(listener, StreamDelta(seq.request_id, new_tokens, text))

    def _whole_reply(self, resumed: list[int], output: list[int], text: str) -> str:
        """The assistant's whole reply of a chat turn, as the session keeps it: a resumed turn's
        (``resumed``: what its failed attempt streamed, which the client has) begins with that
        text; keeping only this attempt's ``text`` lost it, and the next turn rendered a shorter
        conversation than the history. ``text`` may end short of ``output`` (a stop string)."""
        if not resumed:
            return text
        whole = self.tokenizer.decode(resumed + output)
        cut = len(self.tokenizer.decode(output)) - len(text)
        return whole[: len(whole) - cut] if cut > 0 else whole

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, pending_text: str = "") -> RequestOutput:
        if not seq.incremental_text and reason in ("stop", "length"):
            seq.text = self.tokenizer.decode(seq.output_token_ids)
        self.scheduler.finish(seq, reason)  # keeps the chain of full-block hashes in prefix_hashes
        self._seqs.pop(seq.key, None)
        now = time.monotonic()
        if seq.session_id is not None:
            completed = reason in ("stop", "length")
            conversation = None
            if seq.conversation is not None:
                conversation = [*seq.conversation, ChatMessage(
                    "assistant", self._whole_reply(seq.resumed_token_ids, seq.output_token_ids, seq.text))]
            self.sessions.end_turn(seq.session_id, seq.token_ids if completed else None, seq.prefix_hashes,
                                   conversation)
        output = RequestOutput(
            request_id=seq.request_id,
            session_id=seq.session_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=list(seq.output_token_ids),
            text=seq.text,
            cached_tokens=seq.num_cached_tokens,
            finish_reason=reason,
            ttft_s=(seq.first_token_time - seq.arrival_time) if seq.first_token_time else 0.0,
            latency_s=now - seq.arrival_time,
            error=error,
        )
        m = self._metrics
        m.finished[reason] = m.finished.get(reason, 0) + 1
        m.prompt_tokens += output.prompt_tokens
        m.cached_tokens += output.cached_tokens
        if seq.first_token_time:
            m.ttft_hist.observe(output.ttft_s)
        if output.completion_tokens > 1 and seq.first_token_time:
            tpot = (now - seq.first_token_time) / (output.completion_tokens - 1)
            m.tpot.append(tpot)
            m.tpot_hist.observe(tpot)
        m.e2e_hist.observe(output.latency_s)
        listener = self._listeners.pop(seq.key, None)
        if listener is not None:
            new_tokens = seq.output_token_ids[seq.emitted_tokens :]
            _notify(listener, StreamDelta(seq.request_id, new_tokens, pending_text, finished=True, output=output))
        return output

    # -- sessions ---------------------------------------------------------------------------

    def _cached_blocks(self, s: Session) -> list[int]:
        """Blocks of the session's history still in the cache (the leading run)."""
        return self.pool.cached_prefix(continue_chain(s.block_hashes, s.token_ids, self.config.block_size, s.salt,
                                                      self.chain_root))

    def _newest(self, session_id: str, tenant: str | None = None) -> tuple[Session, bool]:
        copy = self.sessions.newest(session_id, tenant)
        if copy is None:
            raise SessionNotFoundError(session_id)
        return copy

    def get_session(self, session_id: str, tenant: str | None = None) -> SessionInfo:
        """The newest copy held here: the session, or a replica (``replica`` set); ``tenant``
        set: only if that tenant owns it (else not found)."""
        with self._lock:
            return self._info(*self._newest(session_id, tenant))

    def list_sessions(self) -> list[SessionInfo]:
        """Every session and replica held here (the newest copy of each)."""
        with self._lock:
            return [self._info(s, replica) for s, replica in self.sessions.copies()]

    def session_infos(self, copies: list[tuple[Session, bool]]) -> list[SessionInfo]:
        """The figures of ``copies`` (from :meth:`snapshot_sessions`)."""
        with self._lock:
            return [self._info(s, replica) for s, replica in copies]

    def _info(self, s: Session, replica: bool = False) -> SessionInfo:
        return SessionInfo(
            session_id=s.session_id,
            num_tokens=len(s.token_ids),
            num_cached_blocks=len(self._cached_blocks(s)),
            turns=s.turns,
            created_at=s.created_at,
            last_used_at=s.last_used_at,
            replica=replica,
        )

    def delete_session(self, session_id: str, tenant: str | None = None) -> None:
        """Forget the session; ``tenant`` set: only if that tenant owns it (else not found)."""
        with self._lock:
            self.sessions.delete(session_id, tenant)

    def cleanup_sessions(self, max_age_s: float) -> int:
        if not max_age_s >= 0:
            raise InvalidRequestError("max_age", f"max_age must be >= 0 seconds, got {max_age_s!r}")
        with self._lock:
            return len(self.sessions.cleanup(max_age_s))

    @on_own_device
    def clear_cache(self) -> int:
        """Drop every cached block no running request uses; sessions keep their histories."""
        with self._lock:
            dropped = self.pool.evict_unreferenced()
            if self.tiers is not None:
                dropped += self.tiers.clear()
            return dropped

    @property
    def session_layout(self) -> SessionLayout:
        """What a session sent here must fit (ImportSession, ReplicateHistory, restore)."""
        mc = self.model_config
        return SessionLayout(
            model_fingerprint=self.model_fingerprint,
            vocab_size=mc.vocab_size,
            max_tokens=self.max_model_len,
            block_size=self.config.block_size,
            num_layers=mc.num_hidden_layers,
            num_kv_heads=mc.num_key_value_heads,
            head_dim=mc.head_dim,
            kv_dtype=str(self.kv_storage_dtype).removeprefix("torch."),
        )

    def store_replica(self, session_id: str, token_ids: list[int], turns: int, tenant: str = "",
                      messages: list[tuple[str, str]] | None = None) -> None:
        """Hold a ring neighbour's session history (and chat conversation, as (role, content)
        pairs) so it survives that neighbour's death."""
        validate_history(token_ids, turns, tenant, self.session_layout)
        validate_history_messages([content for _, content in messages or []], len(token_ids))
        conversation = _chat_messages(messages or [])
        with self._lock:
            self.sessions.store_replica(session_id, token_ids, turns, tenant, conversation)

    def release_session(self, session_id: str, turns: int) -> None:
        """A migration's cut-over: see :meth:`SessionStore.release`."""
        with self._lock:
            self.sessions.release(session_id, turns)

    def promote_replica(self, session_id: str) -> bool:
        with self._lock:
            return self.sessions.promote_replica(session_id) is not None

    def demote_session(self, session_id: str) -> bool:
        """Hold the session as a replica (:meth:`SessionStore.demote`)."""
        with self._lock:
            return self.sessions.demote(session_id)

    def session_fenced(self, session_id: str) -> bool:
        """Whether the copy held here takes no turn now (:meth:`SessionStore.fenced`)."""
        with self._lock:
            return self.sessions.fenced(session_id)

    def fence_sessions(self, until: float) -> list[str]:
        """This node lost its cluster lease: :meth:`SessionStore.fence`."""
        with self._lock:
            return self.sessions.fence(until)

    def prepare_turn(self, request: GenerateRequest) -> PreparedTurn:
        """The token ids a session turn would run here and the session's turn version, for a
        node that runs the turn instead while this one is overloaded (its batch full or its
        queue not empty: the turn would wait); nothing changes."""
        if request.session_id is None:
            raise InvalidRequestError("session_id", "session_id must be set: only a session turn is prepared")
        with self._lock:
            prompt = self._prompt_for(request)
            turns, busy = self.sessions.turn_version(request.session_id, request.tenant)
            sched = self.scheduler
            free = 0 if sched.waiting else max(0, sched.max_num_seqs - len(sched.running))
            return PreparedTurn(prompt.tokens, turns, busy, free == 0, free)

    def append_turn(self, request: GenerateRequest, turns: int, prompt_token_ids: list[int],
                    output_token_ids: list[int], text: str, finish_reason: str
                    ) -> tuple[RequestOutput, bool]:
        """Append a session turn that another node ran from :meth:`prepare_turn`'s answer
        (``turns``, ``prompt_token_ids``): the session then holds the prompt and the output,
        one turn more, exactly as if the turn had run here. Its KV is not computed here: the
        next turn prefills what the cache lacks.

        Only while the session is still at version ``turns`` with no turn running
        (:class:`TurnConflictError` otherwise: a turn ran or runs here meanwhile, and the
        other node's turn did not continue it). Returns the turn's output (for replication)
        and whether it was appended now (False: this very turn was appended before).
        """
        sid = request.session_id
        if sid is None:
            raise InvalidRequestError("session_id", "session_id must be set: only a session turn is appended")
        if finish_reason not in ("stop", "length"):
            raise InvalidRequestError("finish_reason", f"finish_reason must be stop or length, got {finish_reason!r}")
        self._check_token_ids("prompt_token_ids", prompt_token_ids)
        self._check_token_ids("output token_ids", output_token_ids)
        history = list(prompt_token_ids) + list(output_token_ids)
        if not output_token_ids or len(history) > self.max_model_len:
            raise InvalidRequestError("token_ids", f"a turn's prompt and output must hold 1 to "
                                      f"{self.max_model_len} tokens with at least one output token, "
                                      f"got {len(prompt_token_ids)} + {len(output_token_ids)}")
        output = RequestOutput(request_id=request.request_id, session_id=sid,
                               prompt_token_ids=list(prompt_token_ids), token_ids=list(output_token_ids),
                               text=text, cached_tokens=0, finish_reason=finish_reason, ttft_s=0.0,
                               latency_s=0.0)
        with self._lock:
            copy = self.sessions.newest(sid, request.tenant)
            if copy is not None and copy[0].turns == turns + 1 and copy[0].token_ids == history:
                return output, False
            have, busy = self.sessions.turn_version(sid, request.tenant)
            if busy or have != turns:
                raise TurnConflictError(sid, turns, have, busy)
            prompt = self._prompt_for(request)
            if prompt.tokens != list(prompt_token_ids):
                raise InvalidRequestError("prompt_token_ids", "prompt_token_ids must be the tokens the turn "
                                          "runs here (the prepared turn's), and they differ")
            known = copy[0].block_hashes[: prompt.kept_history_tokens // self.config.block_size] if copy else []
            conversation = None
            if prompt.conversation is not None:
                reply = self._whole_reply(list(request.resume_token_ids), list(output_token_ids), text)
                conversation = [*prompt.conversation, ChatMessage("assistant", reply)]
            applied = self.sessions.append_turn(sid, request.tenant, turns, history, known, conversation)
            return output, applied

    def snapshot_sessions(self) -> list[tuple[Session, bool]]:
        """The newest copy of every session and replica, as it is now, and whether it is a
        replica (a backup's cut, node/backup_cut.py). The copies share the history lists: a
        turn's end replaces them, never changes them in place, so no token is copied."""
        with self._lock:
            return [(replace(s), replica) for s, replica in self.sessions.copies()]

    @on_own_device
    def export_session(self, session_id: str, kv_device: torch.device | str = "cpu",
                       snapshot: Session | None = None) -> SessionState:
        """The newest copy's history (session or replica) and the KV of its leading full
        blocks still cached, on ``kv_device`` (another GPU's engine takes it device to device).
        With ``snapshot`` (a copy from :meth:`snapshot_sessions`), that history instead, with
        whatever of its KV is still cached."""
        with self._lock:
            s = snapshot if snapshot is not None else self._newest(session_id)[0]
            hashes = continue_chain(s.block_hashes, s.token_ids, self.config.block_size, s.salt,
                                    self.chain_root)
            blocks = self.pool.cached_prefix(hashes)
            if self.tensor_parallel is not None and self.tensor_parallel.broken is not None:
                blocks = []  # the heads of the other ranks are gone: the history alone can leave
            # Blocks that went down to the host or disk tier come along too (read, not loaded).
            lower = self.tiers.peek(hashes[len(blocks):]) if self.tiers is not None else []
            kv = None
            if blocks or lower:
                # [L, 2, n_blocks, bs, H, D] -> [L, 2, n_blocks * bs, H, D], joined as bytes (CPU
                # has no cat for fp8); the tiers' blocks are [L, 2, bs, H, D] each.
                parts = [self._read_kv(blocks).to(kv_device).view(torch.uint8)] if blocks else []
                if lower:
                    parts.append(torch.stack([b.view(torch.uint8) for b in lower], dim=2).to(kv_device))
                kv = torch.cat(parts, dim=2).view(self.kv_storage_dtype).flatten(2, 3)
            return SessionState(
                session_id=s.session_id,
                token_ids=list(s.token_ids),
                turns=s.turns,
                model_fingerprint=self.model_fingerprint,
                kv_tokens=(len(blocks) + len(lower)) * self.config.block_size,
                kv=kv,
                tenant=s.salt,
                messages=[(m.role, m.content) for m in s.messages],
            )

    @on_own_device
    def import_session(self, state: SessionState) -> int:
        """Adopt a session; its KV goes into cached blocks. Returns the tokens of KV taken in.

        Everything is checked before a block is allocated (history ids against the
        vocabulary, the KV's shape against the model), and every block taken is released
        on every path, so a bad import can neither poison a batch nor leak the pool.
        """
        layout = self.session_layout
        validate_history(state.token_ids, state.turns, state.tenant, layout)
        validate_history_messages([content for _, content in state.messages], len(state.token_ids))
        if state.kv is not None and state.model_fingerprint != self.model_fingerprint:
            raise IncompatibleSessionError(
                f"session {state.session_id!r} KV comes from model {state.model_fingerprint}, "
                f"this node runs {self.model_fingerprint}"
            )
        if state.kv is not None and state.kv.dtype != self.kv_storage_dtype and (
                quantization.is_quantized(state.kv.dtype) or quantization.is_quantized(self.kv_storage_dtype)):
            # Quantized and float KV never mix (nor int8 and fp8): the history comes in alone
            # and its next turn recomputes the KV here.
            log.warning("session %r: its KV is %s, this node's cache holds %s; importing the history "
                        "only (the KV is recomputed on the next turn)", state.session_id,
                        str(state.kv.dtype).removeprefix("torch."),
                        str(self.kv_storage_dtype).removeprefix("torch."))
            state = replace(state, kv=None, kv_tokens=0)
        bs = self.config.block_size
        kv_tokens = state.kv_tokens if state.kv is not None else 0
        if kv_tokens:
            if kv_tokens % bs or kv_tokens > len(state.token_ids):
                raise InvalidRequestError(
                    "kv_tokens", f"kv_tokens must be a multiple of {bs} in [0, {len(state.token_ids)}], got {kv_tokens}"
                )
            if list(state.kv.shape) != layout.kv_shape(kv_tokens):
                raise InvalidRequestError(
                    "kv_shape", f"kv_shape must be {layout.kv_shape(kv_tokens)}, got {list(state.kv.shape)}"
                )
        conversation = _chat_messages(state.messages)
        with self._lock:
            now = time.time()
            session = Session(state.session_id, list(state.token_ids), state.tenant, state.turns, now, now,
                              messages=conversation)
            self.sessions.put(session)
            if not kv_tokens or not self.config.enable_prefix_caching:
                return 0
            hashes = hash_token_blocks(state.token_ids[:kv_tokens], bs, state.tenant, self.chain_root)
            session.block_hashes = hashes  # the next turn's prefix match starts from them
            held = self.pool.cached_prefix(hashes)
            have = len(held)
            self.pool.incref(held)  # pinned, so allocating below can't evict the chain's head
            blocks: list[int] = []
            try:
                n_new = min(len(hashes) - have, self.pool.num_free)
                if n_new <= 0:
                    return have * bs
                blocks = self.pool.allocate(n_new)
                kv = state.kv[:, :, have * bs : (have + n_new) * bs].to(self.device, self.kv_storage_dtype)
                if self.tiers is not None:  # blocks evicted above leave before being overwritten
                    self.tiers.flush()
                self._write_kv(blocks, kv.unflatten(2, (n_new, bs)))
                for i, b in enumerate(blocks):
                    self.pool.commit(b, hashes[have + i])
                return (have + n_new) * bs
            finally:
                self.pool.free(held + blocks)

    # -- stats ------------------------------------------------------------------------------

    def _tier_stats(self) -> dict:
        """Blocks found per tier (``hits``) and each tier's state; only ``gpu`` without tiers."""
        out = {"gpu": {"hits": self.pool.stats().hits}}
        if self.tiers is not None:
            out.update(self.tiers.stats())
        return out

    def stats(self) -> dict:
        with self._lock:
            m = self._metrics
            return {
                "model": self.model_name,
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "kv_cache_dtype": self.config.kv_cache_dtype,
                "attention_backend": self.attention_backend,
                "cuda_graphs": self.cuda_graphs,
                "fused_kernels": self.fused_kernels,
                "num_scheduler_steps": self.num_scheduler_steps,
                "max_model_len": self.max_model_len,
                "requests": {
                    "total": m.requests,
                    "running": len(self.scheduler.running),
                    "waiting": len(self.scheduler.waiting),
                    "finished": dict(m.finished),
                    "preemptions": m.preemptions,
                },
                "tokens": {
                    "prompt": m.prompt_tokens,
                    "cached": m.cached_tokens,
                    "generated": m.generated_tokens,
                    "batched": m.batched_tokens,
                    "steps": m.steps,
                    "schedules": m.schedules,
                    "draft_proposed": m.draft_proposed,
                    "draft_accepted": m.draft_accepted,
                },
                "latency": {
                    "ttft_p50_s": _pct(m.ttft, 50),
                    "ttft_p95_s": _pct(m.ttft, 95),
                    "ttft_p99_s": _pct(m.ttft, 99),
                    "tpot_p50_s": _pct(m.tpot, 50),
                    "tpot_p95_s": _pct(m.tpot, 95),
                    "tpot_p99_s": _pct(m.tpot, 99),
                },
                "histograms": {
                    "ttft_s": m.ttft_hist.snapshot(),
                    "tpot_s": m.tpot_hist.snapshot(),
                    "e2e_s": m.e2e_hist.snapshot(),
                },
                "cache": self.pool.stats().to_dict(),
                "kv_tiers": self._tier_stats(),
                "sessions": {"count": len(self.sessions), "replicas": self.sessions.num_replicas,
                             "replicas_dropped": self.sessions.replicas_dropped},
            }


_INT_ONLY = {int}


@dataclass
class _Prompt:
    """A request's whole context: ``tokens`` (session history + the new prompt), how many
    leading tokens of the session's history it keeps, and the chat conversation it renders
    (None for text and token prompts)."""

    tokens: list[int]
    kept_history_tokens: int
    conversation: list[ChatMessage] | None = None


def _chat_messages(pairs: list[tuple[str, str]]) -> list[ChatMessage]:
    """(role, content) pairs of a session sent here -> ChatMessages; a bad role is the
    sender's error, named."""
    try:
        return [ChatMessage(role, content) for role, content in pairs]
    except ValueError as exc:
        raise InvalidRequestError("messages", f"messages: {exc}") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Metrics:
    def __init__(self) -> None:
        self.requests = 0
        self.finished: dict[str, int] = {}
        self.preemptions = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.batched_tokens = 0
        self.steps = 0  # model forward passes
        self.schedules = 0  # scheduling rounds (one host sync each; several steps with multi-step decode)
        self.draft_proposed = 0  # speculative tokens drafted and verified
        self.draft_accepted = 0  # ... of which the model agreed with
        self.ttft: deque[float] = deque(maxlen=2048)
        self.tpot: deque[float] = deque(maxlen=2048)
        # Cumulative since start, for Prometheus (the deques above feed the percentiles).
        self.ttft_hist = LatencyHistogram(TTFT_BUCKETS)
        self.tpot_hist = LatencyHistogram(TPOT_BUCKETS)
        self.e2e_hist = LatencyHistogram(E2E_BUCKETS)


class _LoopMailbox:
    """Deltas bound for one event loop's streams, handed over in one wakeup per engine step.

    A step finishes a token for every running sequence; waking the loop once per delta (64
    self-pipe writes and callbacks per step at batch 64) kept the serving thread busy and
    fighting the engine thread for the GIL. Posting wakes the loop only when the mailbox goes
    from empty to non-empty, so all of a step's deltas arrive in one callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[Listener, StreamDelta]] = []
        self._lock = threading.Lock()

    def post(self, on_delta: Listener, delta: StreamDelta) -> None:
        with self._lock:
            self._items.append((on_delta, delta))
            if len(self._items) > 1:
                return  # a drain is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop has closed: nobody is left to read
            with self._lock:
                self._items.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for on_delta, delta in items:
            _notify(on_delta, delta)


def _notify(listener: Listener, delta: StreamDelta) -> None:
    """Deliver a delta; a listener that fails (say, its event loop has closed because the
    consumer left) loses its delta but never breaks the step that serves everyone else."""
    try:
        listener(delta)
    except Exception:
        log.debug("listener for %s failed; dropping its delta", delta.request_id, exc_info=True)


def _pct(values: deque[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _longest(stops: list[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
