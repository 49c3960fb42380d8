"""Parameter groups (weight-decay rules and ViTDet-style layer-wise lr decay, as pure functions) and the optimizer."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

# ViT embeddings (layer 0 for layer decay) and ViT blocks (layer i + 1); parameter names as in SegmentationModel:
# net.backbone.* (the ViT; a ViT-Adapter's own parts are not decayed, as EVA's).
_EMBEDDING = re.compile(r"(^|\.)backbone\.(patch_embed|cls_token|dist_token|reg_token|pos_embed)(\.|$)")
_BLOCK = re.compile(r"(^|\.)backbone\.blocks\.(\d+)\.")
# Tokens and embeddings that are never decayed, whatever their shape.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "cls_emb")
OPTIMIZERS = ("SGD", "AdamW")


def get_vit_layer_id(name: str, num_layers: int) -> int:
    """Layer of a parameter for layer decay: ViT embeddings 0, ViT block i → i + 1, everything else (final norm,
    adapter, decoder) → num_layers + 1."""
    if _EMBEDDING.search(name):
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(2)) + 1
    return num_layers + 1


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and norm weights (1-D), position embeddings and class tokens/embeddings."""
    return param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


def layer_decay_param_groups(model: nn.Module, *, base_lr: float, weight_decay: float, layer_decay: float = 1.0,
                             num_layers: int = 0, head_lr_multiplier: float = 1.0) -> List[Dict[str, Any]]:
    """Parameter groups for a torch optimizer: one per (layer, decayed or not, head or not), with ``lr = base_lr *
    layer_decay^(num_layers + 1 - layer)``, times ``head_lr_multiplier`` for parameters whose name contains "head"
    (mmseg's ``custom_keys={'head': dict(lr_mult=...)}``), and weight decay 0 where :func:`no_weight_decay` says so.
    Each group also carries "names", "layer_id" and "lr_scale" (torch optimizers keep extra keys). Frozen parameters
    are left out."""
    if layer_decay != 1.0 and num_layers <= 0:
        raise ValueError(f"SOLVER.LAYER_DECAY {layer_decay} needs the encoder's depth; got num_layers {num_layers}")
    groups: Dict[Tuple[int, bool, bool], Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = get_vit_layer_id(name, num_layers) if layer_decay != 1.0 else num_layers + 1
        decayed = weight_decay > 0 and not no_weight_decay(name, param)
        head = head_lr_multiplier != 1.0 and "head" in name
        scale = layer_decay ** (num_layers + 1 - layer) * (head_lr_multiplier if head else 1.0)
        group = groups.setdefault((layer, decayed, head), {
            "params": [], "names": [], "lr": base_lr * scale, "weight_decay": weight_decay if decayed else 0.0,
            "layer_id": layer, "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(name)
    return sorted(groups.values(), key=lambda group: (group["layer_id"], group["weight_decay"], group["lr_scale"]))


def encoder_depth(model: nn.Module) -> int:
    """Number of ViT blocks at ``model.net.backbone.blocks`` (0 if none)."""
    net = getattr(model, "net", None)
    blocks = getattr(getattr(net, "backbone", None), "blocks", None)
    return len(blocks) if blocks is not None else 0


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:  # noqa: ANN001 - a CfgNode
    """SOLVER.OPTIMIZER over :func:`layer_decay_param_groups` (a torch optimizer: DeepSpeed would JIT-compile its
    own for a config-named one)."""
    solver = cfg.SOLVER
    if solver.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {solver.OPTIMIZER!r}")
    groups = layer_decay_param_groups(model, base_lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY,
                                      layer_decay=solver.LAYER_DECAY, num_layers=encoder_depth(model),
                                      head_lr_multiplier=solver.HEAD_LR_MULTIPLIER)
    if solver.OPTIMIZER == "SGD":
        if solver.NESTEROV and solver.MOMENTUM <= 0:
            raise ValueError(f"SOLVER.NESTEROV needs SOLVER.MOMENTUM > 0, got {solver.MOMENTUM}")
        return torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV)
    return torch.optim.AdamW(groups, lr=solver.BASE_LR, betas=tuple(solver.BETAS), eps=solver.EPS)
