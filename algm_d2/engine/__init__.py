"""Training and evaluation engine: launch, DeepSpeed trainer, checkpoints, evaluation loop."""
from .defaults import default_argument_parser, get_rank, get_world_size, setup
from .evaluation import evaluate, inference_on_dataset
from .launch import launch
from .lr_schedule import StepLRScheduler, lr_factor
from .optim import build_optimizer, build_param_groups, get_vit_layer_id
from .trainer import Trainer, deepspeed_config

__all__ = [
    "default_argument_parser", "get_rank", "get_world_size", "setup", "evaluate", "inference_on_dataset", "launch",
    "StepLRScheduler", "lr_factor", "build_optimizer", "build_param_groups", "get_vit_layer_id", "Trainer",
    "deepspeed_config",
]
