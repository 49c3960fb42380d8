"""add_algm_config on detectron2's CfgNode (after Mask2Former's), the mask2former:// _BASE_, the optimizer's
parameter groups, and that nothing outside algm_d2.d2 imports detectron2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from .common import CONFIGS, merged_token_cfg

from detectron2.config import get_cfg as d2_get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.projects.deeplab import add_deeplab_config  # noqa: E402
from mask2former import add_maskformer2_config  # noqa: E402

from algm_d2.config import get_cfg as algm_get_cfg  # noqa: E402
from algm_d2.d2 import CfgNode, add_algm_config, build_optimizer, get_cfg  # noqa: E402
from algm_d2.d2.config import BRIDGED_KEYS, BRIDGED_NODES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def flatten(node: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def mask2former_cfg():
    cfg = d2_get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    return cfg


def test_adds_every_bridged_key_with_its_default_and_changes_none_of_theirs():
    before = flatten(mask2former_cfg())
    cfg = mask2former_cfg()
    add_algm_config(cfg)
    after = flatten(cfg)
    ours = flatten(algm_get_cfg())
    # detectron2's and Mask2Former's keys keep their values (and so their meaning)
    assert {k: after[k] for k in before} == before
    assert after["MODEL.MASK_FORMER.CLASS_WEIGHT"] == 1.0 and ours["MODEL.MASK_FORMER.CLASS_WEIGHT"] == 2.0
    assert after["SOLVER.OPTIMIZER"] == "ADAMW" and after["MODEL.PIXEL_MEAN"] == before["MODEL.PIXEL_MEAN"]
    wanted = [k for k in ours if k.startswith(tuple(n + "." for n in BRIDGED_NODES))] + list(BRIDGED_KEYS)
    added = set(after) - set(before)
    assert {k for k in wanted if k not in before} | {"SOLVER.AMP.PRECISION"} == added
    assert all(after[k] == ours[k] for k in added if k in ours)
    assert after["MODEL.ALGM.GLOBAL_THRESHOLD"] == "batch_stats" and after["MODEL.VIT_ADAPTER.N_POINTS"] == 4
    assert after["SOLVER.AMP.PRECISION"] == "float16"


def test_threshold_keys_take_floats_and_rule_strings(tmp_path):
    plain = mask2former_cfg()
    plain.MODEL.ALGM = type(plain)({"GLOBAL_THRESHOLD": "batch_stats"})
    with pytest.raises(ValueError, match="Type mismatch"):  # detectron2's own merge rules
        plain.merge_from_list(["MODEL.ALGM.GLOBAL_THRESHOLD", "0.9"])
    cfg = get_cfg()
    assert isinstance(cfg, CfgNode) and isinstance(cfg.MODEL.ALGM, CfgNode)
    cfg.merge_from_list(["MODEL.ALGM.GLOBAL_THRESHOLD", "0.9", "MODEL.ALGM.LOCAL_THRESHOLD", "batch_stats"])
    assert cfg.MODEL.ALGM.GLOBAL_THRESHOLD == 0.9 and cfg.MODEL.ALGM.LOCAL_THRESHOLD == "batch_stats"
    path = tmp_path / "x.yaml"
    path.write_text("MODEL:\n  ALGM:\n    LOCAL_THRESHOLD: 'top:4'\n    GLOBAL_THRESHOLD: 0.75\n"
                    "SOLVER:\n  BASE_LR: 1\n")
    cfg.merge_from_file(str(path))
    assert (cfg.MODEL.ALGM.LOCAL_THRESHOLD, cfg.MODEL.ALGM.GLOBAL_THRESHOLD, cfg.SOLVER.BASE_LR) == ("top:4", 0.75, 1.0)
    with pytest.raises(ValueError, match="MODEL.ALGM.GLOBAL_THRESHOLD"):
        cfg.merge_from_list(["MODEL.ALGM.GLOBAL_THRESHOLD", "True"])
    with pytest.raises(KeyError, match="MODEL.ALGM.NOPE"):
        cfg.merge_from_list(["MODEL.ALGM.NOPE", "1"])
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.HIDDEN_DIM"):  # other keys keep their types
        cfg.merge_from_list(["MODEL.MASK_FORMER.HIDDEN_DIM", "'wide'"])
    assert type(cfg.clone()) is CfgNode
    # a node another project adds afterwards merges too
    cfg = get_cfg()
    cfg.MODEL.OTHER_PROJECT = type(mask2former_cfg())({"SCALE": 1.0})
    cfg.merge_from_list(["MODEL.OTHER_PROJECT.SCALE", "2.0"])
    assert cfg.MODEL.OTHER_PROJECT.SCALE == 2.0


def test_needs_mask2former_config_first():
    cfg = d2_get_cfg()
    with pytest.raises(ValueError, match="add_maskformer2_config"):
        add_algm_config(cfg)
    with pytest.raises(TypeError, match="detectron2's CfgNode"):
        add_algm_config(algm_get_cfg())


def test_configs_base_on_mask2former_ade20k_files(tmp_path):
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = get_cfg()
        cfg.merge_from_file(str(path))
        assert cfg.DATASETS.TRAIN == ("ade20k_sem_seg_train",), path.name  # from Mask2Former's base
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150 and cfg.INPUT.FORMAT == "RGB", path.name
    bad = tmp_path / "bad.yaml"
    bad.write_text("_BASE_: mask2former://configs/nope.yaml\n")
    with pytest.raises(FileNotFoundError, match="mask2former://configs/nope.yaml"):
        get_cfg().merge_from_file(str(bad))


def test_optimizer_uses_algm_groups_with_mask2former_keys():
    cfg = merged_token_cfg(["SOLVER.WEIGHT_DECAY", 0.05, "SOLVER.LAYER_DECAY", 0.5, "SOLVER.BACKBONE_MULTIPLIER", 0.1,
                            "SOLVER.BASE_LR", 1e-3, "SOLVER.CLIP_GRADIENTS.ENABLED", True, "DATASETS.TRAIN", ("x",)])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    by_name = {name: group for group in optimizer.param_groups for name in group["names"]}
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    # no decay on position embedding / class token (Mask2Former's builder decays both), layer decay 0.5 over 4 blocks
    for name in ("backbone.pos_embed", "backbone.cls_token"):
        assert by_name[name]["weight_decay"] == 0.0 and by_name[name]["lr"] == pytest.approx(1e-3 * 0.1 * 0.5 ** 5)
    assert by_name["backbone.blocks.3.mlp.fc1.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.blocks.3.mlp.fc1.weight"]["lr"] == pytest.approx(1e-3 * 0.1 * 0.5)
    assert by_name["sem_seg_head.mask_proj.weight"]["lr"] == pytest.approx(1e-3)  # not backbone: no multiplier
    assert by_name["sem_seg_head.mask_proj.bias"]["weight_decay"] == 0.0
    assert type(optimizer).__name__ == "AdamWWithFullModelGradientClipping"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        cfg.defrost()
        cfg.SOLVER.OPTIMIZER = "AdamW"
        build_optimizer(cfg, model)


def test_algm_d2_imports_without_detectron2():
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('detectron2', 'mask2former'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import algm_d2, algm_d2.config, algm_d2.merge\n"
        "assert not [m for m in sys.modules if m.startswith('detectron2')]\n"
        "try:\n"
        "    import algm_d2.d2\n"
        "except ImportError as err:\n"
        "    assert 'pip install' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('algm_d2.d2 imported without detectron2')\n"
    )
    subprocess.run([sys.executable, "-c", blocker], check=True, cwd=ROOT)
    # the rest of the package (modeling, engine, data, ...: slower to import) by its source
    outside = [p for p in (ROOT / "algm_d2").rglob("*.py")
               if "d2" not in p.relative_to(ROOT / "algm_d2").parts[:1] and "detectron2" in p.read_text()
               and any(line.lstrip().startswith(("import detectron2", "from detectron2"))
                       for line in p.read_text().splitlines())]
    assert outside == []


def test_registries_keep_their_own_classes_of_shared_names():
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY
    from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY
    from mask2former.modeling.pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder as M2FPixelDecoder
    from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
        MultiScaleMaskedTransformerDecoder as M2FDecoder,
    )
    from mask2former.modeling.transformer_decoder.maskformer_transformer_decoder import TRANSFORMER_DECODER_REGISTRY

    import algm_d2.d2  # noqa: F401 - registers
    from algm_d2 import modeling

    assert SEM_SEG_HEADS_REGISTRY.get("MSDeformAttnPixelDecoder") is M2FPixelDecoder
    assert TRANSFORMER_DECODER_REGISTRY.get("MultiScaleMaskedTransformerDecoder") is M2FDecoder
    assert modeling.PIXEL_DECODER_REGISTRY.get("MSDeformAttnPixelDecoder").__module__.startswith("algm_d2.")
    assert modeling.TRANSFORMER_DECODER_REGISTRY.get("MultiScaleMaskedTransformerDecoder").__module__.startswith(
        "algm_d2.")
    for name in ("build_algm_vit_backbone", "build_algm_vit_pyramid_backbone", "build_algm_vit_adapter_backbone"):
        assert BACKBONE_REGISTRY.get(name).__module__ == "algm_d2.d2.backbone"
    assert SEM_SEG_HEADS_REGISTRY.get("build_merged_token_mask2former_head").__module__ == "algm_d2.d2.head"
    for name in ("ALGMSegmenter", "ALGMMask2Former", "ALGMMergedTokenMask2Former"):
        assert META_ARCH_REGISTRY.get(name).__module__ == "algm_d2.d2.meta_arch"
