"""Several devices behind one node: tensor parallelism (one model split over ranks that step
in lockstep), KV transfer between engines over torch.distributed point-to-point, and the
process groups both use (NCCL on CUDA, gloo on CPU)."""
