"""The command line of train_net.py (detectron2's flags) and one-line errors; torch-free, so ``--help`` answers at
once."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Callable

EPILOG = """Examples:
  one process:       train_net.py --config-file configs/demo/segmenter_tiny_algm.yaml
  8 GPUs:            train_net.py --num-gpus 8 --config-file cfg.yaml
  2 machines:        (machine 0) train_net.py --num-gpus 8 --num-machines 2 --machine-rank 0 \\
                         --dist-url tcp://<machine 0 address>:29500 --config-file cfg.yaml
                     (machine 1) the same with --machine-rank 1
  evaluate:          train_net.py --eval-only --config-file cfg.yaml MODEL.WEIGHTS model_final.pth
  torchrun, deepspeed launcher, srun: see docs/LAUNCH.md
"""


def default_argument_parser(epilog: str = EPILOG) -> argparse.ArgumentParser:
    """detectron2's flags: --config-file, --resume, --eval-only, --num-gpus, --num-machines, --machine-rank,
    --dist-url, then KEY VALUE config overrides."""
    parser = argparse.ArgumentParser(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config (with _BASE_)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR's last checkpoint (iteration, optimizer, scheduler, RNG, data "
                             "order); without a checkpoint, start from MODEL.WEIGHTS")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate MODEL.WEIGHTS, or OUTPUT_DIR's last checkpoint when MODEL.WEIGHTS is empty")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU processes)")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (0..num_machines-1)")
    parser.add_argument("--dist-url", default="auto",
                        help="rendezvous of rank 0: 'auto' (a free local port, one machine), 'env://' "
                             "(MASTER_ADDR/MASTER_PORT) or tcp://HOST:PORT of machine 0")
    # The deepspeed launcher (and torch.distributed.launch) append --local_rank=N; the rank is read from LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="KEY VALUE pairs overriding the config, e.g. SOLVER.BASE_LR 0.01")
    return parser


# What a user can fix from the message alone: bad config keys/values, missing or damaged files, a run that
# diverged (CheckpointMismatchError and BadSampleError are ValueErrors; IncompleteCheckpointError is matched by name
# so that this module stays torch-free).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FloatingPointError)
USER_ERROR_NAMES = ("IncompleteCheckpointError",)
TRACEBACK_ENV = "ALGM_D2_TRACEBACK"


def is_user_error(err: BaseException) -> bool:
    """One of our own errors, or a spawned process that ended after reporting one (its line is above)."""
    return (isinstance(err, USER_ERRORS) or type(err).__name__ in USER_ERROR_NAMES
            or (type(err).__name__ == "ProcessExitedException" and getattr(err, "exit_code", None) == 1))


def error_line(err: BaseException) -> str:
    """``error: <message>`` on one line (a KeyError's message without the quotes repr adds)."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return f"error: {' '.join(str(message).split())}"


def run_with_short_errors(main_func: Callable[..., Any], *args: Any) -> Any:
    """Run ``main_func(*args)``; one of our own errors (``is_user_error``) ends the process with exit code 1 and
    one line naming the problem instead of a traceback (logged; on stderr as it is when logging is not set up). Set
    ALGM_D2_TRACEBACK=1 for the traceback."""
    if os.environ.get(TRACEBACK_ENV):
        return main_func(*args)
    try:
        return main_func(*args)
    except Exception as err:  # noqa: BLE001 - filtered just below
        if not is_user_error(err):
            raise
        spawned = type(err).__name__ == "ProcessExitedException"
        line = f"{error_line(err)}{'; its error is above' if spawned else ''} (traceback: {TRACEBACK_ENV}=1)"
        # without configured handlers, logging's last-resort handler writes the bare line to stderr
        logging.getLogger("algm_d2").error(line)
        raise SystemExit(1) from None
