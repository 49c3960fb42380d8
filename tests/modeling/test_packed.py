"""Packed per-image batches: layout round trips, variable-length attention, packed = padded = each image alone."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from algm_d2 import ALGMConfig, apply_algm
from algm_d2.merge import FixedLevel, MergeState
from algm_d2.merge.packing import PackedLayout
from algm_d2.modeling.ops.varlen_attention import (flash_varlen_available, triton_varlen_available, varlen_attention,
                                                   varlen_attention_efficient, varlen_attention_reference,
                                                   varlen_attention_triton)


def state_with_counts(counts):
    """A padded state whose images keep ``counts`` tokens (only the fields the layout reads matter)."""
    seq_len = max(counts)
    state = MergeState.initial(len(counts), (1, seq_len), 0, torch.device("cpu"))
    state.num_tokens = torch.tensor(counts)
    state.padded = min(counts) != max(counts)
    state.total_tokens = sum(counts)
    return state


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(0, 2**16))
def test_pack_then_unpack_restores_valid_tokens_and_zeroes_padding(counts, seed):
    layout = PackedLayout.from_state(state_with_counts(counts))
    x = torch.randn(len(counts), max(counts), 3, generator=torch.Generator().manual_seed(seed))
    packed = layout.pack(x)
    assert packed.shape == (sum(counts), 3)
    assert layout.cu_seqlens.tolist() == [sum(counts[:i]) for i in range(len(counts) + 1)]
    torch.testing.assert_close(packed, torch.cat([x[b, :n] for b, n in enumerate(counts)]))
    restored = layout.unpack(packed)
    for b, n in enumerate(counts):
        assert torch.equal(restored[b, :n], x[b, :n])
        assert not restored[b, n:].any()
    assert layout.valid_mask().tolist() == [[i < n for i in range(max(counts))] for n in counts]


def test_varlen_reference_equals_attention_per_image():
    counts = [5, 2, 7]
    layout = PackedLayout.from_state(state_with_counts(counts))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(counts), 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = varlen_attention_reference(q, k, v, layout)
    start = 0
    for n in counts:
        part = [t[start:start + n].transpose(0, 1) for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*part).transpose(0, 1)
        torch.testing.assert_close(out[start:start + n], expected, rtol=1e-12, atol=1e-12)
        start += n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_varlen_kernels_equal_attention_per_image(dtype):
    """The kernel ``varlen_attention`` picks (ours in bf16, memory-efficient in fp32), the memory-efficient one in
    both dtypes and ours in bf16, against a float64 per-image reference (on a GPU machine; CI has none)."""
    counts = [37, 5, 130, 64]
    layout = PackedLayout.from_state(state_with_counts(counts))
    layout = PackedLayout(layout.cu_seqlens.cuda(), layout.max_seqlen, layout.total, layout.pack_index.cuda())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(counts), 3, 64, generator=g).to("cuda", dtype) for _ in range(3))
    expected = varlen_attention_reference(q.double(), k.double(), v.double(), layout)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert flash_varlen_available(q) == triton_varlen_available(q, k, v) == (dtype == torch.bfloat16)
    outputs = [varlen_attention(q, k, v, layout), varlen_attention_efficient(q, k, v, layout)]
    if dtype == torch.bfloat16:
        outputs.append(varlen_attention_triton(q, k, v, layout))
    for out in outputs:
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def run_interpreted(script: str) -> None:
    """Run ``script`` in a fresh process under Triton's interpreter (set before triton is imported); it prints "ok"."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout[-2000:] + result.stderr[-4000:]


# Triton's interpreter runs the kernel on the CPU (float32 and float16; its bfloat16 dot products are not exact).
_INTERPRETED_VARLEN = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from algm_d2.merge.packing import PackedLayout
    from algm_d2.modeling.ops.varlen_attention import varlen_attention_triton
    torch.manual_seed(0)
    for counts, heads, dim, dtype in (([37, 1, 130, 64], 3, 64, torch.float32), ([70, 9], 2, 32, torch.float16)):
        cu = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
        total = sum(counts)
        layout = PackedLayout(cu, max(counts), total, torch.arange(total))
        q, k, v = torch.randn(total, 3, heads, dim).to(dtype).unbind(1)  # strided views, as the blocks pass them
        out = varlen_attention_triton(q, k, v, layout)
        start = 0
        for n in counts:
            part = [t[start:start + n].transpose(0, 1).double() for t in (q, k, v)]
            expected = F.scaled_dot_product_attention(*part).transpose(0, 1)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-3
            assert (out[start:start + n].double() - expected).abs().max() < tolerance, (counts, n, dtype)
            start += n
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_varlen_kernel_in_the_interpreter():
    run_interpreted(_INTERPRETED_VARLEN)


_INTERPRETED_LAYOUT = textwrap.dedent("""
    import random
    import torch
    from algm_d2.merge.packing import layout_torch
    from algm_d2.modeling.ops.packed_layout import layout_triton
    random.seed(0)
    cases = [[5], [0, 3], [1025] * 32, [1, 2000, 0, 7]] + [
        [random.randint(0, 1100) for _ in range(random.choice([2, 31, 33]))] for _ in range(4)]
    for counts in cases:
        seq_len, total = max(counts) + 2, sum(counts)
        for rows, zero_tail in ((total, False), (total + 37, True)):
            expected, built = (f(torch.tensor(counts), seq_len, rows, zero_tail) for f in (layout_torch, layout_triton))
            assert built[0].dtype == torch.int32 and built[1].dtype == torch.long
            assert torch.equal(built[0], expected[0]) and torch.equal(built[1], expected[1]), counts
            assert built[1].shape == (rows,) and not built[1][total:].any()
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_layout_kernel_in_the_interpreter_equals_the_torch_layout():
    """The one-launch layout builder CUDA uses (run by Triton's interpreter) = the torch ops, element for element."""
    run_interpreted(_INTERPRETED_LAYOUT)


@pytest.mark.parametrize("global_rule", ["batch_stats", FixedLevel(fraction=0.3)])
def test_packed_padded_and_unbatched_per_image_runs_agree(global_rule, monkeypatch):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, embed_dim=48,
                            depth=4, num_heads=3).eval()
    algm = ALGMConfig(local_layer=1, global_layer=2, local_threshold=0.3, global_threshold=global_rule,
                      batch_policy="per_image")
    images = torch.randn(3, 3, 64, 64)
    images[1] = images[1].mean(dim=(1, 2), keepdim=True) + 0.05 * images[1]  # a flat image merges more
    packed_model, padded_model = apply_algm(vit, algm).eval(), apply_algm(vit, algm, packed_attention=False).eval()
    packed_blocks = []
    run_packed = type(packed_model)._packed_attention_residual
    monkeypatch.setattr(type(packed_model), "_packed_attention_residual",
                        lambda self, index, *a: packed_blocks.append(index) or run_packed(self, index, *a))
    with torch.no_grad():
        packed, state = packed_model(images)
        padded, _ = padded_model(images)
        alone = [packed_model(images[i:i + 1])[0] for i in range(3)]
    counts = state.num_tokens.tolist()
    assert state.padded and len(set(counts)) > 1
    assert packed_blocks[:3] == [1, 2, 3]  # the batch run: blocks after CLAP run packed (block 2 unpacks for GBM)
    for b, n in enumerate(counts):
        torch.testing.assert_close(packed[b, :n], padded[b, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[b, :n], alone[b][0], rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2000), st.floats(0, 1), st.integers(0, 3000))
def test_host_fixed_count_equals_the_device_rule(candidates, fraction, count):
    from algm_d2.merge.rules import fixed_count, merge_counts

    scores = torch.zeros(1, candidates)
    for rule in (FixedLevel(fraction=fraction), FixedLevel(count=count)):
        assert fixed_count(candidates, rule) == int(merge_counts(scores, None, rule, "min", 1)[0])


def test_fixed_levels_merge_without_a_host_sync(monkeypatch):
    """The paper-level benchmark setting: counts and lengths are known on the host, nothing reads the device."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, embed_dim=48,
                            depth=4, num_heads=3)
    algm = ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(fraction=0.5),
                      global_threshold=FixedLevel(fraction=0.4))
    model = apply_algm(vit, algm).eval()
    images = torch.randn(2, 3, 64, 96)

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync")

    with torch.no_grad():
        expected, _ = model(images, algm=ALGMConfig(local_layer=1, global_layer=3, local_threshold=0.0,
                                                    global_threshold=0.0, batch_policy="min"))
        for name in ("tolist", "item", "__bool__", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, host_sync)
        tokens, state = model(images)
    monkeypatch.undo()
    # 4×6 grid: 6 windows, 3 merged → 1 + 24 - 12 + 3 = 16 tokens; GBM: 7 A candidates × 0.4 → 3 merged → 13.
    assert tokens.shape[1] == 13 and state.tokens_per_layer()[-1] == [13, 13]
    assert expected.shape[1] < tokens.shape[1]  # τ = 0 merges more: the fixed level was applied, not a threshold


def test_a_plan_that_merges_nothing_reorders_exactly_as_the_general_scatter():
    state = MergeState.initial(2, (3, 4), 1, torch.device("cpu"))
    x = torch.randn(2, 13, 5).to(torch.bfloat16)
    dest = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(12) + 1]) for _ in range(2)])
    moved, moved_state = state.permute(x, dest)
    merged, merged_state = state.apply(x, dest, state.num_tokens, 13, False)
    assert torch.equal(moved, merged)
    for field in ("index_map", "sizes", "positions"):
        assert torch.equal(getattr(moved_state, field), getattr(merged_state, field))
