"""Process-group helpers for torchrun: NCCL on GPUs, gloo on CPUs; everything is a no-op alone."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as torch_dist


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup() -> None:
    """Join the process group torchrun described in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        store = _attempt_store()
        if store is None:
            torch_dist.init_process_group(backend)
        else:
            torch_dist.init_process_group(backend, store=store, rank=rank(), world_size=world_size())


def _attempt_store() -> torch_dist.Store | None:
    """The torchrun agent's store, under a key prefix of its own for each restart.

    After ``--max-restarts`` restarts a group, the agent hands the new workers the same store, and the
    old workers' connection addresses are still in it: a fast worker could read a dead peer's address
    and fail to connect. Scoping the keys by the restart count makes every attempt start clean.
    None outside torchrun (plain ``env://`` initialisation applies).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                                is_master=False, timeout=timedelta(minutes=10))  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch_dist.PrefixStore(f"resnetlab/attempt-{attempt}", store)


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()
