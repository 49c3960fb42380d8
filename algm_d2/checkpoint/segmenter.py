"""Released Segmenter / ALGM checkpoints: ``dir/checkpoint.pth`` (``{"model": state_dict}``) + ``dir/variant.yml``.

Keys load unchanged into :class:`~algm_d2.modeling.meta_arch.segmenter.Segmenter` with strict key and shape
checks. The release's encoder also carries its ImageNet classifier (``encoder.head.*``, ``encoder.head_dist.*``):
segmentation never uses it, so it is dropped on purpose and logged.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import yaml
from torch import nn

from ..merge import OFF, ALGMConfig
from ..modeling.backbone.algm_vit import ALGMViT
from ..modeling.heads.segmenter_heads import LinearDecoder, MaskTransformer
from ..modeling.backbone.build import build_segmenter_vit, check_vit_sizes
from ..modeling.meta_arch.segmenter import Segmenter, own_key, release_key
from .released import convert_released
from .safe_load import UnreadableCheckpointError, UnsafeCheckpointError, load_checked

logger = logging.getLogger(__name__)

# Pixel statistics by the release's "normalization" names, on [0, 1] RGB images.
NORMALIZATION = {
    "vit": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "deit": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}
DROPPED_PREFIXES = ("encoder.head.", "encoder.head_dist.")
# build_segmenter_vit's size arguments -> the release's net_kwargs names
VARIANT_FIELDS = {"img_size": "image_size", "patch_size": "patch_size", "embed_dim": "d_model", "depth": "n_layers",
                  "num_heads": "n_heads"}


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model; the message lists every offending key."""


class _VariantLoader(yaml.SafeLoader):
    """Safe YAML plus the ``!!python/tuple`` tag that ``yaml.dump`` writes for the release's tuples."""


_VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))


def read_variant(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the release keeps variant.yml beside checkpoint.pth; it is missing")
    with open(path) as f:
        variant = yaml.load(f, Loader=_VariantLoader)
    if not isinstance(variant, dict) or "net_kwargs" not in variant:
        raise ValueError(f"{path}: no 'net_kwargs' section; is this a Segmenter variant.yml?")
    return variant


def read_state_dict(path: Union[str, Path], *, weights_only: bool = True) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: ``{"model": ...}`` (release, ours), ``{"state_dict": ...}`` (mmcv) or bare.

    ``weights_only=True`` (default) refuses pickled code; pass False only for files you trust.
    """
    path = Path(path)
    if weights_only:
        try:
            data = load_checked(path)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{err}. If you trust where the file came from, the Python loaders take "
                                        "weights_only=False") from None
    else:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - torch raises several types; name the file
            raise UnreadableCheckpointError(f"{path}: cannot be read as a checkpoint: {err}") from err
    for key in ("model", "state_dict", "module"):
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: no state dict of tensors found (looked under 'model', 'state_dict', 'module')")
    return dict(data)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                           drop_prefixes: tuple = ()) -> None:
    """Load with every key and shape checked; raise :class:`CheckpointMismatchError` listing all mismatches."""
    dropped = sorted(k for k in state_dict if k.startswith(drop_prefixes))
    if dropped:
        logger.info("%s: dropping %d keys not used for segmentation: %s", source, len(dropped), ", ".join(dropped))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(drop_prefixes)}
    expected = model.state_dict()
    if isinstance(getattr(model, "net", model), Segmenter) and any(own_key(k) != k for k in state_dict):
        expected = {release_key(k): v for k, v in expected.items()}  # compared (and named) in the file's layout
        raise_on_mismatch(expected, state_dict, f"{source} does not fit the model")
        state_dict = {own_key(k): v for k, v in state_dict.items()}
    raise_on_mismatch(model.state_dict(), state_dict, f"{source} does not fit the model")
    model.load_state_dict(state_dict, strict=True)


def raise_on_mismatch(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], what: str,
                      optional: tuple = (), source_name: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` ("<what>; missing (n): ...; unexpected ...; mis-shaped ...") unless
    ``state_dict`` has exactly ``expected``'s keys (those in ``optional`` may be missing) and shapes."""
    missing = sorted(k for k in set(expected) - set(state_dict) if k not in optional)
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(f"{k}: {source_name} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        parts = [f"{name} ({len(keys)}): {', '.join(keys)}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
                 if keys]
        raise CheckpointMismatchError(f"{what}; " + "; ".join(parts))


def build_from_variant(variant: Mapping[str, Any], algm: ALGMConfig = OFF) -> Segmenter:
    """A randomly initialised Segmenter laid out as the release's ``net_kwargs`` say."""
    net = variant["net_kwargs"]
    missing = [key for key in VARIANT_FIELDS.values() if key not in net]
    if missing:
        raise ValueError(f"variant.yml: net_kwargs has no {', '.join(missing)}")
    sizes = {field: net[key] for field, key in VARIANT_FIELDS.items()}
    if isinstance(sizes["img_size"], (list, tuple)) and sizes["img_size"]:
        sizes["img_size"] = sizes["img_size"][0]
    check_vit_sizes(sizes, {field: f"variant.yml: net_kwargs.{key}" for field, key in VARIANT_FIELDS.items()})
    vit = build_segmenter_vit(
        **sizes, mlp_ratio=float(net.get("d_ff", 4 * net["d_model"]))
        / net["d_model"], dropout=float(net.get("dropout", 0.0)), drop_path_rate=float(net.get("drop_path_rate", 0.0)),
        distilled=bool(net.get("distilled", False)),
    )
    encoder = ALGMViT(vit=vit, algm=algm, pos_embed_interp="bilinear")
    decoder_kwargs = net["decoder"]
    num_classes = int(net["n_cls"])
    name = decoder_kwargs["name"]
    if name == "mask_transformer":
        decoder: nn.Module = MaskTransformer(
            num_classes=num_classes, encoder_dim=encoder.embed_dim, dim=encoder.embed_dim,
            depth=int(decoder_kwargs["n_layers"]), num_heads=encoder.embed_dim // 64,
            dropout=float(decoder_kwargs.get("dropout", 0.0)),
            drop_path_rate=float(decoder_kwargs.get("drop_path_rate", 0.0)))
    elif "linear" in name:
        decoder = LinearDecoder(num_classes=num_classes, encoder_dim=encoder.embed_dim)
    else:
        raise ValueError(f"variant.yml: unknown decoder name {name!r} (expected 'mask_transformer' or 'linear')")
    normalization_name = net.get("normalization", "vit")
    if normalization_name not in NORMALIZATION:
        raise ValueError(f"variant.yml: unknown net_kwargs.normalization {normalization_name!r} (expected one of "
                         f"{', '.join(NORMALIZATION)})")
    normalization = NORMALIZATION[normalization_name]
    return Segmenter(backbone=encoder, decoder=decoder, num_classes=num_classes, normalization=normalization)


def load_model(checkpoint_path: Union[str, Path], algm: Optional[ALGMConfig] = None, *,
               weights_only: bool = True, device: Union[str, torch.device] = "cpu") -> Segmenter:
    """A released Segmenter (or ALGM) checkpoint as a ready model in eval mode.

    Args:
        checkpoint_path: ``.../checkpoint.pth``; ``variant.yml`` must sit beside it.
        algm: merging to apply (None: the plain model). Training-free: the weights are unchanged.
        weights_only: load tensors only (safe); False unpickles arbitrary objects — only for trusted files.
    """
    checkpoint_path = Path(checkpoint_path)
    variant_path = checkpoint_path.parent / "variant.yml"
    variant = read_variant(variant_path)
    try:
        model = build_from_variant(variant, OFF if algm is None else algm)
    except ValueError as err:
        raise ValueError(f"{variant_path}: {err}") from None
    state_dict = read_state_dict(checkpoint_path, weights_only=weights_only)
    load_state_dict_strict(model, state_dict, str(checkpoint_path), drop_prefixes=DROPPED_PREFIXES)
    return model.to(device).eval()


def load_model_weights(model: nn.Module, path: Union[str, Path], *, weights_only: bool = True) -> None:
    """Load MODEL.WEIGHTS into a built model: our checkpoints (keys ``net.*``) into the model, release
    checkpoints (Segmenter's ``encoder.*``/``decoder.*`` with the ImageNet head dropped; EVA's, SETR's and SegViT's
    ``backbone.*``/``decode_head.*``, converted by :mod:`.released`) into its ``net``; strict keys and shapes."""
    state_dict = read_state_dict(path, weights_only=weights_only)
    target = model
    if hasattr(model, "net") and not any(k.startswith("net.") for k in state_dict):
        target = model.net
        state_dict = convert_released(target, state_dict, str(path))  # SETR/SegViT release layouts
    # Non-persistent buffers (pixel statistics) are not in checkpoints; state_dict() already leaves them out.
    load_state_dict_strict(target, state_dict, str(path), drop_prefixes=DROPPED_PREFIXES)
    logger.info("loaded weights from %s into %s", path, type(target).__name__)


def save_release_checkpoint(model: Segmenter, directory: Union[str, Path], variant: Mapping[str, Any]) -> Path:
    """Write ``model`` in the release's layout (``checkpoint.pth`` + ``variant.yml``) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {release_key(k): v for k, v in model.state_dict().items()}}, directory / "checkpoint.pth")
    with open(directory / "variant.yml", "w") as f:
        yaml.safe_dump(_plain(variant), f)
    return directory / "checkpoint.pth"


def _plain(value: Any) -> Any:
    """Tuples → lists so safe_dump can write them."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
