"""Runs the trainer in a subprocess for the engine tests: stop early, inject a NaN loss, or crash in a save."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from algm_d2.engine import Trainer, default_argument_parser, launch, setup  # noqa: E402


def main(args, extra):
    cfg = setup(args)
    trainer = Trainer(cfg, resume=args.resume)
    if extra.nan_at:
        net = trainer.model.net
        original = net.forward
        calls = {"n": 0}

        def poisoned(images):
            calls["n"] += 1
            out = original(images)
            return out * float("nan") if calls["n"] >= extra.nan_at else out

        net.forward = poisoned
    if extra.crash_in_save_at:
        original_save = trainer.engine.save_checkpoint

        def crashing_save(save_dir, tag=None, **kwargs):
            if tag == f"iter_{extra.crash_in_save_at:07d}":
                (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
                (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
                raise KeyboardInterrupt("killed while writing the checkpoint")
            return original_save(save_dir, tag=tag, **kwargs)

        trainer.engine.save_checkpoint = crashing_save
    trainer.train(stop_at=extra.stop_at)


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--nan-at", type=int, default=0)
    parser.add_argument("--crash-in-save-at", type=int, default=0)
    args = parser.parse_args()
    launch(main, 1, dist_url="auto", args=(args, args))
