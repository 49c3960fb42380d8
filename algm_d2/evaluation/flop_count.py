"""GFLOPs in fvcore's convention (1 "flop" = 1 multiply-add), with attention counted.

Two backends give the same numbers on the ops below (tests check they agree exactly on a timm ViT):

- ``"fvcore"`` (default): fvcore's ``FlopCountAnalysis`` on a ``torch.jit`` trace, the counter the paper's numbers
  come from. fvcore leaves ``aten::scaled_dot_product_attention`` uncounted (reported as unsupported), which
  under-reports a ViT by the whole attention term (~25% for Seg-S at 512²); we add handles for it and its
  ``aten::_scaled_dot_product_*`` variants (q·kᵀ and attn·v: B·heads·Nq·Nk·(d + d_v) MACs; masks, dropout and
  ``is_causal`` change nothing: the count is of the dense products), a broadcasting-safe ``aten::matmul`` and
  ``aten::baddbmm``, and count elementwise, reduction and indexing ops (add, softmax, gelu, scatter, gather, sort,
  ...) as 0 explicitly. Any other op without a handle is listed in the result's ``"unsupported_ops"``.
- ``"torch"``: ``torch.utils.flop_counter.FlopCounterMode`` (eager, no tracing; it reports 2 flops per MAC, so it is
  halved). Torch leaves CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) and every norm and resize
  uncounted; we register fvcore's formulas for them so both backends agree. Use it for models that do not trace;
  it does not list unsupported ops (``"unsupported_ops"`` is None).

Models whose shapes depend on the data (ALGM merges a different number of tokens per image) are counted for the
one concrete input given: the trace records that input's shapes. Average over several real images for a
per-dataset figure. Counting runs under ``torch.no_grad()`` and does not change the model's train/eval mode.
"""
from __future__ import annotations

import logging
import warnings
from math import prod
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .utils import infer_batch_size

logger = logging.getLogger(__name__)

FLOP_COUNT_BACKENDS = ("fvcore", "torch")

# Ops that cost 0 MACs in fvcore's convention (elementwise, reductions, data movement, indexing; resolve_conj and
# resolve_neg are the no-op views a traced matmul of real tensors emits); fvcore's own ignore list covers shape ops,
# these are the rest a ViT with token merging traces to.
_ZERO_MAC_OPS = frozenset("aten::" + name for name in (
    "abs", "add", "add_", "alias", "all", "amax", "amin", "any", "argmax", "argmin", "argsort", "bucketize",
    "clamp_max", "clamp_min", "clone", "cos", "cumsum", "div", "div_", "dropout_", "embedding", "empty_like", "erf",
    "exp", "expand_as", "feature_dropout", "fill_", "flip", "floor_", "gelu", "gelu_", "hardtanh", "index_add",
    "index_add_", "index_copy", "index_copy_", "index_fill", "index_fill_", "index_select", "isinf", "isnan", "le",
    "leaky_relu", "lift_fresh", "linalg_norm", "linalg_vector_norm", "log", "log_softmax", "logical_and",
    "logical_not", "logical_or", "lt", "masked_fill_", "masked_scatter", "masked_select", "max_pool2d", "maximum",
    "mean", "meshgrid", "min", "minimum", "movedim", "mul", "mul_", "ne", "neg", "new_ones", "norm", "one_hot",
    "ones_like", "pad", "pow", "reciprocal", "repeat", "repeat_interleave", "resolve_conj", "resolve_neg", "rsqrt",
    "rsub", "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "searchsorted",
    "sigmoid", "sigmoid_", "silu", "silu_", "sin", "softmax", "sort", "sqrt", "square", "std", "sub", "sub_", "sum",
    "take_along_dim", "tanh", "topk", "unflatten", "unique_consecutive", "var", "view_as", "where",
))

# The fused attention ops whose first three arguments are q [..., Nq, d], k [..., Nk, d], v [..., Nk, d_v].
_SDPA_OP_NAMES = (
    "scaled_dot_product_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def attention_macs(*, batch_size: int, num_heads: int, query_tokens: int, key_tokens: int, head_dim: int,
                   value_head_dim: Optional[int] = None) -> int:
    """MACs of q·kᵀ plus attn·v: batch·heads·Nq·Nk·(d + d_v)."""
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    return batch_size * num_heads * query_tokens * key_tokens * (head_dim + value_head_dim)


def vit_encoder_macs(*, num_patches: int, embed_dim: int, depth: int, mlp_hidden_dim: int, patch_size: int,
                     in_chans: int = 3, num_prefix_tokens: int = 1, batch_size: int = 1,
                     include_layer_norms: bool = True) -> int:
    """Analytic MACs of a plain ViT encoder (timm ``VisionTransformer`` without head), N = patches + prefix tokens:
    patch embedding num_patches·in_chans·p²·C, and per block N·(4C² + 2·C·C_mlp) for qkv/proj/fc1/fc2 plus 2·N²·C for
    attention. fvcore also counts each affine LayerNorm as 5 MACs per element (2 per block and the final norm)."""
    tokens = num_patches + num_prefix_tokens
    patch_embed = num_patches * in_chans * patch_size * patch_size * embed_dim
    linear = tokens * (4 * embed_dim * embed_dim + 2 * embed_dim * mlp_hidden_dim)
    attention = attention_macs(batch_size=1, num_heads=1, query_tokens=tokens, key_tokens=tokens, head_dim=embed_dim)
    norms = (2 * depth + 1) * 5 * tokens * embed_dim if include_layer_norms else 0
    return batch_size * (patch_embed + depth * (linear + attention) + norms)


def _sdpa_macs(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    *batch, query_tokens, head_dim = query_shape
    return prod(batch) * query_tokens * key_shape[-2] * (head_dim + value_shape[-1])


def _matmul_macs(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    a_shape = [1, *a_shape] if len(a_shape) == 1 else list(a_shape)
    b_shape = [*b_shape, 1] if len(b_shape) == 1 else list(b_shape)
    batch = torch.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    return prod(batch) * a_shape[-2] * a_shape[-1] * b_shape[-1]


def _fvcore_handles() -> Dict[str, Optional[Callable[[List[Any], List[Any]], int]]]:
    from fvcore.nn.jit_handles import get_shape

    def sdpa(inputs: List[Any], outputs: List[Any]) -> int:
        return _sdpa_macs(*(get_shape(value) for value in inputs[:3]))

    def matmul(inputs: List[Any], outputs: List[Any]) -> int:
        return _matmul_macs(get_shape(inputs[0]), get_shape(inputs[1]))

    def baddbmm(inputs: List[Any], outputs: List[Any]) -> int:
        return _matmul_macs(get_shape(inputs[1]), get_shape(inputs[2]))

    handles: Dict[str, Optional[Callable[[List[Any], List[Any]], int]]] = {op: None for op in _ZERO_MAC_OPS}
    handles.update({f"aten::{name}": sdpa for name in _SDPA_OP_NAMES})
    handles.update({"aten::matmul": matmul, "aten::baddbmm": baddbmm})
    return handles


def _torch_flop_formulas() -> Dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas (2 flops per MAC, on shapes) for the ops fvcore counts and torch does not."""
    aten = torch.ops.aten

    def sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return 2 * _sdpa_macs(query_shape, key_shape, value_shape)

    def norm(weight_index: int) -> Callable[..., int]:
        def formula(*args: Any, **kwargs: Any) -> int:
            return 2 * prod(args[0]) * (5 if args[weight_index] is not None else 4)
        return formula

    def batch_norm(input_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
        # The training flag is the first bool argument (its position differs between the overloads).
        training = next((arg for arg in args if isinstance(arg, bool)), False)
        if training:
            return 2 * prod(input_shape) * (5 if weight_shape is not None else 4)
        return 2 * prod(input_shape) * (2 if weight_shape is not None else 1)

    def per_output_element(macs: int) -> Callable[..., int]:
        def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return 2 * macs * prod(out_shape)
        return formula

    def per_input_element(input_shape: Any, *args: Any, **kwargs: Any) -> int:
        return 2 * prod(input_shape)

    # Torch has formulas for the CUDA kernels only.
    formulas: Dict[Any, Callable[..., int]] = {
        getattr(aten, name): sdpa
        for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
        if hasattr(aten, name)
    }
    formulas.update({
        aten.native_layer_norm: norm(2),
        aten.native_group_norm: norm(1),
        aten.native_batch_norm: batch_norm,
        aten._native_batch_norm_legit: batch_norm,
        aten._native_batch_norm_legit_no_training: batch_norm,
        aten.cudnn_batch_norm: batch_norm,
        aten.upsample_nearest2d: per_output_element(1),
        aten.upsample_bilinear2d: per_output_element(4),
        aten.grid_sampler_2d: per_output_element(4),
        aten._adaptive_avg_pool2d: per_input_element,
    })
    # FlopCounterMode decomposes an op whose overload is not a key (nearest upsampling into indexing on torch 2.14),
    # so key every overload too; the count itself is looked up by the packet.
    for packet, formula in list(formulas.items()):
        formulas.update({getattr(packet, overload): formula for overload in packet.overloads()})
    return formulas


class _TracingAdapter(nn.Module):
    """Shows jit tracing tensors only: the tensors inside ``args`` become positional inputs (strings, ints and the
    structure are kept from ``args``), and the outputs are flattened to a tuple of tensors."""

    def __init__(self, model: nn.Module, args: Tuple[Any, ...]):
        super().__init__()
        self.model = model
        self._leaves, self._spec = pytree.tree_flatten(args)
        self._tensor_positions = [i for i, leaf in enumerate(self._leaves) if isinstance(leaf, torch.Tensor)]
        if not self._tensor_positions:
            raise ValueError("count_gflops: the inputs contain no tensor to trace")
        self.tensor_inputs = tuple(self._leaves[i] for i in self._tensor_positions)

    def forward(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        leaves = list(self._leaves)
        for position, tensor in zip(self._tensor_positions, tensors):
            leaves[position] = tensor
        outputs = self.model(*pytree.tree_unflatten(leaves, self._spec))
        return tuple(leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor))


def _at_depth(counts: Dict[str, int], depth: int) -> Dict[str, int]:
    return {name: count for name, count in counts.items() if name and name.count(".") == depth - 1}


def _count_fvcore(model: nn.Module, args: Tuple[Any, ...]) -> Tuple[int, Dict[str, int], Dict[str, int],
                                                                      Optional[Dict[str, int]]]:
    with warnings.catch_warnings():
        # fvcore.nn scripts its losses at import, which recent torch flags as deprecated (Deprecation- or
        # FutureWarning depending on the version).
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
        from fvcore.nn import FlopCountAnalysis

    adapter = _TracingAdapter(model, args)
    analysis = FlopCountAnalysis(adapter, adapter.tensor_inputs).set_op_handle(**_fvcore_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    try:
        total = int(analysis.total())
    except Exception as error:  # jit tracing fails on some Python constructs; name the alternative
        raise RuntimeError(f"count_gflops: fvcore could not trace {type(model).__name__} ({error}); "
                           f"backend='torch' counts without tracing") from error
    prefix = "model."
    by_module = {name[len(prefix):]: int(count) for name, count in analysis.by_module().items()
                 if name.startswith(prefix)}
    by_operator = {name: int(count) for name, count in analysis.by_operator().items()}
    unsupported = {name: int(count) for name, count in analysis.unsupported_ops().items()}
    return total, by_operator, by_module, unsupported


def _count_torch(model: nn.Module, args: Tuple[Any, ...]) -> Tuple[int, Dict[str, int], Dict[str, int], None]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_torch_flop_formulas())
    with counter:
        model(*args)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops() // 2
    by_operator: Dict[str, int] = {}
    for op, flops in counts.get("Global", {}).items():
        name = str(op).split(".")[-1]
        by_operator[name] = by_operator.get(name, 0) + flops // 2
    # Module names are "<root class>.<path>"; drop the root to match fvcore's names.
    root = type(model).__name__ + "."
    by_module = {name[len(root):]: sum(ops.values()) // 2 for name, ops in counts.items() if name.startswith(root)}
    return total, by_operator, by_module, None


def count_gflops(model: nn.Module, inputs: Any, *, backend: str = "fvcore", module_depth: int = 0,
                 num_images: Optional[int] = None, module_names: Sequence[str] = ()) -> Dict[str, Any]:
    """Count multiply-adds of ``model(*inputs)`` (a tuple is the positional arguments, anything else the single
    argument, e.g. a tensor or detectron2's list of dicts) in GMACs, fvcore's "GFLOPs".

    Returns {"backend", "macs" (int, the whole batch), "gflops" (the same in 1e9), "gflops_per_image",
    "num_images", "by_operator" {op: gflops}, "by_module" {name: gflops} for modules ``module_depth`` levels deep
    (1 = the top-level children; omitted when 0), "by_name" {name: gflops} for the submodules ``module_names``
    (descendants included, any depth), "unsupported_ops" {op: occurrences} (fvcore backend; None for torch)}.
    ``num_images`` defaults to the first argument's batch dimension (a tensor) or length (a list).
    """
    if backend not in FLOP_COUNT_BACKENDS:
        raise ValueError(f"count_gflops: backend {backend!r} is not one of {FLOP_COUNT_BACKENDS}")
    if module_depth < 0:
        raise ValueError(f"count_gflops: module_depth must be >= 0, got {module_depth}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    num_images = infer_batch_size(args[0] if args else None) if num_images is None else int(num_images)
    if num_images is None or num_images <= 0:
        raise ValueError(f"count_gflops: cannot tell the number of images from the inputs ({num_images}); "
                         f"pass num_images")
    count = _count_fvcore if backend == "fvcore" else _count_torch
    with torch.no_grad():
        total, by_operator, by_module, unsupported = count(model, args)
    if unsupported:
        logger.warning("count_gflops: ops counted as 0 because no handle knows them: %s", dict(unsupported))
    result: Dict[str, Any] = {
        "backend": backend,
        "macs": total,
        "gflops": total / 1e9,
        "gflops_per_image": total / 1e9 / num_images,
        "num_images": num_images,
        "by_operator": {name: macs / 1e9 for name, macs in sorted(by_operator.items())},
    }
    if module_depth:
        result["by_module"] = {name: macs / 1e9 for name, macs in _at_depth(by_module, module_depth).items()}
    if module_names:
        result["by_name"] = {name: by_module.get(name, 0) / 1e9 for name in module_names}
    result["unsupported_ops"] = unsupported
    return result
