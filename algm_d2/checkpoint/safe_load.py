"""``torch.load`` that runs nothing from the file (``weights_only=True`` plus an explicit allow-list of classes) and
names the file in every error; a damaged file's message does not suggest the unsafe loader."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file pickles a class or function outside the allow-list; it was not loaded."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint file is empty, truncated or damaged."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_checked(path: Union[str, Path], *, allowed_globals: Sequence[Callable] = (),
                 map_location: Any = "cpu") -> Any:
    """The objects of the torch file ``path``, unpickled with ``weights_only=True``: tensors, containers, numbers,
    strings and the classes in ``allowed_globals`` only.

    Raises FileNotFoundError, :class:`UnsafeCheckpointError` (the file references other code; it names the
    class) or :class:`UnreadableCheckpointError` (empty, truncated or garbage), each naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise UnreadableCheckpointError(f"{path} is empty (0 bytes): it was not written completely; use another "
                                        "checkpoint")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is not None:
            raise UnsafeCheckpointError(
                f"{path} refers to {found.group(1)}, which a checkpoint of tensors never needs; it was not loaded "
                "(unpickling it could run code from the file)") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise UnreadableCheckpointError(f"{path} ({size} bytes) is damaged or not a torch checkpoint: "
                                        f"{reason.group(1) if reason else _first_line(err)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError, KeyError, IndexError) as err:
        raise UnreadableCheckpointError(f"{path} ({size} bytes) is truncated or damaged and cannot be read: "
                                        f"{type(err).__name__}: {_first_line(err)}") from None
