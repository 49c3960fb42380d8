"""The bridged models built by detectron2 from configs/detectron2/ (tiny sizes), against real detectron2 and
Mask2Former: output shapes, a training step, SemSegEvaluator, DetectionCheckpointer, parity with algm_d2's models."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from .common import (
    CONFIGS, MERGING, NUM_CLASSES, SIZE, SLIDE_TEST, TINY_ADAPTER, TINY_MASK2FORMER, adapter_cfg, merged_token_cfg,
    register_tiny_dataset, tiny_cfg,
)

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_test_loader  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from mask2former import MaskFormerSemanticDatasetMapper  # noqa: E402
from PIL import Image  # noqa: E402

from algm_d2.checkpoint import load_model_weights  # noqa: E402
from algm_d2.config import get_cfg as algm_get_cfg  # noqa: E402
from algm_d2.d2 import MERGED_TOKENS, ALGMSegmenter  # noqa: E402
from algm_d2.d2.checkpoint import to_maskformer_layout  # noqa: E402
from algm_d2.modeling import MergedTokenMask2Former, ViTAdapter  # noqa: E402
from algm_d2.modeling import build_model as algm_build_model  # noqa: E402

SEGMENTER = "algm_segmenter_vit_small_mask_512_algm.yaml"


def segmenter_cfg(*extra):  # noqa: ANN001, ANN201
    return tiny_cfg(SEGMENTER, MERGING, SLIDE_TEST, *extra)


def pyramid_cfg(*extra):  # noqa: ANN001, ANN201
    return merged_token_cfg(["MODEL.BACKBONE.NAME", "build_algm_vit_pyramid_backbone"], *extra)


def pyramid_mask2former_cfg(*extra):  # noqa: ANN001, ANN201
    """The simple pyramid under Mask2Former's own head (its MSDeformAttnPixelDecoder on res2..res5)."""
    return pyramid_cfg(["MODEL.SEM_SEG_HEAD.NAME", "MaskFormerHead"], *extra)


def eva02_pyramid_cfg(*extra):  # noqa: ANN001, ANN201
    return pyramid_cfg(["MODEL.BACKBONE.ARCH", "eva02", "MODEL.BACKBONE.ROPE_PRETRAIN_GRID", SIZE // 16], *extra)


@pytest.mark.parametrize("make_cfg", [merged_token_cfg, pyramid_cfg, eva02_pyramid_cfg, adapter_cfg])
def test_backbone_outputs_match_output_shape(make_cfg):
    torch.manual_seed(0)
    backbone = build_backbone(make_cfg()).eval()
    shapes = backbone.output_shape()
    assert backbone.padding_constraints["size_divisibility"] == backbone.size_divisibility
    height, width = 64, 96  # multiples of every size_divisibility here (16, 32)
    assert height % backbone.size_divisibility == 0 == width % backbone.size_divisibility
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, height, width))
    assert set(outputs) == set(shapes)
    for name, spec in shapes.items():
        if name == MERGED_TOKENS:
            merged = outputs[name]
            assert merged.tokens.shape[-1] == spec.channels and merged.state.grid_size == (height // spec.stride,
                                                                                          width // spec.stride)
            assert merged.tokens.shape[1] < (height // spec.stride) * (width // spec.stride)  # merged
        else:
            assert outputs[name].shape == (2, spec.channels, height // spec.stride, width // spec.stride), name
    if "res2" in shapes:
        assert [shapes[f"res{i}"].stride for i in range(2, 6)] == [4, 8, 16, 32]


def training_batch(cfg, root) -> List[Dict[str, Any]]:  # noqa: ANN001
    """Two samples of a tiny dataset through Mask2Former's own semantic training mapper."""
    name = register_tiny_dataset(root, "algm_d2_tiny_step", 2)
    mapper = MaskFormerSemanticDatasetMapper(cfg, True)
    return [mapper(dict(record)) for record in DatasetCatalog.get(name)]


@pytest.mark.parametrize("make_cfg", [merged_token_cfg, pyramid_mask2former_cfg, adapter_cfg, segmenter_cfg])
def test_one_training_step(make_cfg, tmp_path):
    torch.manual_seed(0)
    cfg = make_cfg(["DATASETS.TRAIN", ("algm_d2_tiny_step",)])
    batch = training_batch(cfg, tmp_path)
    model = build_model(cfg).train()
    encoder = model.net.backbone if isinstance(model, ALGMSegmenter) else model.backbone
    seen: List[int] = []
    last_block = encoder.blocks[-1].mlp
    last_block.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-2]))
    losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grid = (SIZE // 16) ** 2
    assert seen and seen[-1] < 1 + grid  # the last block runs on merged tokens
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        grad = encoder.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def confusion_miou(predictions: List[np.ndarray], labels: List[np.ndarray], num_classes: int) -> float:
    """mIoU over the classes present in the labels (detectron2's definition), from per-class pixel counts."""
    tp = np.zeros(num_classes)
    pos_pred = np.zeros(num_classes)
    pos_gt = np.zeros(num_classes)
    for pred, label in zip(predictions, labels):
        valid = label != 255
        for k in range(num_classes):
            tp[k] += np.sum((pred == k) & (label == k) & valid)
            pos_pred[k] += np.sum((pred == k) & valid)
            pos_gt[k] += np.sum((label == k) & valid)
    present = pos_gt > 0
    return 100.0 * float(np.mean(tp[present] / (pos_gt + pos_pred - tp)[present]))


@pytest.mark.parametrize("make_cfg", [segmenter_cfg, merged_token_cfg])
def test_sem_seg_evaluator(make_cfg, tmp_path):
    torch.manual_seed(0)
    name = register_tiny_dataset(tmp_path / "data", "algm_d2_tiny_eval", 3, seed=1)
    cfg = make_cfg(["DATASETS.TRAIN", (name,), "DATASETS.TEST", (name,)])
    model = build_model(cfg).eval()
    results = inference_on_dataset(model, build_detection_test_loader(cfg, name),
                                   SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "eval")))
    predictions, labels = [], []
    with torch.no_grad():
        for record in DatasetCatalog.get(name):
            image = torch.as_tensor(read_image(record["file_name"], format="RGB").transpose(2, 0, 1).copy())
            out = model([{"image": image, "height": SIZE, "width": SIZE}])[0]["sem_seg"]
            assert out.shape == (NUM_CLASSES, SIZE, SIZE)
            predictions.append(out.argmax(0).numpy())
            labels.append(np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64))
    assert results["sem_seg"]["mIoU"] == pytest.approx(confusion_miou(predictions, labels, NUM_CLASSES), abs=1e-9)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = segmenter_cfg(["DATASETS.TRAIN", ("x",)])
    model = build_model(cfg).eval()
    image = torch.randint(0, 255, (3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        expected = model([{"image": image}])[0]["sem_seg"]
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(1)
        return build_model(cfg).eval()

    def same(other: torch.nn.Module) -> None:
        state, reference = other.state_dict(), model.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
        with torch.no_grad():
            assert torch.equal(other([{"image": image}])[0]["sem_seg"], expected)

    assert not torch.equal(fresh().state_dict()["net.decoder.cls_emb"], model.state_dict()["net.decoder.cls_emb"])
    restored = fresh()
    DetectionCheckpointer(restored).load(str(tmp_path / "model_final.pth"))
    same(restored)
    # Segmenter's released layout ({"model": encoder.*, decoder.*} with the ImageNet head) loads as it is
    release = {**model.net.state_dict(), "encoder.head.weight": torch.zeros(1000, 64)}
    torch.save({"model": release}, tmp_path / "checkpoint.pth")
    restored = fresh()
    DetectionCheckpointer(restored).load(str(tmp_path / "checkpoint.pth"))
    same(restored)
    # detectron2's model_final.pth into algm_d2's own SegmentationModel (its loader, strict keys), and algm_d2's
    # model.pth ({"model": net.*}) back into detectron2's
    ours = algm_build_model(algm_segmenter_cfg())
    load_model_weights(ours, tmp_path / "model_final.pth")
    same(ours.eval())
    torch.save({"model": ours.state_dict()}, tmp_path / "model.pth")
    restored = fresh()
    DetectionCheckpointer(restored).load(str(tmp_path / "model.pth"))
    same(restored)


def algm_segmenter_cfg():  # noqa: ANN201
    """algm_d2's own config of the network segmenter_cfg() describes."""
    cfg = algm_get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "Segmenter", "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.IMG_SIZE", SIZE,
                         "MODEL.BACKBONE.EMBED_DIM", 64, "MODEL.BACKBONE.DEPTH", 4, "MODEL.BACKBONE.NUM_HEADS", 4,
                         "MODEL.BACKBONE.MLP_RATIO", 2.0, "MODEL.BACKBONE.DROP_PATH_RATE", 0.0,
                         "MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_CLASSES, "MODEL.ALGM.ENABLED", True,
                         "MODEL.ALGM.GLOBAL_LAYER", 3, "MODEL.ALGM.LOCAL_THRESHOLD", 0.3, "TEST.MODE", "slide",
                         "TEST.CROP_SIZE", 32, "TEST.STRIDE", 16, "TEST.BATCH_SIZE", 4])
    return cfg


def test_meta_arch_equals_algm_segmentor():
    """detectron2's build_model on the bridged config = algm_d2's build_model on algm_d2's config, same weights."""
    torch.manual_seed(0)
    bridged = build_model(segmenter_cfg(["DATASETS.TRAIN", ("x",)])).eval()
    ours = algm_build_model(algm_segmenter_cfg()).eval()
    ours.load_state_dict(bridged.state_dict(), strict=True)
    images = [{"image": torch.randint(0, 255, (3, SIZE, 80), dtype=torch.uint8), "height": 50, "width": 70}]
    with torch.no_grad():
        out, reference = bridged(images)[0]["sem_seg"], ours(images)[0]["sem_seg"]
    assert out.shape == (NUM_CLASSES, 50, 70) and torch.equal(out, reference)
    assert bridged.merge_stats["tokens_per_layer"][-1] == ours.merge_stats["tokens_per_layer"][-1]


def test_merged_token_head_equals_merged_token_mask2former(tmp_path):
    """Mask2Former's MaskFormer with the bridged backbone + head = algm_d2's MergedTokenMask2Former, same weights;
    algm_d2's checkpoints of it load through detectron2's checkpointer once in MaskFormer's layout."""
    torch.manual_seed(0)
    cfg = merged_token_cfg(["DATASETS.TRAIN", ("x",)])
    bridged = build_model(cfg).eval()
    ours_cfg = cfg.clone()
    ours_cfg.merge_from_list(["MODEL.BACKBONE.NAME", "ALGMViT",
                              "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MergedTokenMaskedTransformerDecoder"])
    ours = MergedTokenMask2Former.from_config(ours_cfg).eval()
    assert bridged.backbone.state_dict().keys() == ours.backbone.state_dict().keys()
    ours.backbone.load_state_dict(bridged.backbone.state_dict(), strict=True)
    ours.decoder.load_state_dict(bridged.sem_seg_head.state_dict(), strict=True)
    images = torch.randn(2, 3, SIZE, 96)
    with torch.no_grad():
        out = bridged.sem_seg_head(bridged.backbone(images))
        reference = ours.predict(images)
    for key in ("pred_logits", "pred_masks"):
        assert torch.equal(out[key], reference[key]), key
    assert len(out["aux_outputs"]) == len(reference["aux_outputs"]) == 2
    assert all(torch.equal(a["pred_masks"], b["pred_masks"]) for a, b in zip(out["aux_outputs"],
                                                                             reference["aux_outputs"]))
    # algm_d2's layouts: the bare network (backbone.*, decoder.*) and its trainer's model.pth (net.backbone.*, ...)
    for name, state in (("bare.pth", ours.state_dict()),
                        ("model.pth", {"net." + k: v for k, v in ours.state_dict().items()})):
        torch.save({"model": to_maskformer_layout(state)}, tmp_path / name)
        torch.manual_seed(1)
        restored = build_model(cfg).eval()
        DetectionCheckpointer(restored).load(str(tmp_path / name))
        with torch.no_grad():
            assert torch.equal(restored.sem_seg_head(restored.backbone(images))["pred_masks"], out["pred_masks"]), name
    with pytest.raises(KeyError, match="decode_head.x"):
        to_maskformer_layout({"decode_head.x": torch.zeros(1)})


def test_adapter_backbone_equals_vit_adapter():
    torch.manual_seed(0)
    cfg = adapter_cfg(["DATASETS.TRAIN", ("x",)])
    bridged = build_backbone(cfg).eval()
    ours = ViTAdapter.from_config(cfg).eval()
    ours.load_state_dict(bridged.state_dict(), strict=True)
    images = torch.randn(2, 3, SIZE, 96)
    with torch.no_grad():
        out = bridged(images)
        reference, state = ours(images)
    assert state.merged
    assert all(torch.equal(out[f"res{i + 2}"], reference[i]) for i in range(4))


def test_eva_meta_arch_equals_algm_mask2former(tmp_path):
    """ALGMMask2Former (configs/detectron2) = algm_d2's Mask2Former from configs/demo/eva_tiny_algm.yaml, same
    weights; one training step through Mask2Former's semantic mapper."""
    torch.manual_seed(0)
    cfg = tiny_cfg("algm_eva01_vit_adapter_mask2former_896_algm.yaml", TINY_ADAPTER, TINY_MASK2FORMER, MERGING,
                   SLIDE_TEST, ["MODEL.MASK_FORMER.DEC_LAYERS", 4, "MODEL.SEM_SEG_HEAD.ENC_NUM_HEADS", 4,
                                "MODEL.SEM_SEG_HEAD.ENC_NUM_POINTS", 2, "MODEL.SEM_SEG_HEAD.ENC_DIM_FEEDFORWARD", 64,
                                "DATASETS.TRAIN", ("algm_d2_tiny_step",)])
    bridged = build_model(cfg)
    ours_cfg = algm_get_cfg()
    ours_cfg.merge_from_file(str(CONFIGS.parents[1] / "demo" / "eva_tiny_algm.yaml"))
    ours_cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.IMG_SIZE", SIZE, *MERGING, "TEST.MODE", "slide",
                              *SLIDE_TEST, "MODEL.PIXEL_MEAN", cfg.MODEL.PIXEL_MEAN,
                              "MODEL.PIXEL_STD", cfg.MODEL.PIXEL_STD])
    ours = algm_build_model(ours_cfg)
    ours.load_state_dict(bridged.state_dict(), strict=True)
    images = [{"image": torch.randint(0, 255, (3, SIZE, 96), dtype=torch.uint8), "height": 50, "width": 70}]
    with torch.no_grad():
        out, reference = bridged.eval()(images)[0]["sem_seg"], ours.eval()(images)[0]["sem_seg"]
    assert out.shape == (NUM_CLASSES, 50, 70) and torch.equal(out, reference)
    losses = bridged.train()(training_batch(cfg, tmp_path))
    assert losses and all(torch.isfinite(v) for v in losses.values())
