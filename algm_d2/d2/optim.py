"""The optimizer for Mask2Former's Trainer with algm_d2's parameter groups.

Mask2Former's ``build_optimizer`` decays every parameter but norms and embeddings (position embeddings and class
tokens included) and multiplies the whole backbone's lr by SOLVER.BACKBONE_MULTIPLIER. This one uses
:func:`algm_d2.engine.optim.layer_decay_param_groups` instead: no weight decay on biases, norm weights, position
embeddings and tokens, and layer-wise lr decay over the ViT blocks (SOLVER.LAYER_DECAY), with Mask2Former's keys
kept in their meaning: SOLVER.OPTIMIZER "SGD" / "ADAMW", SOLVER.BACKBONE_MULTIPLIER on top of the layer scale for the
backbone's parameters, SOLVER.CLIP_GRADIENTS (CLIP_TYPE "full_model" clips the norm of all gradients together,
"value" / "norm" are detectron2's per-parameter clipping).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Type

import torch
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

from ..engine.optim import layer_decay_param_groups

OPTIMIZERS = ("SGD", "ADAMW")
# The encoder: Mask2Former's MaskFormer.backbone, the bridged segmentors' net.backbone.
_BACKBONE = re.compile(r"^(net\.)?backbone\.")


def vit_depth(model: nn.Module) -> int:
    """Number of ViT blocks of the model's encoder (``backbone`` or ``net.backbone``); 0 if none."""
    blocks = getattr(getattr(getattr(model, "net", model), "backbone", None), "blocks", None)
    return len(blocks) if blocks is not None else 0


def param_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:  # noqa: ANN001 - a CfgNode
    """algm_d2's groups (layer decay, no decay on position embeddings / tokens / 1-D), each split into its backbone
    part (lr × SOLVER.BACKBONE_MULTIPLIER) and the rest."""
    solver = cfg.SOLVER
    groups = layer_decay_param_groups(model, base_lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY,
                                      layer_decay=solver.LAYER_DECAY, num_layers=vit_depth(model))
    out = []
    for group in groups:
        for in_backbone in (True, False):
            members = [(n, p) for n, p in zip(group["names"], group["params"])
                       if bool(_BACKBONE.match(n)) == in_backbone]
            if not members:
                continue
            scale = solver.BACKBONE_MULTIPLIER if in_backbone else 1.0
            out.append({**group, "names": [n for n, _ in members], "params": [p for _, p in members],
                        "lr": group["lr"] * scale, "lr_scale": group["lr_scale"] * scale})
    return out


def _with_full_model_clipping(optimizer: Type[torch.optim.Optimizer], max_norm: float, norm_type: float
                              ) -> Type[torch.optim.Optimizer]:
    class FullModelGradientClipping(optimizer):  # type: ignore[valid-type, misc]
        def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
            params: Iterable[torch.Tensor] = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optimizer.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:  # noqa: ANN001 - a CfgNode
    """SOLVER.OPTIMIZER over :func:`param_groups`, with SOLVER.CLIP_GRADIENTS."""
    solver = cfg.SOLVER
    if solver.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS} (Mask2Former's names), got "
                         f"{solver.OPTIMIZER!r}")
    optimizer_type: Type[torch.optim.Optimizer] = torch.optim.SGD if solver.OPTIMIZER == "SGD" else torch.optim.AdamW
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_type = _with_full_model_clipping(optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        optimizer_type = maybe_add_gradient_clipping(cfg, optimizer_type)
    groups = param_groups(cfg, model)
    if solver.OPTIMIZER == "SGD":
        return optimizer_type(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV)
    return optimizer_type(groups, lr=solver.BASE_LR)
