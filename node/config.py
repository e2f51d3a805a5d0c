"""Engine configuration: one typed, validated dataclass built at the edge."""

from __future__ import annotations

import re
from dataclasses import dataclass

EVICTION_POLICIES = ("lru", "lfu", "fifo", "arc", "s3fifo")
KV_WRITE_POLICIES = ("write_back", "write_through")
MAX_KV_TIER_GIB = 1 << 20  # 1 PiB: a cap past it is a typo
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Keep in step with node/kv/quantization.KV_CACHE_DTYPES (this module imports no torch).
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "int8")


@dataclass
class EngineConfig:
    """Everything an :class:`~ultrakv.node.engine.Engine` needs to start.

    ``model`` is a preset name (``tiny``, ``llama-1b``, ``llama-8b``) or a path to a local
    Hugging Face checkpoint directory (config.json + safetensors). ``num_blocks`` fixes the
    KV pool size; when it is None the pool takes ``kv_memory_fraction`` of the free memory of
    the device (on CPU: ``cpu_kv_cache_bytes``).
    """

    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_fraction: float = 0.85
    cpu_kv_cache_bytes: int = 256 * 1024 * 1024
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_tokens_limit: int = 4096
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    eviction_policy: str = "lru"
    # KV cache element type: auto (the model's dtype) or one byte per element, int8 or fp8
    # (e4m3) with a float32 scale per token and kv head (node/kv/quantization.py).
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"
    use_cuda_graphs: bool = True
    # A step that is one sequence's prefill of at most this many new tokens (a conversation's
    # next turn, a short prompt) replays in a CUDA graph padded to a token bucket
    # (node/cuda_graphs.py); 0 leaves prefill eager (decode graphs only).
    cuda_graph_max_prefill_tokens: int = 512
    # Decode steps run back to back per scheduling round when only decodes are running and
    # nobody waits (vLLM's multi-step scheduling): the device feeds each step's tokens to the
    # next, and the host handles each step's tokens while the device computes the following
    # ones (so streaming stays per token). 1 turns it off. None: 32 on CUDA (on an H100,
    # llama-1b at batch 64 went from 16k tok/s at 1 to 33k at 32), 1 on CPU (nothing to overlap).
    num_scheduler_steps: int | None = None
    # Triton kernels for RMSNorm + residual add, RoPE and the SwiGLU activation (CUDA only).
    # None: on where the model runs on CUDA with Triton (on an H100 they took llama-1b decode
    # from 17.6k to 23.8k tok/s at batch 64); True elsewhere is refused.
    fused_kernels: bool | None = None
    # Speculative decoding from the sequence's own tokens (n-gram / prompt lookup): up to
    # ``speculative_tokens`` drafted per step and verified in the same forward (0 = off), for
    # greedy decode batches of at most ``speculative_max_batch`` sequences.
    speculative_tokens: int = 0
    speculative_max_ngram: int = 3
    speculative_max_batch: int = 8
    # Split the model over this many devices (Megatron-style; node/parallel/): rank 0 runs
    # this engine, the other ranks are worker processes it starts. On CPU every rank is a
    # gloo process on the CPU (for tests); on CUDA, consecutive devices from ``device``.
    tensor_parallel_size: int = 1
    # Data parallel inside the node: one engine per listed device ("" = one engine on
    # ``device``), sessions placed by consistent hashing with bounded load
    # (node/parallel/data_parallel.py). "all", a count "N" or indices "0,1" of CUDA devices;
    # with device "cpu", "N" runs N engines on the CPU (tests and development only).
    gpus: str = ""
    priority_aging_s: float = 5.0
    session_ttl_s: float = 3600.0
    max_sessions: int = 100_000
    # Histories held for ring neighbours: bounded in count and in tokens (4M tokens is about
    # 150 MiB of Python ints); the least recently stored go first.
    max_replicas: int = 100_000
    max_replica_tokens: int = 1 << 22
    # KV tiers below the GPU pool (node/kv/tiers.py): host memory (pinned on CUDA) and a
    # local disk directory that outlives restarts. 0 / "" turn a tier off. write_back copies
    # a block down when the tier above evicts it; write_through as soon as it is full.
    kv_cpu_gib: float = 0.0
    kv_disk_dir: str = ""
    kv_disk_gib: float = 16.0
    kv_write_policy: str = "write_back"
    kv_cpu_eviction_policy: str = "lru"
    kv_disk_eviction_policy: str = "lru"
    # Load tier hits group of layers by group, each layer waiting only for its own blocks, so
    # the copies overlap the request's prefill (CUDA; prefills that run eagerly: a turn that
    # a prefill graph takes loads whole). Off until measured a win on a GPU.
    kv_tier_layerwise: bool = False
    # Run the engine (model, scheduler, KV cache, sessions) in a child process of the node
    # (node/engine_core.py), so the servers' event loop and the engine's step thread do not
    # share one GIL (docs/serving-overhead.md). None: on for one engine on a CUDA device
    # (an H100 node at 64 streams kept 62% of the in-process engine's throughput threaded,
    # 88-117% with the core process), off on the CPU and with gpus / tensor parallelism
    # (see wants_engine_process).
    engine_process: bool | None = None

    def wants_engine_process(self) -> bool:
        """``engine_process`` as set; unset, whether one engine runs on a CUDA device (the
        servers and the step thread then compete for one GIL while the GPU waits; on the CPU
        torch's own threads are what bounds a step, and a second process costs a model's
        memory and start-up). Resolving ``device: auto`` asks torch whether CUDA is there."""
        if self.engine_process is not None:
            return self.engine_process
        if self.gpus or self.tensor_parallel_size > 1:
            return False
        if self.device == "auto":
            import torch

            return torch.cuda.is_available()
        return self.device.startswith("cuda")

    def __post_init__(self) -> None:
        _check(
            self.block_size in (8, 16, 32, 64, 128),
            "block_size",
            "one of 8, 16, 32, 64, 128",
            self.block_size,
        )
        _check(
            self.num_blocks is None or self.num_blocks >= 2, "num_blocks", ">= 2", self.num_blocks
        )
        _check(
            0.0 < self.kv_memory_fraction <= 1.0,
            "kv_memory_fraction",
            "in (0, 1]",
            self.kv_memory_fraction,
        )
        _check(self.cpu_kv_cache_bytes > 0, "cpu_kv_cache_bytes", "> 0", self.cpu_kv_cache_bytes)
        _check(
            self.max_model_len is None or self.max_model_len >= 1,
            "max_model_len",
            ">= 1",
            self.max_model_len,
        )
        _check(self.max_num_seqs >= 1, "max_num_seqs", ">= 1", self.max_num_seqs)
        _check(0 <= self.cuda_graph_max_prefill_tokens <= 512, "cuda_graph_max_prefill_tokens", "in [0, 512]",
               self.cuda_graph_max_prefill_tokens)
        _check(0 <= self.speculative_tokens <= 16, "speculative_tokens", "in [0, 16]", self.speculative_tokens)
        _check(1 <= self.speculative_max_ngram <= 16, "speculative_max_ngram", "in [1, 16]",
               self.speculative_max_ngram)
        _check(self.speculative_max_batch >= 1, "speculative_max_batch", ">= 1", self.speculative_max_batch)
        _check(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            ">= 1",
            self.max_num_batched_tokens,
        )
        _check(self.max_tokens_limit >= 1, "max_tokens_limit", ">= 1", self.max_tokens_limit)
        _check(
            self.eviction_policy in EVICTION_POLICIES,
            "eviction_policy",
            f"one of {EVICTION_POLICIES}",
            self.eviction_policy,
        )
        _check(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _check(self.num_scheduler_steps is None or 1 <= self.num_scheduler_steps <= 64,
               "num_scheduler_steps", "in [1, 64]", self.num_scheduler_steps)
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"one of {KV_CACHE_DTYPES}",
               self.kv_cache_dtype)
        _check(1 <= self.tensor_parallel_size <= 64, "tensor_parallel_size", "in [1, 64]",
               self.tensor_parallel_size)
        # A lone number is a count (>= 1); a comma-separated list names device indices.
        _check(re.fullmatch(r"|all|[1-9][0-9]*|[0-9]+(,[0-9]+)+", self.gpus) is not None, "gpus",
               "'all', a device count N >= 1 or device indices like '0,1'", self.gpus)
        _check(not self.gpus or self.tensor_parallel_size == 1, "gpus",
               "empty with tensor_parallel_size > 1 (data and tensor parallelism do not combine yet)",
               self.gpus)
        # The tiers copy whole blocks of this process's pool, which under tensor parallelism
        # holds only rank 0's heads.
        _check(self.tensor_parallel_size == 1 or not (self.kv_cpu_gib or self.kv_disk_dir),
               "tensor_parallel_size", "1 with the CPU or disk KV tier (kv_cpu_gib, kv_disk_dir)",
               self.tensor_parallel_size)
        _check(self.tensor_parallel_size == 1 or self.kv_cache_dtype == "auto", "tensor_parallel_size",
               "1 with a quantized kv_cache_dtype (int8, fp8_e4m3)", self.tensor_parallel_size)
        _check(self.priority_aging_s > 0, "priority_aging_s", "> 0", self.priority_aging_s)
        _check(self.session_ttl_s > 0, "session_ttl_s", "> 0", self.session_ttl_s)
        _check(self.max_sessions >= 1, "max_sessions", ">= 1", self.max_sessions)
        _check(self.max_replicas >= 1, "max_replicas", ">= 1", self.max_replicas)
        _check(self.max_replica_tokens >= 1, "max_replica_tokens", ">= 1", self.max_replica_tokens)
        _check(0 <= self.kv_cpu_gib <= MAX_KV_TIER_GIB, "kv_cpu_gib", f"in [0, {MAX_KV_TIER_GIB}]",
               self.kv_cpu_gib)
        _check(0 < self.kv_disk_gib <= MAX_KV_TIER_GIB, "kv_disk_gib", f"in (0, {MAX_KV_TIER_GIB}]",
               self.kv_disk_gib)
        _check(isinstance(self.kv_disk_dir, str), "kv_disk_dir", "a directory path or ''",
               self.kv_disk_dir)
        _check(self.kv_write_policy in KV_WRITE_POLICIES, "kv_write_policy",
               f"one of {KV_WRITE_POLICIES}", self.kv_write_policy)
        for name in ("kv_cpu_eviction_policy", "kv_disk_eviction_policy"):
            _check(getattr(self, name) in EVICTION_POLICIES, name, f"one of {EVICTION_POLICIES}",
                   getattr(self, name))
        _check(self.engine_process is None or isinstance(self.engine_process, bool),
               "engine_process", "true, false or null (null: on for one engine on CUDA)",
               self.engine_process)
        _check(not (self.engine_process and self.gpus), "engine_process",
               "false with gpus (data-parallel engines in a core process: not supported yet)",
               self.engine_process)
        if (self.kv_cpu_gib or self.kv_disk_dir) and not self.enable_prefix_caching:
            raise ValueError("kv_cpu_gib and kv_disk_dir need enable_prefix_caching: true "
                             "(the tiers are keyed by the prefix cache's block hashes)")
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            _check(
                self.max_num_batched_tokens >= self.max_model_len,
                "max_num_batched_tokens",
                f">= max_model_len ({self.max_model_len}) without chunked prefill",
                self.max_num_batched_tokens,
            )


def _check(ok: bool, field: str, limit: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {limit}, got {got!r}")
