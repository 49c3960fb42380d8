"""Training and evaluation engine: launch, DeepSpeed trainer, checkpoints, evaluation loop."""
from .training_checkpoints import (
    IncompleteCheckpointError, TrainingCheckpointer, consolidated_state_dict, last_checkpoint, verify_checkpoint,
)
from .defaults import (
    default_argument_parser, distributed_backend, get_rank, get_world_size, launch_options, load_config, setup,
)
from .eval_loop import evaluate, inference_on_dataset, results_table
from .launch import launch
from .lr_schedule import WarmupLRScheduler, lr_factor
from .optim import build_optimizer, get_vit_layer_id, layer_decay_param_groups
from .trainer import Trainer, deepspeed_config, eval_only_config, eval_weights

__all__ = [
    "IncompleteCheckpointError", "TrainingCheckpointer", "consolidated_state_dict", "last_checkpoint",
    "verify_checkpoint", "default_argument_parser", "distributed_backend", "get_rank", "get_world_size",
    "launch_options", "load_config", "setup", "evaluate", "inference_on_dataset", "results_table", "launch",
    "WarmupLRScheduler", "lr_factor", "build_optimizer", "get_vit_layer_id", "layer_decay_param_groups", "Trainer",
    "deepspeed_config", "eval_only_config", "eval_weights",
]
