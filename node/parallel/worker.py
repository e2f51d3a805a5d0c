"""A tensor-parallel worker rank: one process per further device, started by rank 0's engine.

It loads its slice of the model, allocates its heads of the KV pool, joins the group and
then runs whatever rank 0 broadcasts (``step_protocol``) until told to stop. It holds no
scheduler, sessions or sampler: rank 0 decides everything and samples from the hidden
states that every rank ends each layer with.

Run as ``python -m ultrakv.node.parallel.worker --rank R --world-size N --store-port P
--prefix X --device D --parent-pid PID --config JSON``; never by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time

import torch
from ultrakv.node.attention import get_backend
from ultrakv.node.attention.triton_backend import triton_available
from ultrakv.node.config import EngineConfig
from ultrakv.node.cuda_graphs import CudaGraphRunner
from ultrakv.node.engine import kv_block_bytes, kv_pool_blocks, zeroed_kv
from ultrakv.node.model.loader import load_model
from ultrakv.node.parallel import step_protocol
from ultrakv.node.parallel.process_group import ProcessGroup, join_store
from ultrakv.node.parallel.sharding import TensorShard
from ultrakv.node.parallel.step_protocol import Op
from ultrakv.node.parallel.tensor_parallel import read_heads, write_heads

log = logging.getLogger("ultrakv.node.parallel.worker")


def _exit_with_parent(parent_pid: int) -> None:
    """End this process when rank 0's process is gone: a blocked collective (NCCL waits out
    its whole timeout) must not keep a device busy for nobody."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)
    threading.Thread(target=watch, name="ultrakv-tp-parent-watch", daemon=True).start()


@torch.inference_mode()
def run(args: argparse.Namespace) -> None:
    config = EngineConfig(**json.loads(args.config))
    device = torch.device(args.device)
    shard = TensorShard(args.rank, args.world_size)
    torch.manual_seed(config.seed)
    attn = get_backend(config.attention_backend, device)
    loaded = load_model(config.model, config.dtype, device, attn, seed=config.seed, shard=shard)
    model = loaded.model
    fused = config.fused_kernels if config.fused_kernels is not None else (
        device.type == "cuda" and triton_available())
    if fused:
        model.use_fused_kernels(True)
    dtype = next(model.parameters()).dtype
    local = model.config
    store = join_store("127.0.0.1", args.store_port)
    store.set(f"{args.prefix}/ready/{args.rank}", "1")
    group = ProcessGroup(store, args.prefix, args.rank, args.world_size, device)
    model.use_all_reduce(group.all_reduce)
    block_bytes = kv_block_bytes(config.block_size, local, dtype)  # TP keeps the model's KV dtype
    own = config.num_blocks or kv_pool_blocks(config, local.vocab_size, block_bytes, device)
    num_blocks = group.all_reduce_min(own)
    shape = (2, num_blocks, config.block_size, local.num_key_value_heads, local.head_dim)
    kv_caches = [zeroed_kv(shape, dtype, device) for _ in range(local.num_hidden_layers)]
    full = loaded.config
    kv_block = (full.num_hidden_layers, config.block_size, full.num_key_value_heads, full.head_dim)
    log.info("tensor-parallel rank %d/%d ready on %s: %d KV blocks", args.rank, args.world_size, device, num_blocks)
    graphs: CudaGraphRunner | None = None
    round_rows = round_context = round_step = 0  # the greedy round being replayed
    while True:
        cmd = step_protocol.receive(group, kv_block, dtype)
        if cmd.op == Op.FORWARD:
            # The same choice as rank 0's runner, from the same metadata.
            if graphs is not None and graphs.can_run(cmd.meta):
                graphs.run(cmd.input_ids, cmd.positions, cmd.meta)
            else:
                model(cmd.input_ids, cmd.positions, kv_caches, cmd.meta)
        elif cmd.op in (Op.DECODE_ROUND, Op.CONTINUE):
            if cmd.op == Op.DECODE_ROUND:
                graphs.stage_decode(cmd.input_ids, cmd.positions, cmd.meta)
                round_rows, round_context, round_step = cmd.input_ids.shape[0], cmd.meta.max_seq_len, 0
            for _ in range(cmd.num_steps):  # as rank 0's runner replays them
                graphs.replay_greedy(round_rows, round_context + round_step)
                round_step += 1
        elif cmd.op == Op.GRAPHS:
            graphs = _graphs(cmd.plan, model, kv_caches, config.block_size, device, group)
        elif cmd.op == Op.CAPTURE:
            graphs.capture_all()
        elif cmd.op == Op.READ_KV:
            group.send(read_heads(kv_caches, cmd.blocks).contiguous(), 0, step_protocol.KV_TAG)
        elif cmd.op == Op.WRITE_KV:
            write_heads(kv_caches, cmd.blocks, cmd.kv, shard)
        else:
            break
    # Leave without releasing the group: under NCCL that is collective, and it did not
    # complete even with rank 0 releasing at the same time (30 s, then given up). Ending the
    # process frees this rank's share; rank 0 releases its own once the workers are gone.
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last KV sent has left
    logging.shutdown()
    os._exit(0)


def _graphs(plan: step_protocol.GraphPlan, model: torch.nn.Module, kv_caches: list[torch.Tensor],
            block_size: int, device: torch.device, group: ProcessGroup) -> CudaGraphRunner:
    """This rank's CUDA graphs, of rank 0's shapes. A greedy step's graph ends by receiving
    rank 0's sampled tokens (rank 0's ends by sending them), which the step's advance then
    makes the next step's input ids."""
    graphs = CudaGraphRunner(model, kv_caches, block_size, device, plan.max_batch, plan.max_model_len,
                             plan.max_prefill_tokens)
    if plan.greedy:
        tokens = torch.zeros(graphs.max_batch, dtype=torch.int64, device=device)
        graphs.greedy = lambda hidden: group.broadcast(tokens[: hidden.shape[0]])
    return graphs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--store-port", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--config", required=True, help="EngineConfig as JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{args.rank} %(levelname)s %(message)s")
    _exit_with_parent(args.parent_pid)
    run(args)


if __name__ == "__main__":
    main()
