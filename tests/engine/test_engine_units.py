"""Engine pieces that need no training run: lr schedules, parameter groups, the DeepSpeed config, launcher
detection, the command line, spawning local processes, and the shipped training configs."""
from __future__ import annotations

import math
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

from algm_d2.config import get_cfg
from algm_d2.engine import (
    WarmupLRScheduler, build_optimizer, deepspeed_config, default_argument_parser, distributed_backend,
    get_vit_layer_id, layer_decay_param_groups, launch, lr_factor,
)
from algm_d2.engine.launch import first_slurm_host, launcher_env, master_from_url

ROOT = Path(__file__).resolve().parents[2]


def test_poly_and_cosine_schedules_against_hand_computed_values():
    kw = dict(max_iter=100, base_lr=0.01, min_lr=0.001)
    # poly 0.9 at t = 50: 0.009 * 0.5^0.9 + 0.001 = 0.009 * 0.53588673 + 0.001 = 0.0058229806
    assert 0.01 * lr_factor(50, schedule="poly", power=0.9, **kw) == pytest.approx(0.0058229806, abs=1e-9)
    assert 0.01 * lr_factor(0, schedule="poly", **kw) == pytest.approx(0.01)
    assert 0.01 * lr_factor(100, schedule="poly", **kw) == pytest.approx(0.001)
    assert 0.01 * lr_factor(150, schedule="poly", **kw) == pytest.approx(0.001)  # clamped after MAX_ITER
    # cosine at t = 25: 0.001 + 0.009 * (1 + cos(pi / 4)) / 2 = 0.001 + 0.009 * 0.85355339 = 0.0086819805
    assert 0.01 * lr_factor(25, schedule="cosine", **kw) == pytest.approx(0.0086819805, abs=1e-9)
    assert 0.01 * lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.001)
    # the release: base 0.001, min 1e-5, 160k iterations, at 80k: 0.00099 * 0.5358867 + 1e-5 = 0.000540528
    assert 0.001 * lr_factor(80000, schedule="poly", max_iter=160000, base_lr=0.001, min_lr=1e-5) == \
        pytest.approx(0.000540528, abs=1e-9)


def test_linear_warmup_ramps_from_the_warmup_factor():
    kw = dict(max_iter=100, base_lr=0.01, schedule="poly", power=1.0, warmup_iters=10, warmup_factor=0.001)
    # t = 0: 0.001 x poly(0) = 0.001; t = 5: (0.001 * 0.5 + 0.5) x (1 - 5/100) = 0.5005 * 0.95 = 0.475475
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(5, **kw) == pytest.approx(0.475475)
    assert lr_factor(10, **kw) == pytest.approx(0.9)  # warmup over: poly alone, 1 - 10/100
    with pytest.raises(ValueError, match="SOLVER.LR_SCHEDULER"):
        lr_factor(0, max_iter=10, schedule="step", base_lr=0.1)
    with pytest.raises(ValueError, match="SOLVER.MIN_LR"):
        lr_factor(0, max_iter=10, schedule="poly", base_lr=0.1, min_lr=0.2)


def test_scheduler_scales_every_group_and_restores_its_state():
    def make():
        params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
        optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.005}],
                                    lr=0.01)
        return optimizer, WarmupLRScheduler(optimizer, max_iter=10, schedule="cosine", base_lr=0.01, min_lr=0.0,
                                            warmup_iters=2)

    optimizer, scheduler = make()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    factor = lr_factor(3, max_iter=10, schedule="cosine", base_lr=0.01, warmup_iters=2)  # no warmup left at t = 3
    assert factor == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * factor, 0.005 * factor])
    state = scheduler.state_dict()
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    optimizer2.step()
    scheduler2.step()
    scheduler.step()
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr())


class TinyViTNames(nn.Module):
    """Parameters named like SegmentationModel's (net.backbone.*, net.decoder.*), two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Module()
        encoder = self.net.backbone = nn.Module()
        encoder.patch_embed = nn.Conv2d(3, 4, 2)
        encoder.pos_embed = nn.Parameter(torch.zeros(1, 4, 4))
        encoder.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        encoder.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
                                       for _ in range(2))
        encoder.norm = nn.LayerNorm(4)
        self.net.decoder = nn.Module()
        self.net.decoder.cls_emb = nn.Parameter(torch.zeros(1, 3, 4))
        self.net.decoder.proj = nn.Linear(4, 4)


def test_layer_ids_follow_vitdet():
    assert get_vit_layer_id("net.backbone.pos_embed", 12) == 0
    assert get_vit_layer_id("net.backbone.cls_token", 12) == 0
    assert get_vit_layer_id("net.backbone.patch_embed.proj.weight", 12) == 0
    assert get_vit_layer_id("net.backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert get_vit_layer_id("net.backbone.blocks.11.mlp.fc2.bias", 12) == 12
    assert get_vit_layer_id("net.backbone.norm.weight", 12) == 13
    assert get_vit_layer_id("net.decoder.blocks.0.attn.qkv.weight", 12) == 13  # decoder blocks are not the ViT's
    assert get_vit_layer_id("net.backbone.pos_embed_extra", 12) == 13  # whole names only


def test_layer_decay_groups_against_hand_computed_lrs_and_decay():
    groups = layer_decay_param_groups(TinyViTNames(), base_lr=1.0, weight_decay=0.05, layer_decay=0.5, num_layers=2)
    by_name = {name: group for group in groups for name in group["names"]}
    expected = {  # name: (lr = 0.5^(3 - layer), weight decay)
        "net.backbone.patch_embed.weight": (0.125, 0.05), "net.backbone.patch_embed.bias": (0.125, 0.0),
        "net.backbone.pos_embed": (0.125, 0.0), "net.backbone.cls_token": (0.125, 0.0),
        "net.backbone.blocks.0.fc.weight": (0.25, 0.05), "net.backbone.blocks.0.norm.weight": (0.25, 0.0),
        "net.backbone.blocks.1.fc.weight": (0.5, 0.05), "net.backbone.blocks.1.fc.bias": (0.5, 0.0),
        "net.backbone.norm.weight": (1.0, 0.0), "net.decoder.cls_emb": (1.0, 0.0),
        "net.decoder.proj.weight": (1.0, 0.05),
    }
    for name, (lr, decay) in expected.items():
        assert (by_name[name]["lr"], by_name[name]["weight_decay"]) == (pytest.approx(lr), decay), name
    assert len(by_name) == sum(1 for _ in TinyViTNames().parameters())
    assert all(len({by_name[n]["layer_id"] for n in g["names"]}) == 1 for g in groups)
    plain = layer_decay_param_groups(TinyViTNames(), base_lr=0.1, weight_decay=0.0)
    assert len(plain) == 1 and plain[0]["lr"] == 0.1 and plain[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="SOLVER.LAYER_DECAY"):
        layer_decay_param_groups(TinyViTNames(), base_lr=1.0, weight_decay=0.0, layer_decay=0.9, num_layers=0)


def test_optimizer_from_config_uses_the_encoder_depth():
    cfg = get_cfg()
    cfg.SOLVER.merge_from_list(["OPTIMIZER", "AdamW", "BASE_LR", 0.1, "LAYER_DECAY", 0.5, "WEIGHT_DECAY", 0.05])
    optimizer = build_optimizer(cfg, TinyViTNames())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted({round(g["lr"], 6) for g in optimizer.param_groups}) == [0.0125, 0.025, 0.05, 0.1]
    cfg.SOLVER.merge_from_list(["OPTIMIZER", "SGD", "NESTEROV", True, "LAYER_DECAY", 1.0])
    sgd = build_optimizer(cfg, TinyViTNames())
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    cfg.SOLVER.OPTIMIZER = "Adam"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, TinyViTNames())


def test_layer_ids_on_the_segmenter_model():
    from algm_d2.modeling import build_model

    from ..modeling.test_segmenter import tiny_cfg

    model = build_model(tiny_cfg())  # 4 blocks
    ids = {name: get_vit_layer_id(name, 4) for name, _ in model.named_parameters()}
    assert ids["net.backbone.pos_embed"] == 0 and ids["net.backbone.patch_embed.proj.weight"] == 0
    assert {ids[n] for n in ids if n.startswith("net.backbone.blocks.")} == {1, 2, 3, 4}
    assert all(ids[n] == 5 for n in ids if n.startswith("net.decoder."))


def test_deepspeed_config_and_its_errors():
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.merge_from_list(["IMS_PER_BATCH", 16, "GRAD_ACCUM_STEPS", 2])
    cfg.SOLVER.CLIP_GRADIENTS.merge_from_list(["ENABLED", True, "CLIP_VALUE", 0.5])
    cfg.DEEPSPEED.merge_from_list(["ZERO_STAGE", 2, "PRECISION", "bf16"])
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (16, 2, 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5 and "optimizer" not in ds  # a torch optimizer is passed in
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH"):
        deepspeed_config(cfg, world_size=3)
    for key, value, message in [("DEEPSPEED.PRECISION", "fp8", "DEEPSPEED.PRECISION"),
                                ("DEEPSPEED.PRECISION", "fp16", "fp16 needs a GPU"),
                                ("DEEPSPEED.ZERO_STAGE", 4, "DEEPSPEED.ZERO_STAGE"),
                                ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "CLIP_TYPE"),
                                ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", -1.0, "CLIP_VALUE")]:
        bad = cfg.clone()
        bad.merge_from_list([key, value])
        with pytest.raises(ValueError, match=message):
            deepspeed_config(bad, world_size=4)


def test_launcher_environments():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert launcher_env(torchrun) == torchrun
    assert launcher_env({"RANK": "0", "WORLD_SIZE": "2"})["MASTER_PORT"] == "29500"
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[07-08]"}
    assert launcher_env(slurm, dist_url="tcp://ignored:4321") == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "4321"}
    assert launcher_env(dict(slurm, MASTER_ADDR="head", MASTER_PORT="7"))["MASTER_ADDR"] == "head"
    # an sbatch script running `train_net.py --num-gpus 8` once per node sees SLURM_* too: it spawns itself
    assert launcher_env(slurm, spawn_requested=True) is None
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert launcher_env({}) is None


def test_first_host_of_slurm_node_lists():
    assert first_slurm_host("node[01-04,07],gpu2") == "node01"
    assert first_slurm_host("a1,b2") == "a1"
    assert first_slurm_host("gpu-[3-5]-ib") == "gpu-3-ib"
    assert first_slurm_host("single") == "single"


def test_dist_url_forms():
    assert master_from_url("tcp://host:99", 2) == ("host", 99)
    address, port = master_from_url("auto", 1)
    assert address == "127.0.0.1" and 0 < port < 65536
    with pytest.raises(ValueError, match="auto only works on one machine"):
        master_from_url("auto", 2)
    with pytest.raises(ValueError, match="dist-url"):
        master_from_url("udp://x:1", 1)


def test_argument_parser_takes_detectron2_flags_and_overrides():
    args = default_argument_parser().parse_args(
        ["--config-file", "a.yaml", "--eval-only", "--num-gpus", "2", "--num-machines", "3", "--machine-rank", "1",
         "--dist-url", "tcp://h:1", "--resume", "SOLVER.BASE_LR", "0.1"])
    assert args.eval_only and args.resume and (args.num_gpus, args.num_machines, args.machine_rank) == (2, 3, 1)
    assert args.dist_url == "tcp://h:1" and args.opts == ["SOLVER.BASE_LR", "0.1"]
    # the deepspeed launcher puts --local_rank=N first
    args = default_argument_parser().parse_args(["--local_rank=3", "--config-file", "a.yaml", "OUTPUT_DIR", "x"])
    assert args.local_rank == 3 and args.opts == ["OUTPUT_DIR", "x"] and args.dist_url == "auto"


def test_backend_follows_the_device():
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    assert distributed_backend(cfg) == "gloo"
    cfg.MODEL.DEVICE = "cuda"
    assert distributed_backend(cfg) == "nccl"
    cfg.DEEPSPEED.BACKEND = "gloo"
    assert distributed_backend(cfg) == "gloo"


def _sum_ranks(output_dir: Path) -> None:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    (output_dir / f"rank{dist.get_rank()}_of_{dist.get_world_size()}").write_text(str(value.item()))


def test_launch_spawns_local_processes_in_one_group(tmp_path):
    launch(_sum_ranks, 2, dist_url="auto", args=(tmp_path,), backend="gloo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0_of_2", "rank1_of_2"]
    assert all(p.read_text() == "3.0" for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="--machine-rank 2"):
        launch(_sum_ranks, 1, num_machines=2, machine_rank=2, dist_url="tcp://127.0.0.1:1", args=(tmp_path,))


def test_launch_leaves_the_group_when_the_main_function_returns(tmp_path):
    # a rank exiting with a live gloo group could abort at shutdown and fail a finished run
    with mock.patch.dict(os.environ):  # the rendezvous launch exports (RANK, MASTER_PORT, ...) must not leak
        launch(_sum_ranks, 1, dist_url="auto", args=(tmp_path,), backend="gloo")
    assert (tmp_path / "rank0_of_1").read_text() == "1.0"
    assert not dist.is_initialized()
