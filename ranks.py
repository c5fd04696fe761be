"""One job in several processes (torchrun): which process this is, its share of a batch, and the few
collectives the phase loop needs (torch.distributed: gloo on the CPU, nccl on GPUs).

    torchrun --nproc_per_node 2 train.py ...

torchrun puts RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; setup() reads them and
joins the job's process group. Without torchrun (plain `python train.py`, a notebook) there is one
process, no process group, and every helper below hands back its input untouched: nothing changes.

A collective that cannot finish (another process died, or hangs) raises, after at most the timeout
given to setup(), one `error:` line (SystemExit) instead of waiting for ever.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun (or another launcher setting its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """The process that writes files and shows progress: rank 0, or the only one."""
    return rank() == 0


def setup(device: str, timeout_s: float) -> str:
    """Join the job's process group where torchrun started several processes; returns the device this
    process uses: cuda:LOCAL_RANK on GPUs (one GPU per process), else `device` as given."""
    if not launched():
        return device
    if device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise SystemExit(f"error: process {local} on this machine needs GPU {local}, but {torch.cuda.device_count()} "
                             "are visible: start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def collective(what: str, fn, *args):
    """fn(*args), a collective; its failure (a process gone, or silent past the timeout) as one line."""
    try:
        return fn(*args)
    except RuntimeError as e:   # gloo and nccl raise RuntimeError subclasses (DistBackendError, timeouts)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SystemExit(f"error: process {rank()} of {world_size()}: {what} failed: another process died or stopped "
                         f"answering (--dist-timeout) ({first}); the job ends; --resume goes on from the last "
                         "finished phase") from None


def comm_device() -> torch.device:
    """Where a tensor must lie for the process group's backend: the process's GPU for nccl."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- shares of a batch

def shard(x: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of x (split along dim 0 as evenly as can be; the first
    len(x) % world_size processes get one row more). One process: x itself."""
    n = world_size()
    return x if n == 1 else x.tensor_split(n)[rank()]


def shard_batch(batch: dict) -> dict:
    """shard() of every tensor in a batch (same rows of each)."""
    return batch if world_size() == 1 else {k: shard(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- collectives

def barrier() -> None:
    if world_size() > 1:
        collective("waiting for the other processes", dist.barrier)


@contextlib.contextmanager
def main_first():
    """The first process runs the block alone (filling a cache: pretrained towers, decoded images),
    then the others run it (reading that cache)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def sum_ints(values: list[int]) -> list[int]:
    """Each value summed over the processes (e.g. correct answers on each one's share of the test data)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.long, device=comm_device())
    collective("summing counts", dist.all_reduce, t)
    return t.tolist()


def broadcast(obj):
    """The first process's obj (any picklable value: tensors, dicts, lists), on every process."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    collective("receiving the first process's result", dist.broadcast_object_list, box, 0)
    return box[0]


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over the processes, in one collective, so that every process
    holds the gradient of the whole step (each process's loss is its share of the step's loss) and
    takes the same optimizer step. A parameter no process has a gradient for keeps none, as in one
    process (Adam then skips it)."""
    if world_size() == 1:
        return
    dev = params[0].device
    have = torch.tensor([float(p.grad is not None) for p in params], device=dev)
    flat = torch.cat([have] + [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
    flat = flat.to(comm_device())
    collective("summing gradients", dist.all_reduce, flat)
    flat = flat.to(dev)
    grads = flat[len(params):].split([p.numel() for p in params])
    for p, h, g in zip(params, flat[:len(params)].tolist(), grads):
        p.grad = g.view_as(p).to(p.dtype) if h else None
