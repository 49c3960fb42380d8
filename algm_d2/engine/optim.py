"""Parameter groups (weight decay rules, ViTDet-style layer-wise lr decay as pure functions) and optimizers."""
from __future__ import annotations

import re
from typing import Any, Dict, List

import torch
from torch import nn

# Embedding parameters of the encoder (layer 0 for layer decay) and parameters that get no weight decay.
_EMBEDDING = re.compile(r"(^|\.)encoder\.(patch_embed|cls_token|dist_token|reg_token|pos_embed)")
_BLOCK = re.compile(r"(^|\.)encoder\.blocks\.(\d+)\.")
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "cls_emb")


def get_vit_layer_id(name: str, num_layers: int) -> int:
    """Layer of a parameter for layer decay: embeddings 0, encoder block i → i + 1, everything after → num_layers + 1."""
    if _EMBEDDING.search(name):
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(2)) + 1
    return num_layers + 1


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (1-D) and position/class embeddings are not decayed."""
    return param.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES


def build_param_groups(model: nn.Module, *, base_lr: float, weight_decay: float, layer_decay: float = 1.0,
                       num_layers: int = 0) -> List[Dict[str, Any]]:
    """One group per (layer, decay) pair with ``lr = base_lr · layer_decay^(num_layers + 1 - layer)``."""
    groups: Dict[Any, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = get_vit_layer_id(name, num_layers) if layer_decay != 1.0 else 0
        decay = 0.0 if no_weight_decay(name, param) else weight_decay
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay != 1.0 else 1.0
        group = groups.setdefault((layer, decay), {"params": [], "names": [], "weight_decay": decay,
                                                   "lr": base_lr * scale, "layer_id": layer, "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:  # noqa: ANN001 - a CfgNode
    """SOLVER.OPTIMIZER over :func:`build_param_groups` (names are dropped: torch optimizers keep extra keys)."""
    solver = cfg.SOLVER
    depth = len(model.net.encoder.blocks) if hasattr(model, "net") and hasattr(model.net, "encoder") else 0
    groups = build_param_groups(model, base_lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY,
                                layer_decay=solver.LAYER_DECAY, num_layers=depth)
    for group in groups:
        group.pop("names")
    if solver.OPTIMIZER == "SGD":
        return torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM)
    if solver.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(groups, lr=solver.BASE_LR, betas=tuple(solver.BETAS))
    raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'AdamW', got {solver.OPTIMIZER!r}")
