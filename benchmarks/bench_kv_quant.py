"""KV cache quantization (kv_cache_dtype int8 / fp8_e4m3) against the unquantized cache.

Measures, per KV dtype:

* capacity: bytes per block and blocks at equal memory (the same byte budget);
* accuracy against the unquantized cache in the model's dtype (``--dtype``; smollm2-135m's
  is float32, llama-1b's bfloat16): greedy agreement over ``--gen-tokens`` free-running tokens
  (fraction equal, first divergence), and teacher-forced logits over the float cache's greedy
  continuation (max / mean |logit error|, top-1 agreement). ``llama-1b`` has seeded random
  weights (its shapes are Llama-3.2-1B's, its outputs are not a language model's);
  ``smollm2-135m`` is the real packaged model;
* a needle-in-a-haystack retrieval check on smollm2-135m (a passcode hidden at several depths
  of filler text, asked for through the chat template, greedy), for every dtype including the
  unquantized baseline;
* with ``--device cuda``: decode tokens/s at 8k context (engine, Triton kernels, CUDA graphs).

The accuracy runs drive the model directly over a paged cache of each dtype (one sequence,
identity block table), through the same attention backend the engine would pick.
Writes benchmarks/results/kv_quant_<device>.json (or ``--out``).

Usage: python benchmarks/bench_kv_quant.py [--device cpu|cuda] [--models smollm2-135m,llama-1b]
       [--dtype auto|float32|bfloat16] [--prompt-tokens 512] [--gen-tokens 64] [--no-needle]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.attention import get_backend  # noqa: E402
from ultrakv.node.attention.base import AttentionMetadata, padded_table_width  # noqa: E402
from ultrakv.node.kv import quantization  # noqa: E402
from ultrakv.node.model.loader import load_model  # noqa: E402

KV_DTYPES = ("auto", "int8", "fp8_e4m3")
BLOCK_SIZE = 16
CAPACITY_BUDGET = 1 << 30  # blocks at equal memory: how many fit in 1 GiB

TEXT = (
    "The history of the lighthouse begins with fires lit on hills to guide ships home. Over "
    "centuries these fires moved into towers, and the towers grew taller as harbours grew "
    "busier. Keepers trimmed wicks, polished lenses and logged the weather every night. When "
    "the Fresnel lens arrived, a single lamp could be seen from twenty miles away, because the "
    "lens bent scattered light into one bright beam. Later, electric lamps replaced oil, and "
    "clockwork that turned the lens gave way to motors. Today most lights run on their own, "
    "watched from a distance, yet sailors still read their flashes the way their grandparents "
    "did: each light has its own rhythm, so a captain who counts the seconds between flashes "
    "knows exactly which coast lies ahead. Some towers became museums, others hotels, and a few "
    "still stand alone on rocks where waves break over the gallery in winter storms. "
)
FILLER = [
    "The grass is green and the sky is blue on a calm spring day.",
    "A small boat drifted slowly along the river past the old mill.",
    "Children played in the park while their parents talked on the benches.",
    "The bakery on the corner sells fresh bread every morning at seven.",
    "Clouds gathered over the hills, but the rain never came that afternoon.",
    "A cat slept on the windowsill, warm in the late sunlight.",
    "The train to the city leaves from platform two every half hour.",
    "In the library, students whispered over maps and old newspapers.",
]
NEEDLE = "The secret passcode is 48213."
ANSWER = "48213"


class PagedSequence:
    """One sequence over a paged KV cache of ``storage`` dtype: feed tokens, get logits."""

    def __init__(self, model, config, storage: torch.dtype, device: torch.device, max_tokens: int):
        num_blocks = -(-max_tokens // BLOCK_SIZE) + 1
        row = quantization.row_width(config.head_dim, storage)
        shape = (2, num_blocks, BLOCK_SIZE, config.num_key_value_heads, row)
        alloc = torch.uint8 if quantization.is_quantized(storage) else storage
        self.caches = [torch.zeros(shape, dtype=alloc, device=device).view(storage)
                       for _ in range(config.num_hidden_layers)]
        width = padded_table_width(num_blocks)
        table = torch.zeros(1, width, dtype=torch.int32)
        table[0, :num_blocks] = torch.arange(num_blocks, dtype=torch.int32)
        self.table = table.to(device)  # identity: position p sits in slot p
        self.model, self.device, self.length = model, device, 0

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Float32 logits [len(tokens), vocab] after appending ``tokens``."""
        n, start = len(tokens), self.length
        end = start + n
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=dev),
            block_tables=self.table,
            slot_mapping=torch.arange(start, end, dtype=torch.int64, device=dev),
            max_query_len=n, max_seq_len=end)
        ids = torch.tensor(tokens, dtype=torch.int64, device=dev)
        pos = torch.arange(start, end, dtype=torch.int64, device=dev)
        hidden = self.model(ids, pos, self.caches, meta)
        self.length = end
        return self.model.compute_logits(hidden)


def greedy(model, config, storage, device, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Free-running greedy: ``n`` tokens and the logits that chose each [n, vocab]."""
    seq = PagedSequence(model, config, storage, device, len(prompt) + n)
    logits = seq.feed(prompt)[-1:]
    out, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits[0].cpu())
        tok = int(logits[0].argmax())
        out.append(tok)
        logits = seq.feed([tok])
    return out, torch.stack(all_logits)


def teacher_forced(model, config, storage, device, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits predicting each token of ``continuation`` given the prompt and the reference
    tokens before it, decoded one token at a time (each step reads the quantized cache)."""
    seq = PagedSequence(model, config, storage, device, len(prompt) + len(continuation))
    rows = [seq.feed(prompt)[-1].cpu()]
    for tok in continuation[:-1]:
        rows.append(seq.feed([tok])[0].cpu())
    return torch.stack(rows)


def bytes_per_block(config, storage: torch.dtype) -> int:
    row = quantization.row_width(config.head_dim, storage) * storage.itemsize
    return 2 * BLOCK_SIZE * config.num_key_value_heads * row * config.num_hidden_layers


def accuracy(model_name: str, device: torch.device, dtype: str, prompt_tokens: int,
             gen_tokens: int) -> dict:
    backend = get_backend("auto", device)
    loaded = load_model(model_name, dtype, device, backend, seed=0)
    model, config = loaded.model, loaded.config
    model_dtype = next(model.parameters()).dtype
    if model_name == "llama-1b":
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 256, (prompt_tokens,), generator=g).tolist()
        source = f"{prompt_tokens} random byte-token ids (seed 0)"
    else:
        ids = loaded.tokenizer.encode(TEXT * 8, add_bos=True)
        prompt = ids[:prompt_tokens]
        source = f"the first {len(prompt)} tokens of an English text about lighthouses"
    t0 = time.perf_counter()
    ref_tokens, _ = greedy(model, config, model_dtype, device, prompt, gen_tokens)
    ref_forced = teacher_forced(model, config, model_dtype, device, prompt, ref_tokens)
    result = {
        "model": model_name,
        "weights": "seeded random (shapes of Llama-3.2-1B)" if model_name == "llama-1b"
                   else "real (packaged GGUF, dequantized to float32)",
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "attention_backend": backend.name,
        "prompt": source,
        "prompt_tokens": len(prompt),
        "gen_tokens": gen_tokens,
        "reference_text": loaded.tokenizer.decode(ref_tokens) if model_name != "llama-1b" else None,
        "logit_std_reference": round(float(ref_forced.std()), 4),
        "dtypes": {},
    }
    for name in KV_DTYPES:
        storage = quantization.storage_dtype(name, model_dtype)
        entry = {
            "bytes_per_block": bytes_per_block(config, storage),
            "blocks_per_gib": CAPACITY_BUDGET // bytes_per_block(config, storage),
        }
        if name != "auto":
            tokens, _ = greedy(model, config, storage, device, prompt, gen_tokens)
            same = [a == b for a, b in zip(tokens, ref_tokens, strict=True)]
            forced = teacher_forced(model, config, storage, device, prompt, ref_tokens)
            err = (forced - ref_forced).abs()
            entry.update({
                "greedy_agreement": round(sum(same) / len(same), 4),
                "greedy_first_divergence": same.index(False) if False in same else None,
                "forced_top1_agreement": round(
                    float((forced.argmax(-1) == ref_forced.argmax(-1)).float().mean()), 4),
                "logit_err_max": round(float(err.max()), 4),
                "logit_err_mean": round(float(err.mean()), 5),
                "text": loaded.tokenizer.decode(tokens) if model_name != "llama-1b" else None,
            })
        result["dtypes"][name] = entry
        print(model_name, name, {k: v for k, v in entry.items() if k != "text"}, flush=True)
    base = result["dtypes"]["auto"]["bytes_per_block"]
    bf16 = bytes_per_block(config, torch.bfloat16)  # what a GPU serving the model in bf16 holds
    result["bf16_bytes_per_block"] = bf16
    for entry in result["dtypes"].values():
        entry["capacity_vs_auto"] = round(base / entry["bytes_per_block"], 3)
        entry["capacity_vs_bf16"] = round(bf16 / entry["bytes_per_block"], 3)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    del model, loaded
    return result


def haystack(tokenizer, context_tokens: int, depth: float) -> str:
    sentences, n, i = [], 0, 0
    while n < context_tokens:
        s = FILLER[i % len(FILLER)]
        sentences.append(s)
        n += len(tokenizer.encode(s + " ", add_bos=False))
        i += 1
    sentences.insert(int(len(sentences) * depth), NEEDLE)
    return " ".join(sentences)


def needle(device: str, contexts: list[int], depths: list[float]) -> dict:
    out = {"model": "smollm2-135m", "needle": NEEDLE, "question": "What is the secret passcode?",
           "contexts": contexts, "depths": depths, "dtypes": {}}
    sp = SamplingParams(max_tokens=16, temperature=0.0)
    for name in KV_DTYPES:
        engine = Engine(EngineConfig(model="smollm2-135m", device=device, kv_cache_dtype=name,
                                     enable_prefix_caching=False))
        cases = []
        for ctx in contexts:
            for depth in depths:
                text = haystack(engine.tokenizer, ctx, depth)
                chat = [{"role": "user", "content": f"{text}\n\nWhat is the secret passcode? "
                                                    "Answer with the number only."}]
                o = engine.generate([chat], sp)[0]
                cases.append({"context": ctx, "depth": depth, "prompt_tokens": o.prompt_tokens,
                              "answer": o.text.strip(), "found": ANSWER in o.text})
        found = sum(c["found"] for c in cases)
        out["dtypes"][name] = {"found": found, "of": len(cases), "cases": cases,
                               "pool_blocks_256mib": engine.num_blocks if device == "cpu" else None}
        print("needle", name, f"{found}/{len(cases)}", [c["answer"] for c in cases], flush=True)
        del engine
    return out


def decode_throughput(model: str, context: int, batches: list[int], new_tokens: int) -> dict:
    """Decode tokens/s at ``context`` tokens of context, per KV dtype (engine, CUDA)."""
    out = {"model": model, "context_tokens": context, "new_tokens": new_tokens, "runs": []}
    g = torch.Generator().manual_seed(0)
    for name in KV_DTYPES:
        engine = Engine(EngineConfig(model=model, device="cuda", kv_cache_dtype=name,
                                     max_model_len=context + new_tokens + 16,
                                     max_num_seqs=max(batches)))
        engine.warmup()
        for batch in batches:
            prompts = [torch.randint(0, 256, (context,), generator=g).tolist() for _ in range(batch)]
            sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            # The contexts go into the prefix cache first, so the timed run's prefills are a
            # block each and every sequence decodes over the whole window (otherwise the
            # chunked 8k prefills of the batch would be counted as decode time).
            engine.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
            outs = engine.generate(prompts, sp)
            decode_s = max(o.latency_s - o.ttft_s for o in outs)
            tokens = sum(o.completion_tokens - 1 for o in outs)
            run = {"kv_cache_dtype": name, "batch": batch, "decode_tok_s": round(tokens / decode_s, 1),
                   "per_seq_tok_s": round(tokens / decode_s / batch, 1),
                   "kv_blocks": engine.num_blocks}
            out["runs"].append(run)
            print(run, flush=True)
        del engine
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--models", default="smollm2-135m,llama-1b")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="model dtype (auto: the checkpoint's; on a CPU without bf16 units "
                        "float32 is much faster for llama-1b)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--needle-contexts", default="256,512,1024")
    p.add_argument("--needle-depths", default="0.1,0.5,0.9")
    p.add_argument("--no-needle", action="store_true")
    p.add_argument("--throughput-batches", default="1,32")
    p.add_argument("--out", default="", help="result file name (default kv_quant_<device>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = {"where": machine(), "device": args.device, "block_size": BLOCK_SIZE,
              "scale_layout": "float32 per (token, kv head), packed behind each row",
              "accuracy": [accuracy(m, device, args.dtype, args.prompt_tokens, args.gen_tokens)
                           for m in args.models.split(",") if m]}
    if not args.no_needle:
        result["needle"] = needle(args.device, [int(c) for c in args.needle_contexts.split(",")],
                                  [float(d) for d in args.needle_depths.split(",")])
    if args.device == "cuda":
        result["decode_8k"] = decode_throughput(
            "llama-1b", 8192, [int(b) for b in args.throughput_batches.split(",")], 128)
    result["where"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    write(args.out or f"kv_quant_{args.device}.json", result)


if __name__ == "__main__":
    main()
