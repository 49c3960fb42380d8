"""A backbone that drives the blocks of a timm ViT (VisionTransformer/DeiT) or Eva (EVA-01/EVA-02) with ALGM.

The wrapper adopts the timm model's own submodules and parameters (same objects, same state_dict keys, so released
weights load unchanged) and runs them itself: patch embedding, position embedding, then per block
``norm1 → attention (SDPA via timm's attention module, with ALGM's key bias) → layer scale / drop path →
ALGM stages of that layer → norm2 → MLP``, then the final norm. No timm forward code is copied or class-swapped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...merge import OFF, ALGMConfig, MergeState, merge_after_attention
from ...merge.rules import SequenceSizes
from ...merge.stages import splits_into_plans
from ...merge.packing import PackedLayout, SequenceOffsets
from ...merge.state import attention_dtype
from ..ops.attention_kernels import dynamic_length_attention
from ..ops.packed_layout import packed_layout_of
from ..inputs import check_image_batch
from ..ops.varlen_attention import packed_attention_residual
from ..registry import BACKBONE_REGISTRY
from .block_graphs import BlockGraphs
from .segments import SegmentRunner
from .build import algm_config_from_cfg, build_timm_vit
from .rope import RotaryPhases

logger = logging.getLogger(__name__)

# observer(layer, tokens_after_attention, state): called after every block's attention residual (calibration).
Observer = Callable[[int, Tensor, MergeState], None]


def _block_kind(block: nn.Module) -> str:
    names = {type(block).__name__} | {cls.__name__ for cls in type(block).__mro__}
    if "EvaBlock" in names:
        return "eva"
    if "Block" in names and all(hasattr(block, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp")):
        return "vit"
    raise TypeError(
        f"ALGMViT drives timm's pre-norm blocks (vision_transformer.Block, eva.EvaBlock); got {type(block).__name__}"
    )


def patchify(proj: nn.Conv2d, images: Tensor) -> Tensor:
    """The patch embedding ``proj`` (a Conv2d with stride = kernel) → ``[B, C, h, w]``.

    On CUDA it runs as one GEMM over the unfolded patches: for this convolution cuDNN picks an implicit-GEMM kernel
    far below the GEMM rate. Elsewhere it is the conv itself (bit-identical to timm on the CPU).
    """
    if not images.is_cuda or proj.groups != 1 or proj.padding != (0, 0) or proj.stride != proj.kernel_size:
        return proj(images)
    b, c, height, width = images.shape
    ph, pw = proj.kernel_size
    h, w = height // ph, width // pw
    patches = images[..., : h * ph, : w * pw].reshape(b, c, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5)
    out = F.linear(patches.reshape(b, h * w, c * ph * pw), proj.weight.reshape(proj.out_channels, -1), proj.bias)
    return out.transpose(1, 2).reshape(b, -1, h, w)


def resize_pos_embed(pos_embed: Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int], num_prefix: int,
                     mode: str) -> Tensor:
    """Interpolate the grid part of ``pos_embed`` ``[1, P + h*w, C]`` to ``new_grid`` (align_corners=False)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    (h, w), (new_h, new_w) = old_grid, new_grid
    grid = grid.reshape(1, h, w, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_h, new_w), mode=mode, align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, -1)], dim=1)


@BACKBONE_REGISTRY.register()
class ALGMViT(nn.Module):
    """timm VisionTransformer/Eva encoder with ALGM; ``forward(images) -> (tokens [B, T, C], MergeState)``.

    Args:
        vit: a timm ``VisionTransformer`` (incl. DeiT) or ``Eva`` (EVA-01, EVA-02 with RoPE) with pre-norm blocks.
        algm: where and how to merge; ``OFF`` (default) gives the plain model.
        pos_embed_interp: how the absolute position embedding is resized to another grid ("bilinear" as
            Segmenter, "bicubic" as timm).
        activation_checkpointing: recompute the attention and MLP halves of each block in backward when training.
        packed_attention: run padded per-image batches on their valid tokens only, with variable-length attention
            (inference; see :meth:`_packs`); False keeps the padded batch with a key mask.
        cuda_graphs: in CUDA inference, replay the work between two host syncs as a CUDA graph once its shape
            comes back (see :mod:`.block_graphs`; small models are bound by the host's launches); no effect on the
            CPU or in training. ``cuda_graph_buckets``: row buckets per doubling of a packed total
            (:class:`BlockGraphs` ``buckets_per_octave``).
    """

    def __init__(self, *, vit: nn.Module, algm: ALGMConfig = OFF, pos_embed_interp: str = "bicubic",
                 activation_checkpointing: bool = False, packed_attention: bool = True,
                 cuda_graphs: bool = True, cuda_graph_buckets: int = 16) -> None:
        super().__init__()
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
            raise TypeError(f"expected a timm VisionTransformer or Eva, got {type(vit).__name__}")
        self.kinds = [_block_kind(block) for block in vit.blocks]
        algm.check_depth(len(vit.blocks))
        # Adopt timm's submodules and parameters (same objects): identical state_dict keys, no "vit." prefix.
        for name, child in vit.named_children():
            self.add_module(name, child)
        for name, param in vit.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in vit.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in vit._non_persistent_buffers_set)
        for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
            if not hasattr(self, name):
                setattr(self, name, None)
        if not hasattr(self, "rope"):
            self.rope = None
        # The ViT's own keys, to tell them from what subclasses add (pretrained loading initialises only these).
        self.vit_state_keys = frozenset(vit.state_dict())
        if getattr(vit, "patch_drop", None) is not None and not isinstance(vit.patch_drop, nn.Identity):
            raise NotImplementedError("patch dropout changes the token grid; build the timm model without it")
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.no_embed_class = bool(getattr(vit, "no_embed_class", False))
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.pretrain_grid = tuple(vit.patch_embed.grid_size)
        self.embed_dim = int(vit.embed_dim) if hasattr(vit, "embed_dim") else int(vit.num_features)
        self.algm = algm
        self.pos_embed_interp = pos_embed_interp
        self.activation_checkpointing = activation_checkpointing
        self.packed_attention = packed_attention
        self.block_graphs: Optional[BlockGraphs] = None
        self.use_cuda_graphs(cuda_graphs, buckets_per_octave=cuda_graph_buckets)

    @classmethod
    def from_config(cls, cfg, vit: Optional[nn.Module] = None) -> "ALGMViT":  # noqa: ANN001 - a CfgNode
        """The backbone MODEL.BACKBONE and MODEL.ALGM describe; ``vit`` replaces the timm model built from them."""
        node = cfg.MODEL.BACKBONE
        return cls(vit=build_timm_vit(cfg) if vit is None else vit, algm=algm_config_from_cfg(cfg), pos_embed_interp=node.POS_EMBED_INTERP,
                   activation_checkpointing=node.ACTIVATION_CHECKPOINTING, cuda_graphs=node.CUDA_GRAPHS,
                   cuda_graph_buckets=node.CUDA_GRAPH_BUCKETS)

    def use_cuda_graphs(self, enabled: bool, *, max_graphs: int = 128, buckets_per_octave: int = 16,
                        capture: bool = True, capture_after: int = 2) -> None:
        """Turn the segment CUDA graphs on (a fresh, empty :class:`BlockGraphs`) or off (frees them)."""
        self.block_graphs = (BlockGraphs(max_graphs=max_graphs, buckets_per_octave=buckets_per_octave,
                                         capture=capture, capture_after=capture_after) if enabled else None)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "ALGMViT":
        # .to() / .half() / .cuda() may give the parameters new storage, which captured graphs would not see
        if self.block_graphs is not None:
            self.block_graphs.clear()
        return super()._apply(fn, recurse)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, images: Tensor) -> Tuple[Tensor, Tuple[int, int], Optional[Tensor]]:
        """Patch + position embedding → (tokens ``[B, P + h*w, C]``, grid (h, w), RoPE sin‖cos ``[h*w, 2D]`` or None)."""
        ph, pw = self.patch_size
        if images.shape[-2] % ph or images.shape[-1] % pw:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {(ph, pw)}; "
                             "pad it first (Segmenter pads bottom/right like the release)")
        x = patchify(self.patch_embed.proj, images)
        grid = (x.shape[-2], x.shape[-1])
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        pos_embed = self.pos_embed
        if pos_embed is not None and grid != self.pretrain_grid:
            num_embedded_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos_embed = resize_pos_embed(pos_embed, self.pretrain_grid, grid, num_embedded_prefix,
                                         self.pos_embed_interp)
        if self.no_embed_class:
            x = x + pos_embed if pos_embed is not None else x
            x = torch.cat(prefix + [x], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1)
            x = x + pos_embed if pos_embed is not None else x
        x = self.norm_pre(self.pos_drop(x))
        rope = None
        if self.rope is not None:
            rope = self.rope.get_embed(shape=list(grid))
            if rope.shape[0] != grid[0] * grid[1]:
                raise ValueError(f"this Eva's RoPE is fixed to its pretraining grid {self.pretrain_grid}, input grid is "
                                 f"{grid}; build the timm model with dynamic_img_size=True")
        return x, grid, rope

    def _attention_residual(self, index: int, x: Tensor, bias: Optional[Tensor], rope: Optional[Tensor]) -> Tensor:
        block = self.blocks[index]
        if self.kinds[index] == "eva":
            out = block.attn(block.norm1(x), rope=rope, attn_mask=bias)
            if block.gamma_1 is not None:
                out = block.gamma_1 * out
            return x + block.drop_path1(out)
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))

    def _mlp_residual(self, index: int, x: Tensor) -> Tensor:
        block = self.blocks[index]
        out = block.mlp(block.norm2(x))
        if self.kinds[index] == "eva":
            if block.gamma_2 is not None:
                out = block.gamma_2 * out
            return x + block.drop_path2(out)
        return x + block.drop_path2(block.ls2(out))

    def _maybe_checkpoint(self, fn: Callable[..., Tensor], *args: object) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def start(self, tokens: Tensor, grid: Tuple[int, int], grid_rope: Optional[Tensor] = None,
              algm: Optional[ALGMConfig] = None) -> "TokenStream":
        """An unmerged stream of embedded tokens ``[B, P + h*w, C]`` ready for :meth:`run_blocks`."""
        state = MergeState.initial(tokens.shape[0], grid, self.num_prefix_tokens, tokens.device)
        return TokenStream(x=tokens, state=state, algm=self.algm if algm is None else algm, grid_rope=grid_rope,
                           rope=grid_rope)

    def run_blocks(self, stream: "TokenStream", start: int, end: int, observer: Optional[Observer] = None) -> None:
        """Run blocks ``start..end-1`` (0-based) on ``stream`` in place, merging where its ALGM config says.

        Adapters interleave their own steps between block ranges; the stream carries the merged tokens, the state and
        the attention inputs derived from it (key bias, RoPE at mean positions) across calls. Each block is
        attention → the merges its layer has → MLP. In CUDA inference with graphs on, the range runs as segments cut
        at the merges' host syncs, each a graph replay (:mod:`.segments`); otherwise eagerly, where a padded
        per-image batch runs packed (valid tokens only, variable-length attention) where :meth:`_packs` allows.
        """
        with dynamic_length_attention(stream.algm.data_dependent):
            if self._graphs_on(stream.x, observer) and splits_into_plans(stream.algm, self.depth):
                SegmentRunner(self, self.block_graphs).run(stream, start, end)
                return
            packed: Optional[Tensor] = None  # the tokens while they stay packed from block to block
            for index in range(start, end):
                packed = self._run_block(stream, index, packed, observer)
            if packed is not None:
                stream.x = stream.layout.unpack(packed)

    def _run_block(self, stream: "TokenStream", index: int, packed: Optional[Tensor],
                   observer: Optional[Observer]) -> Optional[Tensor]:
        """Block ``index`` on ``stream``: attention, the merges after it, MLP. ``packed``: the tokens while they stay
        packed (None when they are in ``stream.x``); returns them after the block."""
        layer = index + 1
        if self._packs(stream, index, observer):
            layout = stream.layout
            packed = layout.pack(stream.x) if packed is None else packed
            packed = self._maybe_checkpoint(self._packed_attention_residual, index, packed, layout)
            if not stream.algm.merges_at(layer):
                packed = self._maybe_checkpoint(self._mlp_residual, index, packed)
                stream.state = stream.state.record_layer()
                return packed
            x = layout.unpack(packed)
        else:
            if packed is not None:  # a block that cannot run packed follows one that did
                stream.x = stream.layout.unpack(packed)
            x = self._maybe_checkpoint(self._attention_residual, index, stream.x, stream.key_bias(stream.x),
                                       stream.rope)
        if observer is not None:
            observer(layer, x, stream.state)
        previous = stream.state
        x, stream.state = merge_after_attention(x, stream.state, stream.algm, layer)
        if stream.state is not previous:
            stream.refresh_attention_inputs(x, self.num_prefix_tokens)
        packed = None
        if self._packs(stream, index, observer):  # the merged per-image batch: its MLP on valid tokens only
            packed = self._maybe_checkpoint(self._mlp_residual, index, stream.layout.pack(x))
        else:
            stream.x = self._maybe_checkpoint(self._mlp_residual, index, x)
        stream.state = stream.state.record_layer()
        return packed

    def _graphs_on(self, x: Tensor, observer: Optional[Observer]) -> bool:
        """Whether blocks on ``x`` replay CUDA graphs (on, inference, no observer, see BlockGraphs.usable; not with
        parameters that DeepSpeed ZeRO-3 gathers and frees around each call: a graph would keep their addresses)."""
        graphs = self.block_graphs
        if graphs is None or observer is not None or self.training or not graphs.usable(x):
            return False
        if graphs.partitioned is None:
            graphs.partitioned = any(hasattr(p, "ds_id") for p in self.parameters())
            if graphs.partitioned:
                logger.warning("block CUDA graphs are off: the parameters are partitioned (DeepSpeed ZeRO-3)")
        return not graphs.partitioned

    def block_packs(self, algm: ALGMConfig, index: int) -> bool:
        """Whether block ``index`` can attend on packed tokens: a plain ViT block (EVA's RoPE/fused-bias attention
        and gated attention stay padded) without a key bias (proportional attention needs one, varlen has none)."""
        return (not algm.prop_attn and self.kinds[index] == "vit"
                and getattr(self.blocks[index].attn, "gate", None) is None)

    def _packs(self, stream: "TokenStream", index: int, observer: Optional[Observer]) -> bool:
        """Whether block ``index`` runs eagerly on packed tokens: a padded per-image batch in inference, a block that
        :meth:`block_packs`, no observer (it reads the padded batch)."""
        return (self.packed_attention and stream.packable and not self.training and observer is None
                and self.block_packs(stream.algm, index))

    def _packed_attention_residual(self, index: int, x: Tensor, offsets: SequenceOffsets) -> Tensor:
        """``x + attn(norm1(x))`` on packed tokens ``[total, C]``: timm's attention parts, variable-length kernel."""
        return packed_attention_residual(self.blocks[index], x, offsets)

    def forward(self, images: Tensor, observer: Optional[Observer] = None, algm: Optional[ALGMConfig] = None
                ) -> Tuple[Tensor, MergeState]:
        """Normalized images ``[B, 3, H, W]`` (H, W multiples of the patch) → final-norm tokens and the merge state.

        ``algm`` overrides the module's config for this call (e.g. ``OFF`` to calibrate on the base model).
        """
        check_image_batch(images)
        x, grid, grid_rope = self.embed(images)
        stream = self.start(x, grid, grid_rope, algm)
        self.run_blocks(stream, 0, self.depth, observer)
        return self.norm(stream.x), stream.state


@dataclass
class TokenStream:
    """Tokens in flight through the blocks of one forward pass, with what attention needs after merges.

    Attributes:
        x: the (merged) sequence ``[B, T, C]``, prefix tokens first.
        state: its merge state.
        algm: the ALGM config of this forward pass.
        bias: additive key bias for attention (log sizes, -inf on padding) or None while nothing is merged; read it
            through :meth:`key_bias` (built on first use after a merge: packed blocks need none).
        grid_rope: RoPE sin‖cos of the unmerged grid (EVA-02) or None; ``rope`` is the one for the current tokens.
        packable: a padded (per-image) merged batch whose total is known on the host: its valid tokens can run
            packed, at the places :attr:`layout` gives (built on first use).
        sizes: the sequence sizes the last graphed range left (saves a host sync when the next range starts).
    """

    x: Tensor
    state: MergeState
    algm: ALGMConfig
    bias: Optional[Tensor] = None
    grid_rope: Optional[Tensor] = None
    rope: Optional[Tensor] = None
    phases: Optional[RotaryPhases] = None
    bias_stale: bool = False
    packable: bool = False
    packed_layout: Optional[PackedLayout] = None
    sizes: Optional[SequenceSizes] = None

    def key_bias(self, x: Tensor) -> Optional[Tensor]:
        """The key bias for padded attention on ``x`` (the current tokens), built once per merge."""
        if self.bias_stale:
            self.bias, self.bias_stale = self.state.attention_bias(self.algm.prop_attn, attention_dtype(x)), False
        return self.bias

    @property
    def layout(self) -> Optional[PackedLayout]:
        """Where the valid tokens of a packable batch sit when packed (None otherwise), built once per merge."""
        if self.packable and self.packed_layout is None:
            self.packed_layout = packed_layout_of(self.state)
        return self.packed_layout

    def refresh_attention_inputs(self, x: Tensor, num_prefix: int) -> None:
        """Refresh what attention needs after a merge (``x``: the merged tokens): the RoPE at mean positions and,
        on first use, the packed layout and the key bias."""
        self.bias, self.bias_stale = None, True
        self.packable = self.state.padded and self.state.total_tokens is not None
        self.packed_layout = None
        if self.grid_rope is not None:
            self.phases = self.phases or RotaryPhases(self.grid_rope, self.state.grid_size)
            self.rope = self.phases.embed(self.state.positions[:, num_prefix:])[:, None]


def apply_algm(model: nn.Module, config: Optional[ALGMConfig] = None, **kwargs: object) -> ALGMViT:
    """Wrap a timm VisionTransformer/Eva so that it merges tokens with ALGM (``config=None``: the defaults).

    The result returns ``(tokens, state)``; ``state.unmerge_to_grid(tokens)`` restores a ``[B, C, H, W]`` map.
    """
    return ALGMViT(vit=model, algm=ALGMConfig() if config is None else config, **kwargs)
