"""Engine pieces that need no process group: schedules, layer decay, DeepSpeed config, launcher detection, CLI."""
from __future__ import annotations


import pytest
import torch

from algm_d2.config import get_cfg
from algm_d2.engine import build_param_groups, deepspeed_config, default_argument_parser, get_vit_layer_id, lr_factor
from algm_d2.engine.launch import _master_from_url, first_slurm_host, launcher_env
from algm_d2.engine.optim import no_weight_decay

from .test_segmenter import tiny_cfg


def test_poly_and_cosine_schedules_with_warmup():
    kw = dict(max_iter=100, base_lr=0.01, min_lr=0.001)
    # poly, power 0.9: (0.01 - 0.001) * (1 - 50/100)^0.9 + 0.001 = 0.009 * 0.535887 + 0.001 = 0.0058230
    assert lr_factor(50, schedule="poly", power=0.9, **kw) * 0.01 == pytest.approx(0.0058230, abs=1e-7)
    assert lr_factor(100, schedule="poly", power=0.9, **kw) * 0.01 == pytest.approx(0.001)
    # cosine at a quarter: 0.001 + 0.009 * (1 + cos(pi/4)) / 2 = 0.001 + 0.009 * 0.853553 = 0.0086820
    assert lr_factor(25, schedule="cosine", **kw) * 0.01 == pytest.approx(0.0086820, abs=1e-7)
    # warmup: at step 5 of 10, factor (0.001 * 0.5 + 0.5) times the schedule's
    base = lr_factor(5, schedule="poly", power=1.0, **kw)
    assert lr_factor(5, schedule="poly", power=1.0, warmup_iters=10, warmup_factor=0.001, **kw) == \
        pytest.approx(base * 0.5005)
    with pytest.raises(ValueError, match="LR_SCHEDULER"):
        lr_factor(0, schedule="step", **kw)


def test_layer_ids_and_layer_decayed_groups():
    assert get_vit_layer_id("net.encoder.pos_embed", 12) == 0
    assert get_vit_layer_id("net.encoder.patch_embed.proj.weight", 12) == 0
    assert get_vit_layer_id("net.encoder.blocks.0.attn.qkv.weight", 12) == 1
    assert get_vit_layer_id("net.encoder.blocks.11.mlp.fc2.bias", 12) == 12
    assert get_vit_layer_id("net.encoder.norm.weight", 12) == 13
    assert get_vit_layer_id("net.decoder.blocks.0.attn.qkv.weight", 12) == 13
    from algm_d2.modeling import build_model
    model = build_model(tiny_cfg())  # 4 blocks
    groups = build_param_groups(model, base_lr=1.0, weight_decay=0.05, layer_decay=0.5, num_layers=4)
    by_name = {name: g for g in groups for name in g["names"]}
    assert by_name["net.encoder.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(0.5 ** 4)
    assert by_name["net.encoder.pos_embed"]["lr"] == pytest.approx(0.5 ** 5)
    assert by_name["net.decoder.proj_dec.weight"]["lr"] == pytest.approx(1.0)
    assert by_name["net.encoder.blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["net.decoder.cls_emb"]["weight_decay"] == 0.0
    assert by_name["net.encoder.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert no_weight_decay("x.norm.weight", torch.zeros(3)) and not no_weight_decay("x.w", torch.zeros(3, 3))


def test_deepspeed_config_and_its_errors():
    cfg = get_cfg()
    cfg.SOLVER.merge_from_list(["IMS_PER_BATCH", 16, "GRAD_ACCUM_STEPS", 2, "CLIP_GRADIENTS", 1.0])
    cfg.DEEPSPEED.merge_from_list(["ZERO_STAGE", 2, "PRECISION", "bf16"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH"):
        deepspeed_config(cfg, world_size=3)
    cfg.DEEPSPEED.PRECISION = "fp8"
    with pytest.raises(ValueError, match="DEEPSPEED.PRECISION"):
        deepspeed_config(cfg, world_size=4)
    if not torch.cuda.is_available():
        cfg.DEEPSPEED.PRECISION = "fp16"
        with pytest.raises(ValueError, match="fp16 needs a GPU"):
            deepspeed_config(cfg, world_size=4)


def test_launcher_environments():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert launcher_env(torchrun, None) == {k: torchrun[k] for k in torchrun}
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[07-08]"}
    env = launcher_env(slurm, "tcp://ignored:4321")
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "4321"
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None) is None  # a single srun task: ours
    assert launcher_env({}, None) is None
    assert first_slurm_host("node[01-04,07],gpu2") == "node01" and first_slurm_host("a1,b2") == "a1"
    assert _master_from_url("tcp://host:99", 2) == ("host", 99)
    assert _master_from_url("auto", 1)[0] == "127.0.0.1"
    with pytest.raises(ValueError, match="auto only works on one machine"):
        _master_from_url("auto", 2)
    with pytest.raises(ValueError, match="dist-url"):
        _master_from_url("udp://x", 1)


def test_argument_parser_takes_detectron2_flags_and_overrides():
    args = default_argument_parser().parse_args(
        ["--config-file", "a.yaml", "--eval-only", "--num-gpus", "2", "--num-machines", "3", "--machine-rank", "1",
         "--dist-url", "tcp://h:1", "--resume", "SOLVER.BASE_LR", "0.1"])
    assert args.eval_only and args.resume and args.num_gpus == 2 and args.num_machines == 3
    assert args.machine_rank == 1 and args.opts == ["SOLVER.BASE_LR", "0.1"]
