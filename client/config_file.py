"""The YAML config file that ``ultrakv serve`` / ``ultrakv node`` read (``--config``) and
``ultrakv config --generate [--preset NAME]`` writes, with a comment on every key.

Sections: ``server`` (ServerSettings), ``limits`` (edge Limits), ``engine``
(EngineConfig), ``security`` (SecuritySettings: keys, TLS, rate limits, quotas; the
coordinator reads this section too) and ``backup`` (BackupSettings, read by ``ultrakv backup
create|schedule --config``). A preset (client/presets/NAME.yaml) overrides some keys of the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from ultrakv.client.backup import BackupSettings
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.validation import Limits
from ultrakv.node.config import EngineConfig
from ultrakv.node.server import ServerSettings

PRESETS = ("development", "production", "high_performance", "memory_efficient",
           "bulk_processing")

HELP: dict[str, dict[str, str]] = {
    "server": {
        "host": "address to listen on (0.0.0.0 = every interface)",
        "port": "gRPC port",
        "node_id": "this node's name in results and stats (empty = generated)",
        "grace_period_s": "on shutdown, seconds running requests get to finish",
        "max_message_bytes": "largest gRPC message accepted or sent",
        "max_streams_per_connection": "calls one connection may hold open at once",
        "stall_timeout_s": "health says NOT_SERVING while requests wait and no model step "
                           "completes for this long",
        "stream_flush_interval_s": "a stream's new tokens wait at least this long for company "
                                   "after a write (0 = one message per engine delta)",
        "stream_messages_per_s": "Generate stream messages this server aims at in all: with many "
                                 "streams open each waits longer (1..1000000; a coordinator reads it too)",
        "stream_max_wait_ms": "the longest a stream's new tokens wait for company (0..1000; the first "
                              "token and a request's end never wait)",
        "tls_cert": "PEM certificate chain; with tls_key, the server speaks TLS",
        "tls_key": "PEM private key",
        "peer_ca_cert": "PEM CA of the cluster: peers must present a certificate it signed "
                        "(mutual TLS); this node dials its peers with tls_cert",
        "cluster_secret_file": "file (0600) with the secret internal calls must carry "
                               "(empty = NodeService unauthenticated)",
        "metrics_port": "Prometheus /metrics HTTP port (0 = off)",
        "advertise_host": "host others dial to reach this node (empty = derived from host)",
        "http_port": "OpenAI-compatible API, /health and /metrics over HTTP (0 = off)",
    },
    "limits": {
        "default_max_length": "new tokens when a request sets no max_length",
        "max_prompt_bytes": "larger text prompts are refused (RESOURCE_EXHAUSTED)",
        "max_prompt_token_ids": "larger token-id prompts are refused (RESOURCE_EXHAUSTED)",
        "max_stop_sequences": "stop strings per request",
        "max_stop_sequence_bytes": "bytes per stop string",
        "max_stop_token_ids": "stop token ids per request",
        "stream_idle_timeout_s": "a Generate stream with no request in flight is closed after "
                                 "this many quiet seconds",
        "max_batch_size": "requests per ProcessBatch call",
        "max_batch_concurrency": "requests of one batch in flight at once, at most",
    },
    "engine": {
        "model": "preset (tiny, llama-1b, llama-8b) or a local Hugging Face checkpoint dir",
        "device": "auto, cpu or cuda:N",
        "dtype": "auto (the checkpoint's), float32, float16 or bfloat16",
        "seed": "seed of synthetic weights and of sampling without a per-request seed",
        "block_size": "tokens per KV block",
        "num_blocks": "KV pool size in blocks (null = sized from memory)",
        "kv_memory_fraction": "share of free GPU memory the KV pool takes",
        "cpu_kv_cache_bytes": "KV pool size on CPU",
        "max_model_len": "context length (null = the model's)",
        "max_num_seqs": "sequences in the running batch, at most",
        "max_num_batched_tokens": "tokens per engine step (prefill chunks + decodes)",
        "max_tokens_limit": "largest max_length a request may ask for",
        "enable_prefix_caching": "share KV blocks between equal prefixes",
        "enable_chunked_prefill": "split long prompts across steps",
        "eviction_policy": "which cached blocks go first: lru, lfu, fifo, arc or s3fifo",
        "kv_cache_dtype": "KV cache elements: auto (the model's dtype), int8 or fp8_e4m3 (one byte "
                          "each plus a float32 scale per token and kv head)",
        "attention_backend": "auto, torch or triton",
        "use_cuda_graphs": "replay CUDA graphs for decode",
        "cuda_graph_max_prefill_tokens": "one sequence's prefill of at most this many tokens (a session's next "
                                         "turn) replays in a CUDA graph (0 = decode graphs only)",
        "num_scheduler_steps": "decode steps per round when only decodes run (1 = off; unset: 32 on CUDA, 1 on CPU)",
        "fused_kernels": "Triton kernels for norm + residual, RoPE and SwiGLU (CUDA only)",
        "speculative_tokens": "n-gram speculative decoding: tokens drafted per step from the context (0 = off)",
        "speculative_max_ngram": "longest context suffix matched to find a draft",
        "speculative_max_batch": "speculate only when at most this many sequences decode (greedy)",
        "gpus": "one engine per device: 'all', a count N or indices '0,1' ('' = one engine; "
                "N with device cpu: tests only)",
        "tensor_parallel_size": "split the model over this many devices (Megatron-style; workers started by the node)",
        "priority_aging_s": "waiting requests gain one priority level per this many seconds",
        "session_ttl_s": "idle sessions older than this are removed",
        "max_sessions": "sessions held at most (the least recently used go first)",
        "max_replicas": "replicated histories held for ring neighbours, at most",
        "max_replica_tokens": "tokens in all replicated histories, at most (oldest go first)",
        "kv_cpu_gib": "host-memory KV tier below the GPU pool, GiB (pinned on CUDA; 0 = off)",
        "kv_disk_dir": "disk KV tier directory, kept across restarts (empty = off)",
        "kv_disk_gib": "disk KV tier size cap, GiB",
        "kv_write_policy": "write_back (a block goes down a tier when evicted) or write_through",
        "kv_cpu_eviction_policy": "host tier: which block goes first (lru, lfu, fifo, arc, s3fifo)",
        "kv_disk_eviction_policy": "disk tier: which block file goes first (lru, lfu, fifo, arc, s3fifo)",
        "engine_process": "run the engine in a child process of the node (its own GIL: the "
                          "servers' event loop and the engine's steps run in parallel); "
                          "null = on for one engine on CUDA, off on the CPU and with gpus",
        "kv_tier_layerwise": "load tier hits layer group by layer group, overlapped with the prefill "
                             "(CUDA; prefills that run eagerly, not those a prefill graph takes)",
    },
    "security": {
        "keys_file": "API keys (hashes) from `ultrakv keys create`; empty = no authentication",
        "ip_allow": "client CIDR ranges admitted (empty = all)",
        "ip_deny": "client CIDR ranges refused (wins over ip_allow)",
        "key_requests_per_s": "requests per second per API key, per coordinator process (0 = unlimited)",
        "key_tokens_per_s": "prompt + max_length tokens per second per API key (0 = unlimited)",
        "ip_requests_per_s": "requests per second per client address (0 = unlimited)",
        "ip_tokens_per_s": "tokens per second per client address (0 = unlimited)",
        "burst_s": "a rate limit's bucket holds this many seconds of its rate",
        "tenant_max_running": "requests in flight per tenant, per coordinator process (0 = unlimited)",
        "tenant_max_queued": "requests per tenant waiting for a running slot",
        "tenant_max_sessions": "sessions per tenant on each node (0 = unlimited)",
        "tenant_max_session_tokens": "history tokens per tenant on each node (0 = unlimited)",
        "signature_window_s": "signed requests: clock skew and replay window (nonces kept per process)",
        "max_nonces": "signed requests: nonces remembered, at most",
        "tls_cert": "PEM certificate chain of the client port (with tls_key: TLS)",
        "tls_key": "PEM private key of the client port",
        "tls_client_ca": "PEM CA that client certificates must chain to (mutual TLS)",
    },
    "backup": {
        "dir": "folder `ultrakv backup create|schedule|list` keep backups in",
        "schedule_s": "`ultrakv backup schedule`: seconds between backups",
        "keep": "backups kept in dir; older ones are deleted after each new one",
        "compress": "none (a directory per backup) or zstd (one .tar.zst file)",
        "history_only": "back up histories without KV (smaller; KV recomputed after restore)",
    },
}
# Limits.max_tokens_limit is not a key of its own: it follows engine.max_tokens_limit.
_SECTIONS = {"server": ServerSettings, "limits": Limits, "engine": EngineConfig,
             "security": SecuritySettings, "backup": BackupSettings}
_NOT_KEYS = {"server": {"limits", "security", "node_service"}, "limits": {"max_tokens_limit"},
             "engine": set(), "security": set(), "backup": set()}


@dataclass
class NodeConfig:
    """Everything a node process needs: how to serve and what engine to run."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeConfig:
        """Build from a parsed config file; unknown sections or keys are errors."""
        data = dict(data or {})
        data.pop("description", None)
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise ValueError(f"config sections must be among {sorted(_SECTIONS)}, "
                             f"got {sorted(unknown)}")
        values = {}
        for name in _SECTIONS:
            section = data.get(name) or {}
            if not isinstance(section, dict):
                raise ValueError(f"config section {name} must be a mapping, got {section!r}")
            allowed = _keys(name)
            bad = set(section) - set(allowed)
            if bad:
                raise ValueError(f"{name}.{sorted(bad)[0]} is not a config key "
                                 f"(known: {', '.join(allowed)})")
            values[name] = section
        engine = EngineConfig(**values["engine"])
        limits = Limits(**values["limits"], max_tokens_limit=engine.max_tokens_limit)
        security = SecuritySettings(**values["security"])
        return cls(engine=engine, server=ServerSettings(**values["server"], limits=limits,
                                                        security=security),
                   backup=BackupSettings(**values["backup"]))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        objects = {"server": self.server, "limits": self.server.limits, "engine": self.engine,
                   "security": self.server.security, "backup": self.backup}
        return {name: {k: getattr(obj, k) for k in _keys(name)} for name, obj in objects.items()}

    def with_overrides(self, engine: dict[str, Any], server: dict[str, Any],
                       security: dict[str, Any] | None = None) -> NodeConfig:
        """Command-line flags over the file: only the values that were given (not None)."""
        engine = {k: v for k, v in engine.items() if v is not None}
        server = {k: v for k, v in server.items() if v is not None}
        security = {k: v for k, v in (security or {}).items() if v is not None}
        new_engine = replace(self.engine, **engine)
        limits = replace(self.server.limits, max_tokens_limit=new_engine.max_tokens_limit)
        return NodeConfig(new_engine, replace(self.server, **server, limits=limits,
                                              security=replace(self.server.security, **security)),
                          self.backup)


def _keys(section: str) -> list[str]:
    return [f.name for f in fields(_SECTIONS[section]) if f.name not in _NOT_KEYS[section]]


def load_config(path: str | Path) -> NodeConfig:
    """Read a config file written by :func:`render_config` (or by hand)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    try:
        return NodeConfig.from_dict(data or {})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def load_preset(name: str) -> tuple[NodeConfig, str]:
    """A preset's config and its description."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    text = (resources.files("ultrakv.client") / "presets" / f"{name}.yaml").read_text("utf-8")
    data = yaml.safe_load(text)
    return NodeConfig.from_dict(data), str(data.get("description", ""))


def render_config(config: NodeConfig, title: str = "") -> str:
    """The config as commented YAML that :func:`load_config` reads back."""
    lines = ["# ultrakv node configuration" + (f" - {title}" if title else ""),
             "# Read by `ultrakv serve --config FILE` and `ultrakv node --config FILE`;",
             "# command-line flags override these values.", ""]
    for section, values in config.to_dict().items():
        lines.append(f"{section}:")
        for key, value in values.items():
            help_text = HELP[section].get(key)
            if help_text:
                lines.append(f"  # {help_text}")
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()
            lines.append("  " + dumped.removeprefix("{").removesuffix("}"))
        lines.append("")
    return "\n".join(lines)


def generate_config(preset: str = "development") -> str:
    """The text of ``ultrakv config --generate --preset NAME``."""
    config, description = load_preset(preset)
    return render_config(config, f"preset {preset}: {description}")
