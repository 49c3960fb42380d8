"""Result files and tables: atomic JSON writes and a markdown rendering of nested result dicts."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, List, Mapping, Tuple

import numpy as np
import torch

_PER_CLASS_PREFIXES = ("IoU-", "ACC-")


def to_jsonable(obj: Any) -> Any:
    """Plain Python copy of ``obj``: numpy/torch scalars and arrays become numbers and lists, mapping keys become
    strings, and non-finite floats become None (strict JSON has no NaN; detectron2 reports nan for classes absent
    from the ground truth)."""
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"to_jsonable: cannot write a {type(obj).__name__} as JSON: {obj!r}")


def save_json(path: str, obj: Any) -> None:
    """Write ``obj`` (see :func:`to_jsonable`) to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``, so readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def _format_value(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item, digits) for item in value)
    return str(value)


def _flatten(section: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    rows: List[Tuple[str, Any]] = []
    for key, value in section.items():
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _markdown_table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def format_results_table(results: Mapping[str, Any], *, digits: int = 2, per_class: bool = False) -> str:
    """Markdown for results such as ``{"sem_seg": {...}, "flops": {...}}``: per section a ``| metric | value |``
    table (nested dicts as dotted names, lists comma-joined). Per-class ``IoU-<c>``/``ACC-<c>`` entries are left out,
    or with ``per_class=True`` shown as an extra ``| class | IoU | ACC |`` table."""
    blocks: List[str] = []
    for section_name, section in results.items():
        lines = [f"**{section_name}**", ""]
        if not isinstance(section, Mapping):
            lines.extend(_markdown_table(["metric", "value"], [[section_name, _format_value(section, digits)]]))
            blocks.append("\n".join(lines))
            continue
        rows = _flatten(section)
        headline = [[key, _format_value(value, digits)] for key, value in rows
                    if not key.startswith(_PER_CLASS_PREFIXES)]
        lines.extend(_markdown_table(["metric", "value"], headline))
        class_names = [key[len("IoU-"):] for key, _ in rows if key.startswith("IoU-")]
        if per_class and class_names:
            values = dict(rows)
            class_rows = [[name, _format_value(values.get(f"IoU-{name}"), digits),
                           _format_value(values.get(f"ACC-{name}"), digits)] for name in class_names]
            lines.extend(["", *_markdown_table(["class", "IoU", "ACC"], class_rows)])
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
