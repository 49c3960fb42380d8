"""algm_d2: ALGM token merging for plain-ViT semantic segmentation, detectron2-style."""
from typing import Any

__version__ = "0.1.0"
__all__ = ["ALGMConfig", "FixedLevel", "MergeState", "apply_algm", "__version__"]


def __getattr__(name: str) -> Any:
    """ALGMConfig, FixedLevel and MergeState load torch on first use, so ``import algm_d2.<module>`` for a command
    line's ``--help`` stays fast."""
    if name in ("ALGMConfig", "FixedLevel", "MergeState"):
        from . import merge

        return getattr(merge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply_algm(model, config=None, **kwargs):  # noqa: ANN001, ANN003, ANN201 - typed in modeling.backbone.algm_vit
    """Wrap a timm VisionTransformer/Eva so it merges tokens: see :func:`algm_d2.modeling.apply_algm`.

    Imported lazily so that ``import algm_d2`` (the merge API) does not import timm.
    """
    from .modeling.backbone.algm_vit import apply_algm as _apply_algm

    return _apply_algm(model, config, **kwargs)
