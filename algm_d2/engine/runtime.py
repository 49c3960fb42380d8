"""Process-level runtime settings: CPU threads per process, and importing DeepSpeed quietly without its
shared-memory C++ op.
"""
from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator, Mapping, Optional

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes(env: Mapping[str, str]) -> int:
    """Processes of this run on this machine: LOCAL_WORLD_SIZE (ours and torchrun's), else SLURM's tasks per node,
    else 1."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "").split("(")[0]  # SLURM writes e.g. "8(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def set_cpu_threads(num_local: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """torch's intra-op threads for one of ``num_local`` processes on this machine: OMP_NUM_THREADS when set
    (torchrun sets 1 for several processes), else cores // num_local (at least 1), so processes sharing a
    machine do not oversubscribe its cores. Logged; returns the count."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        threads, why = int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        cores = available_cores()
        threads = max(1, cores // max(1, num_local))
        why = f"{cores} cores / {num_local} local process{'es' if num_local > 1 else ''}"
    torch.set_num_threads(threads)
    logger.info("torch uses %d CPU thread%s per process (%s; set OMP_NUM_THREADS to change)", threads,
                "s" if threads > 1 else "", why)
    return threads


def import_deepspeed() -> ModuleType:
    """``import deepspeed`` without its start-up noise: on a machine without a GPU the CPU accelerator is chosen
    explicitly (DeepSpeed otherwise warns that it "was unable to detect" one) and torch's "No CUDA runtime is found"
    warning (from the C++-extension helpers DeepSpeed imports) is dropped. DS_ACCELERATOR, when set, is kept."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed

    return deepspeed


@contextmanager
def without_shm_comm_op() -> Iterator[None]:
    """DeepSpeed's torch communication backend JIT-compiles a shared-memory C++ op when it starts on the CPU (minutes,
    and a C++ compiler needed). That op serves only ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference),
    which training never calls, so the backend starts without it inside this block."""
    import_deepspeed()
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # the attribute deepspeed.comm.torch is torch
    build = comm_torch.build_shm_op
    comm_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        comm_torch.build_shm_op = build
