"""Training metrics on the main rank: OUTPUT_DIR/metrics.json (JSON lines, detectron2's file) and TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


class EventWriter:
    """Appends one JSON object per call to ``metrics.json`` and writes its numbers as TensorBoard scalars
    (``<group>/<name>``, step = the record's "iteration"). Does nothing when ``enabled`` is False (other ranks)."""

    def __init__(self, output_dir: Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.metrics_path = Path(output_dir) / "metrics.json"
        self._tensorboard = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, record: Dict[str, Any], *, group: str) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["iteration"]
        for name, value in record.items():
            if name != "iteration" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(f"{group}/{name}", value, step)
        self._tensorboard.flush()

    def write_image(self, tag: str, image: Any, step: int) -> None:
        """A uint8 ``[3, H, W]`` image to TensorBoard (not to metrics.json)."""
        if self.enabled:
            self._tensorboard.add_image(tag, image, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
