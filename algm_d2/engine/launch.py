"""Start the processes of a run and join them into one torch.distributed group (detectron2's ``launch``).

The same ``train_net.py`` runs however its processes were started:

- by itself: ``--num-gpus N`` spawns N local processes; with ``--num-machines M --machine-rank R --dist-url
  tcp://HOST:PORT`` on every machine, process ``l`` of machine ``R`` is rank ``R * N + l`` of ``M * N``;
- by ``torchrun`` or the ``deepspeed`` launcher (env:// rendezvous): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT are set for every process;
- by SLURM's ``srun`` (one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and SLURM_NODELIST give the
  same, MASTER_ADDR being the first host of the node list.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .runtime import import_deepspeed, without_shm_comm_op

logger = logging.getLogger(__name__)
DEFAULT_PORT = 29500
BACKENDS = ("nccl", "gloo")
JOINED_KEY = "algm_d2/joined/"
ALL_JOINED_KEY = "algm_d2/all_joined"
MISSING_KEY = "algm_d2/missing"
# seconds between rank 0's messages about ranks that have not joined yet
WAITING_LOG_PERIOD = 30.0


def find_free_port() -> int:
    """A TCP port that is free on this host now (``--dist-url auto``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[01-04,07],gpu2`` → ``node01``): ``scontrol show hostnames`` when
    SLURM's tools are installed, else the list is parsed (host names, one bracketed range or list per name)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True,
                             timeout=30)
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def launcher_env(environ: Mapping[str, str], *, dist_url: Optional[str] = None, spawn_requested: bool = False
                 ) -> Optional[Dict[str, str]]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set up by a launcher, or None when this program starts its
    own processes.

    torchrun and the deepspeed launcher set RANK and WORLD_SIZE. Under srun, SLURM_PROCID/SLURM_NTASKS are used when
    there is more than one task and the command line did not ask for its own layout (``spawn_requested``: an sbatch
    script that runs ``train_net.py --num-gpus 8`` once per node sees SLURM_NTASKS too). MASTER_PORT comes from the
    environment, else from a ``tcp://`` ``dist_url``, else 29500.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {"RANK": environ["RANK"], "WORLD_SIZE": environ["WORLD_SIZE"],
                "LOCAL_RANK": environ.get("LOCAL_RANK", "0"),
                "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": environ.get("MASTER_PORT", str(DEFAULT_PORT))}
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1 and not spawn_requested:
        url_port = urlparse(dist_url).port if dist_url and dist_url.startswith("tcp://") else None
        return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
                "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
                "MASTER_ADDR": environ.get("MASTER_ADDR") or first_slurm_host(
                    environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1")),
                "MASTER_PORT": environ.get("MASTER_PORT") or str(url_port or DEFAULT_PORT)}
    return None


def master_from_url(dist_url: Optional[str], num_machines: int) -> Tuple[str, int]:
    """(address, port) of rank 0 from ``--dist-url``: ``auto`` (a free local port; one machine only), ``env://``
    (MASTER_ADDR/MASTER_PORT) or ``tcp://HOST:PORT``."""
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


def _missing_ranks(store: dist.Store, world_size: int) -> List[int]:
    return [r for r in range(world_size) if not store.check([f"{JOINED_KEY}{r}"])]


def rendezvous(env: Mapping[str, str], *, start_timeout: float) -> dist.TCPStore:
    """The store of the run at MASTER_ADDR:MASTER_PORT (served by rank 0), once every rank has joined it.

    Rank 0 waits at most ``start_timeout`` seconds for the others, logging the missing ranks every 30 s, then
    raises TimeoutError naming them; every other rank then stops too, with the same names.
    """
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    address, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    try:
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0, wait_for_workers=False,
                              timeout=timedelta(seconds=start_timeout))
    except (RuntimeError, OSError) as err:  # DistStoreError / DistNetworkError: rank 0 never answered
        raise TimeoutError(f"rank {rank}: rank 0 at {address}:{port} could not be reached within {start_timeout:g} s "
                           f"(DEEPSPEED.START_TIMEOUT): {err}") from None
    store.set(f"{JOINED_KEY}{rank}", "1")
    deadline = time.monotonic() + start_timeout
    next_log = time.monotonic() + WAITING_LOG_PERIOD
    while True:
        if rank == 0:
            missing = _missing_ranks(store, world_size)
            if not missing:
                store.set(ALL_JOINED_KEY, "1")
                return store
        elif store.check([ALL_JOINED_KEY]):
            return store
        elif store.check([MISSING_KEY]):
            missing = [int(r) for r in store.get(MISSING_KEY).decode().split(",")]
            raise TimeoutError(f"rank {rank}: ranks {missing} of {world_size} did not join within {start_timeout:g} s "
                               "(DEEPSPEED.START_TIMEOUT); see rank 0's log")
        now = time.monotonic()
        if rank == 0 and now >= deadline:
            store.set(MISSING_KEY, ",".join(map(str, missing)))
            raise TimeoutError(f"ranks {missing} of {world_size} did not join rank 0 at {address}:{port} within "
                               f"{start_timeout:g} s (DEEPSPEED.START_TIMEOUT): were they started, with the same "
                               "--dist-url and --num-machines, and are they running (not stopped)?")
        if rank != 0 and now >= deadline + WAITING_LOG_PERIOD:  # rank 0 itself went away
            raise TimeoutError(f"rank {rank}: rank 0 did not report the group complete within {start_timeout:g} s "
                               "(DEEPSPEED.START_TIMEOUT); see rank 0's log")
        if rank == 0 and now >= next_log:
            logger.warning("waiting for ranks %s of %d to join (%.0f s left of DEEPSPEED.START_TIMEOUT)", missing,
                           world_size, deadline - now)
            next_log = now + WAITING_LOG_PERIOD
        time.sleep(0.2)


def init_distributed(env: Mapping[str, str], backend: str, *, start_timeout: float = 600.0,
                     collective_timeout: float = 1800.0) -> None:
    """Export ``env``, wait for every rank (:func:`rendezvous`) and join the process group, whose collectives time
    out after ``collective_timeout`` seconds; DeepSpeed then uses that group."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend must be one of {BACKENDS}, got {backend!r} (DEEPSPEED.BACKEND)")
    os.environ.update(env)
    if backend == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    store = rendezvous(env, start_timeout=start_timeout)
    dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                            timeout=timedelta(seconds=collective_timeout))
    with without_shm_comm_op():
        import_deepspeed().init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                            timeout=timedelta(seconds=collective_timeout))
    logger.info("rank %s of %s joined (%s, rank 0 at %s:%s)", env["RANK"], env["WORLD_SIZE"], backend,
                env["MASTER_ADDR"], env["MASTER_PORT"])


def _run_in_group(env: Mapping[str, str], backend: str, timeouts: Mapping[str, float], main_func: Callable[..., Any],
                  args: Sequence[Any]) -> None:
    """Join the group, run ``main_func`` and leave the group once every rank is done.

    Leaving explicitly (barrier, then ``destroy_process_group``) matters: a process that exits with a live gloo group
    can abort in the group's threads at interpreter shutdown ("terminate called without an active exception"), and
    a spawned rank's abort fails the whole run although its work was done. After an error the barrier is skipped
    (the other ranks may never reach it) and the error propagates.
    """
    init_distributed(env, backend, **timeouts)
    main_func(*args)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _run_process(local_rank: int, main_func: Callable[..., Any], env: Dict[str, str], num_gpus_per_machine: int,
                 machine_rank: int, backend: str, timeouts: Dict[str, float], args: Sequence[Any]) -> None:
    rank = machine_rank * num_gpus_per_machine + local_rank
    _run_in_group(dict(env, RANK=str(rank), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(num_gpus_per_machine)),
                  backend, timeouts, main_func, args)


def launch(main_func: Callable[..., Any], num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args: Sequence[Any] = (), *, backend: str = "gloo",
           start_timeout: float = 600.0, collective_timeout: float = 1800.0) -> None:
    """Run ``main_func(*args)`` in every process of the run, each already in the process group.

    Under torchrun / the deepspeed launcher / srun (see :func:`launcher_env`) this process is one rank and the
    layout arguments are not used. Otherwise ``num_gpus_per_machine`` processes are spawned on this machine (none
    when it is 1: the current process is the rank). Every rank leaves the group when ``main_func`` returns.
    ``start_timeout``/``collective_timeout``: seconds (DEEPSPEED.START_TIMEOUT / COLLECTIVE_TIMEOUT).
    """
    timeouts = {"start_timeout": start_timeout, "collective_timeout": collective_timeout}
    spawn_requested = num_gpus_per_machine != 1 or num_machines != 1
    env = launcher_env(os.environ, dist_url=dist_url, spawn_requested=spawn_requested)
    if env is not None:
        if spawn_requested:
            logger.warning("a launcher set the ranks (RANK/WORLD_SIZE or SLURM_*): --num-gpus %d --num-machines %d "
                           "are not used", num_gpus_per_machine, num_machines)
        _run_in_group(env, backend, timeouts, main_func, args)
        return
    if num_gpus_per_machine < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ValueError(f"bad process layout: --num-gpus {num_gpus_per_machine}, --num-machines {num_machines}, "
                         f"--machine-rank {machine_rank} (machine ranks are 0..num_machines-1)")
    address, port = master_from_url(dist_url, num_machines)
    env = {"WORLD_SIZE": str(num_machines * num_gpus_per_machine), "MASTER_ADDR": address, "MASTER_PORT": str(port)}
    if num_gpus_per_machine == 1:
        _run_process(0, main_func, env, 1, machine_rank, backend, timeouts, args)
        return
    mp.start_processes(_run_process, nprocs=num_gpus_per_machine, start_method="spawn", daemon=False,
                       args=(main_func, env, num_gpus_per_machine, machine_rank, backend, timeouts, tuple(args)))
