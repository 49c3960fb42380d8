"""Training checkpoints: DeepSpeed's files + the trainer state of every rank + the full fp32 model, made current
atomically.

Layout of ``OUTPUT_DIR/checkpoints``::

    iter_0005000/                 DeepSpeed's model/optimizer/scheduler files (ZeRO partitions per rank)
                 trainer_state_rank<r>.pt   iteration, data-loader position, RNG states of rank r
                 model.pth        {"model": full float32 state dict}: usable as MODEL.WEIGHTS
                 manifest.json    every file above with its size and SHA-256; written last
    last_checkpoint               the tag of the newest complete checkpoint

A checkpoint is complete when its manifest exists and every listed file has its listed size; ``--resume`` also
checks every file's SHA-256, and MODEL.WEIGHTS of a file a manifest lists (a checkpoint's model.pth,
OUTPUT_DIR/model_final.pth) checks that file's, so a damaged file is named instead of loaded. The manifest and
then the pointer are written (temporary file, fsync, rename) only after every rank has finished writing, so a run
killed at any moment leaves ``last_checkpoint`` naming a complete checkpoint. Ranks must share the file system.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.safe_load import UnreadableCheckpointError, load_checked
from .defaults import get_rank
from .rng import rng_state

logger = logging.getLogger(__name__)
POINTER = "last_checkpoint"
MANIFEST = "manifest.json"
MODEL_FILE = "model.pth"
TAG_PREFIX = "iter_"


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder lacks its manifest or a file it lists."""


def deepspeed_checkpoint_classes() -> List[type]:
    """The only classes, besides tensors and plain containers, that DeepSpeed's files of this trainer pickle: the
    loss scaler and ZeRO stage (ZeRO optimizer states) and bf16 ZeRO's parameter fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyLoads:
    """Stands in for a DeepSpeed checkpoint engine while a checkpoint is read: DeepSpeed's own ``load`` unpickles
    with ``weights_only=False``; this one loads with the allow-list above and refuses any other file, naming it."""

    def __init__(self, inner) -> None:  # noqa: ANN001 - a DeepSpeed CheckpointEngine
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_checked(path, allowed_globals=deepspeed_checkpoint_classes(), map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _verify_on_rank_0(directory: Path) -> None:
    """Rank 0 checks every file's SHA-256 (one reader of the shared files); every rank raises its error."""
    error = None
    if get_rank() == 0:
        try:
            verify_checkpoint(directory, checksums=True)
        except (IncompleteCheckpointError, UnreadableCheckpointError) as err:
            error = err
    if dist.is_available() and dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full_error(path: Path, err: OSError) -> OSError:
    """``err`` unchanged, or for a full disk (or quota) an OSError naming ``path`` and the space left."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return err
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    return OSError(err.errno, f"no space left while writing {path} ({free / 2**20:.1f} MiB free on its file "
                              "system): free some space (SOLVER.MAX_CHECKPOINTS_TO_KEEP keeps fewer checkpoints) or "
                              "set OUTPUT_DIR elsewhere, then --resume")


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file object)`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_full_error(path, err) from err
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def checkpoint_tag(iteration: int) -> str:
    return f"{TAG_PREFIX}{iteration:07d}"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest_files(manifest_path: Path) -> Dict[str, Dict[str, Any]]:
    """{file name: {"size": bytes, "sha256": hex digest}} of a manifest; a damaged manifest is named."""
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
        # manifests written before checksums were recorded list sizes only
        return {name: entry if isinstance(entry, dict) else {"size": int(entry)} for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise IncompleteCheckpointError(f"{manifest_path} is damaged ({type(err).__name__}: {err}); use another "
                                        "checkpoint") from None


def _check_file(directory: Path, name: str, entry: Dict[str, Any], manifest_path: Path, *, checksum: bool) -> None:
    path = directory / name
    if not path.is_file() or path.stat().st_size != entry["size"]:
        found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
        raise IncompleteCheckpointError(f"{path} is {found}, but {manifest_path} lists {entry['size']} bytes")
    if checksum and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        raise UnreadableCheckpointError(f"{path} is damaged: its SHA-256 differs from the one {manifest_path} "
                                        "recorded when it was written; use another checkpoint")


def verify_checkpoint(directory: Path, *, checksums: bool = False) -> Dict[str, Dict[str, Any]]:
    """The manifest's files of a complete checkpoint folder; :class:`IncompleteCheckpointError` naming what is
    missing. ``checksums``: also compare every file's SHA-256 (:class:`UnreadableCheckpointError` naming it)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise IncompleteCheckpointError(f"{directory} is incomplete: it has no {MANIFEST} (the run stopped while "
                                        "writing it)")
    files = _manifest_files(manifest_path)
    for name, entry in files.items():
        _check_file(directory, name, entry, manifest_path, checksum=checksums)
    return files


def verify_listed_file(path: Path) -> None:
    """Check ``path`` against the manifest beside it, if one lists it (our checkpoints' model.pth and
    model_final.pth); files of other origin (released checkpoints) have none and pass."""
    path = Path(path)
    manifest_path = path.parent / MANIFEST
    if manifest_path.is_file():
        entry = _manifest_files(manifest_path).get(path.name)
        if entry is not None:
            _check_file(path.parent, path.name, entry, manifest_path, checksum=True)


def write_manifest(directory: Path, iteration: int, names: Optional[Sequence[str]] = None) -> None:
    """``directory/manifest.json``: the iteration and every file of the folder (or ``names``) with its size and
    SHA-256."""
    if names is None:
        names = [p.name for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST]
    files = {name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in names}
    atomic_write_text(directory / MANIFEST, json.dumps({"iteration": iteration, "files": files}, indent=1))


def last_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The complete checkpoint ``checkpoint_dir/last_checkpoint`` names, or None when there is no pointer."""
    pointer = checkpoint_dir / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    # a tag is a folder name of checkpoint_dir (iter_<digits>); anything else (empty, a path) is refused
    if not (tag.startswith(TAG_PREFIX) and tag[len(TAG_PREFIX):].isdigit()):
        raise IncompleteCheckpointError(f"{pointer} must name a checkpoint folder of {checkpoint_dir} such as "
                                        f"{checkpoint_tag(0)}, got {tag!r}; fix or delete it")
    directory = checkpoint_dir / tag
    verify_checkpoint(directory)
    return directory


def consolidated_state_dict(engine) -> Dict[str, torch.Tensor]:  # noqa: ANN001 - a DeepSpeedEngine
    """The model's full state dict with the optimizer's float32 master weights (not the bf16/fp16 copies the
    forward uses). Collective under ZeRO-3, where every rank holds a slice of each parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    module: nn.Module = engine.module
    # ZeRO 1-3 map each parameter to its master slice (safe_get_full_fp32_param); without ZeRO, DeepSpeed's
    # bf16/fp16 wrapper keeps parallel lists of model and master parameters.
    masters = {}
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            masters.update({id(p): q for p, q in zip(low, high)})
    state = module.state_dict()
    for name, param in module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(param)
        state[name] = full if full is not None else masters.get(id(param), param)
    return {name: (t.detach().float() if t.is_floating_point() else t.detach()).cpu() for name, t in state.items()}


def save_model_weights(engine, path: Path) -> None:  # noqa: ANN001 - a DeepSpeedEngine
    """``{"model": consolidated_state_dict}`` to ``path`` (rank 0, atomically); collective."""
    state = consolidated_state_dict(engine)
    if get_rank() == 0:
        atomic_write(path, lambda f: torch.save({"model": state}, f))


class TrainingCheckpointer:
    """Saves and restores the whole training state of ``engine`` in ``checkpoint_dir`` (see the module doc).

    Args:
        engine: the DeepSpeedEngine (model, optimizer, lr scheduler).
        checkpoint_dir: OUTPUT_DIR/checkpoints.
        max_to_keep: complete checkpoints kept (the newest); 0 keeps all.
    """

    def __init__(self, engine, checkpoint_dir: Path, *, max_to_keep: int) -> None:  # noqa: ANN001
        if max_to_keep < 0:
            raise ValueError(f"SOLVER.MAX_CHECKPOINTS_TO_KEEP must be >= 0, got {max_to_keep}")
        self.engine = engine
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_to_keep = max_to_keep

    def save(self, iteration: int, trainer_state: Dict[str, Any]) -> Path:
        """Collective. Writes the checkpoint of ``iteration`` (``trainer_state`` + RNG states per rank), then makes
        it the last one. Returns its folder."""
        rank = get_rank()
        tag = checkpoint_tag(iteration)
        directory = self.checkpoint_dir / tag
        if rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if directory.exists():  # left by a run that stopped while writing it
                shutil.rmtree(directory)
        _barrier()
        try:
            self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state={"iteration": iteration},
                                        save_latest=False)
        except OSError as err:
            raise disk_full_error(directory, err) from err
        state = dict(trainer_state, iteration=iteration, rng=rng_state())
        atomic_write(directory / f"trainer_state_rank{rank}.pt", lambda f: torch.save(state, f))
        save_model_weights(self.engine, directory / MODEL_FILE)
        _barrier()
        if rank == 0:
            write_manifest(directory, iteration)
            atomic_write_text(self.checkpoint_dir / POINTER, tag)
            self._prune(iteration)
            logger.info("saved checkpoint %s", directory)
        _barrier()
        return directory

    def _prune(self, iteration: int) -> None:
        """Drop complete checkpoints beyond the newest ``max_to_keep`` and incomplete ones older than ``iteration``
        (a kill during a write leaves those)."""
        complete, incomplete = [], []
        for directory in sorted(self.checkpoint_dir.glob(TAG_PREFIX + "*")):
            if directory.is_dir():
                (complete if (directory / MANIFEST).is_file() else incomplete).append(directory)
        stale = complete[:-self.max_to_keep] if self.max_to_keep else []
        stale += [d for d in incomplete if int(d.name[len(TAG_PREFIX):]) < iteration]
        for directory in stale:
            shutil.rmtree(directory, ignore_errors=True)

    def load(self) -> Optional[Dict[str, Any]]:
        """Restore the last complete checkpoint into the engine (weights, optimizer, lr scheduler); returns this
        rank's trainer state (with "iteration" and "rng", to restore with :func:`set_rng_state` right before the
        next step), or None when there is no checkpoint."""
        directory = last_checkpoint(self.checkpoint_dir)
        if directory is None:
            return None
        _verify_on_rank_0(directory)
        state_path = directory / f"trainer_state_rank{get_rank()}.pt"
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path} does not exist: {directory} was written by fewer processes; resume "
                                    "with the number of processes that wrote it")
        state = load_checked(state_path)
        deepspeed_loads = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = _WeightsOnlyLoads(deepspeed_loads)
        try:
            load_path, _ = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=directory.name,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            self.engine.checkpoint_engine = deepspeed_loads
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        logger.info("resumed from %s (iteration %d)", directory, state["iteration"])
        return state
