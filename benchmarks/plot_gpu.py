"""Plot a bench_gpu.py result: ultrakv vs transformers, the prefix cache, and turn-by-turn TTFT.
Usage: python benchmarks/plot_gpu.py benchmarks/results/gpu_<gpu>.json  (writes a .png beside it)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    models = list(data["models"])
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        m = data["models"][name]
        peer = m["peer_transformers"]
        ax = axes[row][0]
        labels = ["batch 1", "64 concurrent", "256 concurrent"]
        ours = [m["a_batch1"]["decode_tokens_per_s"], m["b_concurrent_64"]["output_tokens_per_s"],
                m["b_concurrent_256"]["output_tokens_per_s"]]
        theirs = [peer["batch1"]["decode_tokens_per_s"], peer["concurrent_64"]["output_tokens_per_s"], 0]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="ultrakv")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="transformers generate()")
        ax.set_xticks(list(x), labels)
        ax.set_yscale("log")
        ax.set_ylabel("output tokens/s")
        roof = m["a_batch1"]["roofline_fraction"]
        ax.set_title(f"{name}: throughput (batch-1 at {roof:.0%} of HBM roofline)")
        ax.legend()

        ax = axes[row][1]
        mt = m["c_multi_turn"]
        turns = [t["turn"] for t in mt["reuse"]]
        ax.plot(turns, [t["ttft_s"] * 1e3 for t in mt["reuse"]], "o-", label="session reuse")
        ax.plot(turns, [t["ttft_s"] * 1e3 for t in mt["recompute"]], "s-", label="recompute history")
        ax.set_xlabel("turn")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"{name}: multi-turn TTFT (turn {turns[-1]}: {mt['last_turn_ttft_speedup']:.1f}x)")
        ax.legend()

        ax = axes[row][2]
        d = m["d_shared_prefix"]
        ax.bar(["prefix cache on", "prefix cache off"],
               [d["prefix_cache_on"]["requests_per_s"], d["prefix_cache_off"]["requests_per_s"]])
        ax.set_ylabel("requests/s")
        ax.set_title(f"{name}: {d['requests']} requests behind a {d['system_prompt_tokens']}-token prompt "
                     f"({d['throughput_speedup']:.1f}x)", fontsize=9)
    fig.suptitle(f"ultrakv on {data['machine'].get('gpu', 'cpu')} ({data['date']})")
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
