"""Start the processes of a run and join them into one torch.distributed group (detectron2's ``launch``).

Works the same whether this program started the processes (``--num-gpus N`` spawns N local ones, ranks
``machine_rank · N + local_rank`` of ``num_machines · N``) or a launcher did: ``torchrun`` and the ``deepspeed``
launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (env:// rendezvous); SLURM's ``srun`` sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODELIST, from which the same variables are derived.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from typing import Any, Callable, Dict, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)
DEFAULT_PORT = 29500


def find_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04,07],gpu2`` → ``node01``), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.match(r"([^\[]+)\[([^\]]+)\]", first)
    if not match:
        return first
    start = match.group(2).split(",")[0].split("-")[0]
    return match.group(1) + start


def launcher_env(environ: Dict[str, str], dist_url: Optional[str]) -> Optional[Dict[str, str]]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from a launcher's environment (torchrun, deepspeed, srun), or None."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = {k: environ[k] for k in ("RANK", "WORLD_SIZE")}
        env["LOCAL_RANK"] = environ.get("LOCAL_RANK", "0")
        env["MASTER_ADDR"] = environ.get("MASTER_ADDR", "127.0.0.1")
        env["MASTER_PORT"] = environ.get("MASTER_PORT", str(DEFAULT_PORT))
        return env
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        port = urlparse(dist_url).port if dist_url and dist_url.startswith("tcp://") else None
        return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
                "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
                "MASTER_ADDR": environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_NODELIST", "127.0.0.1")),
                "MASTER_PORT": environ.get("MASTER_PORT") or str(port or DEFAULT_PORT)}
    return None


def _master_from_url(dist_url: Optional[str], num_machines: int) -> Tuple[str, int]:
    if dist_url in (None, "", "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url auto only works on one machine; pass tcp://<machine 0 address>:<port>")
        return "127.0.0.1", find_free_port()
    if dist_url == "env://":
        return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", DEFAULT_PORT))
    parsed = urlparse(dist_url)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        raise ValueError(f"--dist-url must be 'auto', 'env://' or tcp://HOST:PORT, got {dist_url!r}")
    return parsed.hostname, parsed.port


def init_distributed(env: Dict[str, str], backend: str = "auto") -> None:
    """Export ``env`` and join the group through DeepSpeed (env:// rendezvous); nccl on CUDA, gloo on CPU."""
    import deepspeed

    os.environ.update(env)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    logger.info("rank %s of %s joined (%s, master %s:%s)", env["RANK"], env["WORLD_SIZE"], backend,
                env["MASTER_ADDR"], env["MASTER_PORT"])


def _worker(local_rank: int, main_func: Callable[..., Any], env: Dict[str, str], num_gpus: int, machine_rank: int,
            backend: str, args: Sequence[Any]) -> None:
    env = dict(env, RANK=str(machine_rank * num_gpus + local_rank), LOCAL_RANK=str(local_rank),
               LOCAL_WORLD_SIZE=str(num_gpus))
    init_distributed(env, backend)
    main_func(*args)


def launch(main_func: Callable[..., Any], num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args: Sequence[Any] = (), backend: str = "auto") -> None:
    """Run ``main_func(*args)`` on every process of the run, each already in the process group."""
    env = launcher_env(dict(os.environ), dist_url)
    if env is not None:
        init_distributed(env, backend)
        main_func(*args)
        return
    if num_gpus_per_machine < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ValueError(f"bad process layout: --num-gpus {num_gpus_per_machine}, --num-machines {num_machines}, "
                         f"--machine-rank {machine_rank}")
    addr, port = _master_from_url(dist_url, num_machines)
    env = {"WORLD_SIZE": str(num_machines * num_gpus_per_machine), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    if num_gpus_per_machine == 1:
        _worker(0, main_func, env, 1, machine_rank, backend, args)
        return
    mp.start_processes(_worker, nprocs=num_gpus_per_machine, start_method="spawn", daemon=False,
                       args=(main_func, env, num_gpus_per_machine, machine_rank, backend, tuple(args)))
