"""Operators the models share: multi-scale deformable attention (reference and Triton)."""
from .msda import MSDeformAttn, level_start_index, ms_deform_attn, ms_deform_attn_reference

__all__ = ["MSDeformAttn", "level_start_index", "ms_deform_attn", "ms_deform_attn_reference"]
