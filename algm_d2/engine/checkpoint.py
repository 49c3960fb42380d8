"""Training checkpoints: DeepSpeed's model/optimizer/scheduler files plus our trainer state, made current atomically.

Layout: ``OUTPUT_DIR/checkpoints/iter_0000100/`` (DeepSpeed's files, ``trainer_state_rank{r}.pt`` per rank) and
``OUTPUT_DIR/checkpoints/last_checkpoint`` (the tag). The pointer is replaced only after every rank has finished
writing, with write-to-temp + fsync + rename, so a kill at any moment leaves it naming a complete checkpoint.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
POINTER = "last_checkpoint"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) RNG states in tensors/tuples only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_checkpoint(checkpoint_dir: Path) -> Optional[str]:
    pointer = checkpoint_dir / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names {tag!r}, but {checkpoint_dir / tag} does not exist")
    return tag


def save_training_checkpoint(engine, checkpoint_dir: Path, iteration: int, keep: int) -> str:  # noqa: ANN001
    """Collective: every rank writes its part; then rank 0 moves the pointer and prunes older checkpoints."""
    tag = f"iter_{iteration:07d}"
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"iteration": iteration}, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state_path = checkpoint_dir / tag / f"trainer_state_rank{rank}.pt"
    tmp = state_path.with_name(state_path.name + ".tmp")
    torch.save({"iteration": iteration, "rng": rng_state()}, tmp)
    os.replace(tmp, state_path)
    _barrier()
    if rank == 0:
        atomic_write_text(checkpoint_dir / POINTER, tag)
        tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("iter_"))
        for old in tags[:-keep] if keep > 0 else []:
            if old != tag:
                shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
        logger.info("saved checkpoint %s", checkpoint_dir / tag)
    _barrier()
    return tag


def load_training_checkpoint(engine, checkpoint_dir: Path) -> int:  # noqa: ANN001
    """Restore the last complete checkpoint (weights, optimizer, scheduler, RNG); returns its iteration (0: none)."""
    tag = last_checkpoint(checkpoint_dir)
    if tag is None:
        logger.info("no checkpoint in %s: starting from scratch", checkpoint_dir)
        return 0
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint_dir / tag}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    state_path = checkpoint_dir / tag / f"trainer_state_rank{rank}.pt"
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} is missing: resume with the same number of processes")
    state = torch.load(state_path, weights_only=True)
    set_rng_state(state["rng"])
    logger.info("resumed from %s at iteration %d", checkpoint_dir / tag, client_state["iteration"])
    return int(client_state["iteration"])


def consolidated_state_dict(engine) -> Dict[str, torch.Tensor]:  # noqa: ANN001
    """Full float32 weights of the model on rank 0 (collective under ZeRO-3, where parameters are partitioned)."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # noqa: SLF001 - DeepSpeed's public-in-practice API
    else:
        state = engine.module.state_dict()
    return {k: v.detach().float().cpu() for k, v in (state or {}).items()}
