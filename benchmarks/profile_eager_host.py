"""The host's cost of one eager forward, and of the launches it is made of.

An eager step (a cold prompt past the prefill graphs, any step of several sequences) launches
every kernel from Python. This times, on llama-1b without CUDA graphs, the model's forward
from its call to its return (the launches) and to the device's end, for a short and a long
prompt; then the host time of one launch of each kind the forward makes, without a profiler
in the way; then a cProfile of ten short prompts, by own time.

    python benchmarks/profile_eager_host.py --model llama-1b

Writes benchmarks/results/eager_host_<gpu>_<model>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import host_us, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    args = p.parse_args()
    engine = Engine(EngineConfig(model=args.model, device="cuda", use_cuda_graphs=False,
                                 max_num_batched_tokens=8192, max_model_len=4096))
    engine.warmup()
    rng = random.Random(0)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    model = engine.runner.model
    forwards = []
    forward = model.forward

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = forward(*a, **k)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        forwards.append({"tokens": a[0].shape[0], "launch_ms": round((t1 - t0) * 1e3, 2),
                         "to_device_end_ms": round((time.perf_counter() - t0) * 1e3, 2)})
        return out

    model.forward = timed
    for n in [200, 2300] * 3:
        engine.clear_cache()
        engine.generate([[rng.randrange(1, 256) for _ in range(n)]], one)
    model.forward = forward
    print("forwards:", forwards, flush=True)

    # One launch of each kind, at a 208-token step's shapes.
    from ultrakv.node.model import fused_kernels as fk

    layer = model.model.layers[0]
    dev, dtype = torch.device("cuda"), next(model.parameters()).dtype
    h = torch.randn(208, model.config.hidden_size, device=dev, dtype=dtype)
    res = torch.randn_like(h)
    w = layer.input_layernorm.weight
    gate_up = torch.randn(208, 2 * model.config.intermediate_size, device=dev, dtype=dtype)
    def per_call_us(fn) -> float:
        return round(host_us(fn, n=500), 1)

    launches = {
        "linear qkv (cuBLAS)": per_call_us(lambda: layer.self_attn.qkv_proj(h)),
        "F.linear down (cuBLAS)": per_call_us(lambda: layer.mlp.down_proj(fk.silu_and_mul(gate_up))),
        "rms_norm (Triton)": per_call_us(lambda: fk.rms_norm(h, w, 1e-5)),
        "rms_norm + residual (Triton)": per_call_us(lambda: fk.rms_norm(h, w, 1e-5, res)),
        "silu_and_mul (Triton)": per_call_us(lambda: fk.silu_and_mul(gate_up)),
        "torch.empty_like": per_call_us(lambda: torch.empty_like(h)),
        "torch add (aten)": per_call_us(lambda: h + res),
    }
    print("host us per launch:", launches, flush=True)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        engine.clear_cache()
        engine.generate([[rng.randrange(1, 256) for _ in range(200)]], one)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    text = out.getvalue()
    print(text[:6000])
    engine.shutdown()
    write(f"eager_host_{torch.cuda.get_device_name(0).replace(' ', '_')}_{args.model}.json",
          {"model": args.model, "forwards": forwards, "host_us_per_launch": launches,
           "cprofile_10_prompts_of_200_tokens": text})


if __name__ == "__main__":
    main()
