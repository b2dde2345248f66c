"""One code path for one process, N processes and N nodes: plain torch.distributed under torchrun.

    python -m fmtransfer run CONFIG --out DIR                               # one process
    torchrun --standalone --nproc_per_node 2 -m fmtransfer run CONFIG --out DIR
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --rdzv_id job1 -m fmtransfer run CONFIG --out DIR                   # on each node

gloo on CPU, nccl on CUDA. Only the trainable module is wrapped in DDP; teachers stay outside it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's CUDA device when there is one, else CPU."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev)


def shutdown(ctx: DistContext, exit_code: int | None = None) -> None:
    """Leave the process group. Workers then exit at once: torch 2.13 CPU + gloo can SIGABRT at
    interpreter exit after destroy_process_group(), after the work is done (engine-and-style.md)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        if exit_code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)
