"""GPU benchmark (issue 5): ultrakv vs transformers generate() on the same model and GPU.

For each model (default: the llama-1b and llama-8b presets, bfloat16):
  (a) batch-1 decode tokens/s and its fraction of the HBM roofline
      (bytes per step = weights + KV read, over the measured copy bandwidth);
  (b) throughput with 64 and 256 concurrent requests (chat-like lengths, seeded);
  (c) multi-turn chat: 8 turns of 200 new tokens + 100 generated; TTFT per turn with session
      reuse vs recomputing the history (cache cleared before each recompute);
  (d) shared-prefix bulk: N requests behind one 1000-token system prompt, prefix caching on
      vs off;
  peer: transformers generate() (same weights, bf16, SDPA) for (a) and (b) at 64.
Writes benchmarks/results/gpu_<gpu>.json. `--smoke` runs everything tiny on CPU to check the
script itself. Usage: python benchmarks/bench_gpu.py [--models llama-1b llama-8b] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, summary, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.model.llama import _fused_target  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written), median of 10 runs."""
    if device.type != "cuda":
        return 0.0
    x = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = sorted(times[2:])[len(times[2:]) // 2]
    del x, y
    return 2 * 2 * 2**30 / t / 1e9


def chat_lengths(rng: random.Random, n: int, smoke: bool) -> list[tuple[int, int]]:
    """(prompt, output) lengths: lognormal like chat traffic, clipped."""
    scale = 0.1 if smoke else 1.0
    out = []
    for _ in range(n):
        p = int(min(1024, max(16, rng.lognormvariate(math.log(256), 0.7))) * scale) or 4
        o = int(min(512, max(16, rng.lognormvariate(math.log(128), 0.6))) * scale) or 4
        out.append((p, o))
    return out


def toks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 256) for _ in range(n)]


SCHEDULER_STEPS = 32  # decode steps per scheduling round (--scheduler-steps; the CUDA default)
FUSED_KERNELS = True  # Triton norm/RoPE/SwiGLU kernels (--no-fused-kernels turns them off)


def engine_for(model: str, device: str, smoke: bool, **kw) -> Engine:
    cfg = dict(
        model=model,
        device=device,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_model_len=4096,
        num_scheduler_steps=SCHEDULER_STEPS,
        fused_kernels=FUSED_KERNELS and not smoke,
    )
    if smoke:
        cfg.update(num_blocks=2048, max_num_seqs=64)
    cfg.update(kw)
    engine = Engine(EngineConfig(**cfg))
    engine.warmup()  # graph captures happen here, not inside a measurement
    return engine


def weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: every parameter, less an untied input embedding
    (a step gathers one row of it; a tied one is read whole as the output projection)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if getattr(model, "lm_head", None) is not None:
        embedding = model.model.embed_tokens.weight
        total -= embedding.numel() * embedding.element_size()
    return total


def kv_bytes_per_token(engine: Engine) -> int:
    mc = engine.model_config
    return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * engine.kv_caches[0].element_size()


def bench_batch1(engine: Engine, rng: random.Random, bw_gbs: float, smoke: bool) -> dict:
    prompt_len, new = (32, 16) if smoke else (128, 256)
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    engine.generate([toks(rng, prompt_len)], sp)  # warm-up and graph capture
    runs = []
    for _ in range(3):
        out = engine.generate([toks(rng, prompt_len)], sp)[0]
        runs.append((new - 1) / (out.latency_s - out.ttft_s))
    tps = sorted(runs)[1]
    avg_ctx = prompt_len + new / 2
    step_bytes = weight_bytes(engine.model) + avg_ctx * kv_bytes_per_token(engine)
    achieved = step_bytes * tps / 1e9
    return {
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "decode_tokens_per_s": tps,
        "ms_per_token": 1e3 / tps,
        "bytes_per_step": step_bytes,
        "achieved_gbs": achieved,
        "copy_bandwidth_gbs": bw_gbs,
        "roofline_fraction": achieved / bw_gbs if bw_gbs else None,
    }


def bench_concurrent(engine: Engine, rng: random.Random, n: int, smoke: bool) -> dict:
    lengths = chat_lengths(rng, n, smoke)
    prompts = [toks(rng, p) for p, _ in lengths]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in lengths]
    engine.generate(prompts[:4], params[:4])  # warm-up
    sync()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    gen = sum(o.completion_tokens for o in outs)
    return {
        "concurrency": n,
        "wall_s": wall,
        "output_tokens": gen,
        "output_tokens_per_s": gen / wall,
        "prompt_tokens": sum(p for p, _ in lengths),
        "ttft_s": summary([o.ttft_s for o in outs]),
        "preemptions": engine.stats()["requests"]["preemptions"],
    }


def bench_multi_turn(engine: Engine, rng: random.Random, smoke: bool, sessions: int = 4) -> dict:
    """Each turn's TTFT is the median over ``sessions`` conversations run one after another."""
    turns, new_prompt, new_out = (4, 20, 10) if smoke else (8, 200, 100)
    sp = SamplingParams(max_tokens=new_out, temperature=0.0, ignore_eos=True)
    engine.generate([toks(rng, new_prompt)], sp)  # warm-up
    reuse: list[list[dict]] = [[] for _ in range(turns)]
    recompute: list[list[dict]] = [[] for _ in range(turns)]
    for _ in range(sessions):
        sid = f"bench-{rng.randrange(10**9)}"
        history: list[int] = []
        histories = []
        for t in range(turns):
            prompt = toks(rng, new_prompt)
            histories.append(history + prompt)
            out = engine.generate([prompt], sp, session_ids=[sid])[0]
            reuse[t].append(
                {"ttft_s": out.ttft_s, "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens}
            )
            history = history + prompt + out.token_ids
        for t in range(turns):
            engine.clear_cache()
            out = engine.generate([histories[t]], sp)[0]
            recompute[t].append(
                {"ttft_s": out.ttft_s, "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens}
            )

    def per_turn(runs: list[list[dict]]) -> list[dict]:
        return [
            {
                "turn": t + 1,
                "ttft_s": summary([r["ttft_s"] for r in rs])["p50"],
                "prompt_tokens": rs[0]["prompt_tokens"],
                "cached_tokens": rs[0]["cached_tokens"],
            }
            for t, rs in enumerate(runs)
        ]

    reuse_t, recompute_t = per_turn(reuse), per_turn(recompute)
    return {
        "turns": turns,
        "sessions": sessions,
        "new_prompt_tokens": new_prompt,
        "generated_per_turn": new_out,
        "reuse": reuse_t,
        "recompute": recompute_t,
        "last_turn_ttft_speedup": recompute_t[-1]["ttft_s"] / reuse_t[-1]["ttft_s"],
    }


def bench_shared_prefix(model: str, device: str, rng: random.Random, n: int, smoke: bool) -> dict:
    system = toks(rng, 100 if smoke else 1000)
    suffixes = [toks(rng, rng.randint(16, 64) // (8 if smoke else 1) or 2) for _ in range(n)]
    new = 8 if smoke else 32
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    result = {"requests": n, "system_prompt_tokens": len(system), "new_tokens": new}
    for label, caching in (("prefix_cache_on", True), ("prefix_cache_off", False)):
        engine = engine_for(model, device, smoke, enable_prefix_caching=caching)
        engine.generate([system + toks(rng, 8)], sp)  # warm-up (and, when on, fills the prefix)
        sync()
        t0 = time.perf_counter()
        outs = engine.generate([system + s for s in suffixes], sp)
        wall = time.perf_counter() - t0
        result[label] = {
            "wall_s": wall,
            "requests_per_s": n / wall,
            "output_tokens_per_s": sum(o.completion_tokens for o in outs) / wall,
            "cached_tokens": sum(o.cached_tokens for o in outs),
            "ttft_s": summary([o.ttft_s for o in outs]),
        }
        del engine
        free_memory()
    result["throughput_speedup"] = (
        result["prefix_cache_on"]["requests_per_s"] / result["prefix_cache_off"]["requests_per_s"]
    )
    return result


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the peer -------------------------------------------------------------------------------


@dataclass
class TwinSource:
    """What the transformers twin is built from once the engine is gone: the engine's
    weights on the host and its greedy next token for a probe prompt."""

    model_config: object
    params: dict[str, torch.Tensor]
    dtype: torch.dtype
    probe: list[int]
    probe_token: int

    @classmethod
    def of(cls, engine: Engine) -> TwinSource:
        probe = list(range(1, 33))
        token = engine.generate([probe], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0].token_ids[0]
        params = {name: p.detach().to("cpu") for name, p in engine.model.named_parameters()}
        return cls(engine.model_config, params, next(engine.model.parameters()).dtype, probe, token)


def hf_twin(src: TwinSource, device: torch.device):
    """A transformers LlamaForCausalLM on ``device`` with the engine's exact weights. Built
    after the engine is deleted: llama-8b's engine (its KV pool sized to the free memory) and
    a twin beside it did not fit in 80 GB."""
    import transformers

    mc = src.model_config
    cfg = transformers.LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads,
        head_dim=mc.head_dim,
        max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope_theta,
        rope_scaling=mc.rope_scaling,
        tie_word_embeddings=mc.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(src.dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    ours = src.params
    c = mc
    qkv = {"q_proj": (0, c.q_size), "k_proj": (c.q_size, c.kv_size), "v_proj": (c.q_size + c.kv_size, c.kv_size)}
    gate_up = {"gate_proj": (0, c.intermediate_size), "up_proj": (c.intermediate_size, c.intermediate_size)}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name == "lm_head.weight" and mc.tie_word_embeddings:
                continue
            target, rows = _fused_target(name, qkv, "qkv_proj")
            if target is None:
                target, rows = _fused_target(name, gate_up, "gate_up_proj")
            src_param = ours[target or name]
            p.copy_(src_param if rows is None else src_param.narrow(0, rows[0], rows[1]))
        if mc.tie_word_embeddings:
            hf.tie_weights()
    hf.generation_config.pad_token_id = 0
    hf.eval()
    # The twin must be the same model: its greedy next token agrees with the engine's.
    with torch.inference_mode():
        theirs_tok = int(hf(torch.tensor([src.probe], device=device)).logits[0, -1].argmax())
    if src.probe_token != theirs_tok:
        raise RuntimeError(f"transformers twin disagrees with the engine: {theirs_tok} != {src.probe_token}")
    return hf


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], new_tokens: list[int], device: torch.device) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generate() expects
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync()
    t0 = time.perf_counter()
    hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(new_tokens),
        min_new_tokens=max(new_tokens),
        do_sample=False,
        eos_token_id=None,
    )
    sync()
    wall = time.perf_counter() - t0
    # A batch runs until its longest request is done; count only the tokens each request asked for.
    return {"wall_s": wall, "useful_output_tokens": sum(new_tokens), "output_tokens_per_s": sum(new_tokens) / wall}


def bench_peer(src: TwinSource, device: torch.device, rng: random.Random, smoke: bool, concurrency: int) -> dict:
    hf = hf_twin(src, device)
    prompt_len, new = (32, 16) if smoke else (128, 128)
    hf_generate(hf, [toks(rng, 8)], [4], device)  # warm-up
    b1 = hf_generate(hf, [toks(rng, prompt_len)], [new], device)
    b1["decode_tokens_per_s"] = new / b1["wall_s"]
    lengths = chat_lengths(rng, concurrency, smoke)
    conc = hf_generate(hf, [toks(rng, p) for p, _ in lengths], [o for _, o in lengths], device)
    conc["concurrency"] = concurrency
    del hf
    free_memory()
    return {"batch1": b1, f"concurrent_{concurrency}": conc}


def run_model(model: str, device: str, smoke: bool, bulk_requests: int, bw: float) -> dict:
    rng = random.Random(0)
    log(f"{model}: building engine")
    engine = engine_for(model, device, smoke)
    res: dict = {
        "model": model,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "attention_backend": engine.attention_backend,
        "cuda_graphs": engine.cuda_graphs,
        "kv_blocks": engine.num_blocks,
        "weight_bytes": weight_bytes(engine.model),
    }
    res["num_scheduler_steps"] = engine.num_scheduler_steps
    res["fused_kernels"] = engine.config.fused_kernels
    if engine.num_scheduler_steps > 1:
        log(f"{model}: (a) batch-1 decode, one step per scheduling round (for comparison)")
        engine.num_scheduler_steps = 1  # read at every scheduling round
        res["a_batch1_one_step_per_round"] = bench_batch1(engine, rng, bw, smoke)
        engine.num_scheduler_steps = SCHEDULER_STEPS
    log(f"{model}: (a) batch-1 decode, {SCHEDULER_STEPS} steps per scheduling round")
    res["a_batch1"] = bench_batch1(engine, rng, bw, smoke)
    log(f"{model}: {res['a_batch1']['decode_tokens_per_s']:.1f} tok/s, roofline {res['a_batch1']['roofline_fraction']}")
    for n in (64, 256) if not smoke else (16, 32):
        log(f"{model}: (b) {n} concurrent")
        res[f"b_concurrent_{n}"] = bench_concurrent(engine, rng, n, smoke)
        log(f"{model}: {res[f'b_concurrent_{n}']['output_tokens_per_s']:.0f} output tok/s")
    log(f"{model}: (c) multi-turn")
    res["c_multi_turn"] = bench_multi_turn(engine, rng, smoke)
    log(f"{model}: last-turn TTFT speedup {res['c_multi_turn']['last_turn_ttft_speedup']:.2f}x")
    log(f"{model}: peer transformers generate()")
    # On a CPU the engine keeps its projections packed for oneDNN (node/model/packed_linear.py):
    # no weights to give a twin (the smoke run has no peer).
    twin = TwinSource.of(engine) if engine.device.type == "cuda" else None
    engine_device = engine.device
    del engine
    free_memory()
    if twin is not None:
        res["peer_transformers"] = bench_peer(twin, engine_device, rng, smoke, 64 if not smoke else 16)
    del twin
    free_memory()
    log(f"{model}: (d) shared-prefix bulk x{bulk_requests}")
    res["d_shared_prefix"] = bench_shared_prefix(model, device, rng, bulk_requests, smoke)
    log(f"{model}: prefix-cache speedup {res['d_shared_prefix']['throughput_speedup']:.2f}x")
    peer = res.get("peer_transformers")
    key = "b_concurrent_64" if not smoke else "b_concurrent_16"
    pkey = "concurrent_64" if not smoke else "concurrent_16"
    res["targets"] = {
        "batch1_roofline_fraction": res["a_batch1"]["roofline_fraction"],
        "concurrent64_vs_transformers": (res[key]["output_tokens_per_s"] / peer[pkey]["output_tokens_per_s"]
                                         if peer else None),
        "batch1_vs_transformers": (res["a_batch1"]["decode_tokens_per_s"] / peer["batch1"]["decode_tokens_per_s"]
                                   if peer else None),
        "multi_turn_last_ttft_speedup": res["c_multi_turn"]["last_turn_ttft_speedup"],
        "shared_prefix_speedup": res["d_shared_prefix"]["throughput_speedup"],
    }
    log(f"{model}: targets {res['targets']}")
    return res


def run_multi_turn(model: str, device: str, smoke: bool) -> dict:
    """Only (c), with the next turn's prefill in a CUDA graph (the default) and eager
    (``cuda_graph_max_prefill_tokens=0``), on the same conversations."""
    res: dict = {"model": model}
    for label, tokens in (("prefill_graphs", 512), ("eager_prefill", 0)):
        log(f"{model}: (c) multi-turn, {label}")
        engine = engine_for(model, device, smoke, cuda_graph_max_prefill_tokens=tokens)
        res[label] = bench_multi_turn(engine, random.Random(0), smoke)
        log(f"{model}: last-turn TTFT reuse {res[label]['reuse'][-1]['ttft_s'] * 1e3:.2f} ms, "
            f"recompute {res[label]['recompute'][-1]['ttft_s'] * 1e3:.2f} ms, "
            f"speedup {res[label]['last_turn_ttft_speedup']:.2f}x")
        del engine
        free_memory()
    return res


def main() -> None:
    global SCHEDULER_STEPS, FUSED_KERNELS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-1b", "llama-8b"])
    ap.add_argument(
        "--bulk-requests", type=int, nargs="+", default=[1000, 1000], help="shared-prefix request count per model"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, small sizes: checks the script")
    ap.add_argument("--out", default=None)
    ap.add_argument("--multi-turn-only", action="store_true",
                    help="only (c), with and without the prefill CUDA graph (writes gpu_turn_<gpu>.json)")
    ap.add_argument("--batch1-only", action="store_true",
                    help="only (a), batch-1 decode and its roofline fraction (writes gpu_batch1_<gpu>.json)")
    ap.add_argument(
        "--scheduler-steps", type=int, default=SCHEDULER_STEPS, help="num_scheduler_steps of the engines (1 = off)"
    )
    ap.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=FUSED_KERNELS,
                    help="Triton kernels for norm + residual add, RoPE and SwiGLU")
    args = ap.parse_args()
    SCHEDULER_STEPS = args.scheduler_steps
    FUSED_KERNELS = args.fused_kernels
    device = "cpu" if args.smoke else "cuda"
    models = ["tiny"] if args.smoke else args.models
    bw = copy_bandwidth_gbs(torch.device(device))
    log(f"copy bandwidth {bw:.0f} GB/s")
    results = {"copy_bandwidth_gbs": bw, "models": {}}
    gpu = machine().get("gpu", "cpu").replace(" ", "_").replace("/", "_")
    kind = "turn_" if args.multi_turn_only else "batch1_" if args.batch1_only else ""
    name = args.out or f"gpu_{kind}{gpu}{'_smoke' if args.smoke else ''}.json"
    for i, model in enumerate(models):
        if args.batch1_only:
            engine = engine_for(model, device, args.smoke)
            results["models"][model] = {"a_batch1": bench_batch1(engine, random.Random(0), bw, args.smoke),
                                        "weight_bytes": weight_bytes(engine.model)}
            log(f"{model}: {results['models'][model]['a_batch1']}")
            del engine
            free_memory()
            write(name, results)
            continue
        if args.multi_turn_only:
            results["models"][model] = run_multi_turn(model, device, args.smoke)
            write(name, results)
            continue
        n = 40 if args.smoke else args.bulk_requests[min(i, len(args.bulk_requests) - 1)]
        results["models"][model] = run_model(model, device, args.smoke, n, bw)
        write(name, results)  # after each model, so a cut-off run keeps what it measured


if __name__ == "__main__":
    main()
