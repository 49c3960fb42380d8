"""GFLOPs (fvcore multiply-adds): exact on a timm ViT, attention counted, both backends agree."""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from algm_d2.evaluation import attention_macs, count_gflops, vit_encoder_macs

BATCH, DEPTH, DIM, HEADS, PATCHES = 2, 12, 192, 3, 196  # vit_tiny_patch16_224
TOKENS = PATCHES + 1


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vit_fvcore(vit, images):
    return count_gflops(vit, images, module_depth=1)


def _analytic(include_layer_norms):
    return vit_encoder_macs(num_patches=PATCHES, embed_dim=DIM, depth=DEPTH, mlp_hidden_dim=4 * DIM, patch_size=16,
                            batch_size=BATCH, include_layer_norms=include_layer_norms)


def test_fvcore_matches_the_analytic_vit_count(vit_fvcore):
    # depth·(N·(4C² + 2·C·4C) + 2·N²·C) + patches·3·16²·C, plus 5 MACs per element for the 25 LayerNorms.
    assert _analytic(False) == BATCH * (DEPTH * (TOKENS * 12 * DIM**2 + 2 * TOKENS**2 * DIM) + PATCHES * 768 * DIM)
    assert vit_fvcore["macs"] == _analytic(True)
    assert vit_fvcore["macs"] == pytest.approx(_analytic(False), rel=0.005)
    assert vit_fvcore["gflops_per_image"] == pytest.approx(1.2582192)  # timm's model card: 1.3 GMACs
    assert vit_fvcore["num_images"] == BATCH
    assert vit_fvcore["unsupported_ops"] == {}  # add, gelu, softmax... are known zeros, not unsupported
    assert vit_fvcore["by_operator"]["scaled_dot_product_attention"] * 1e9 == pytest.approx(
        DEPTH * attention_macs(batch_size=BATCH, num_heads=HEADS, query_tokens=TOKENS, key_tokens=TOKENS,
                               head_dim=DIM // HEADS))


def test_without_the_sdpa_handle_fvcore_misses_exactly_the_attention(vit, images, vit_fvcore):
    from fvcore.nn import FlopCountAnalysis

    plain = FlopCountAnalysis(vit, (images,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        plain_total = plain.total()
    assert plain.unsupported_ops()["aten::scaled_dot_product_attention"] == DEPTH
    attention = DEPTH * attention_macs(batch_size=BATCH, num_heads=HEADS, query_tokens=TOKENS, key_tokens=TOKENS,
                                       head_dim=DIM // HEADS)
    assert vit_fvcore["macs"] - plain_total == attention == BATCH * DEPTH * 2 * TOKENS**2 * DIM


def test_torch_backend_agrees_with_fvcore(vit, images, vit_fvcore):
    counted = count_gflops(vit, images, backend="torch", module_depth=1)
    assert counted["macs"] == vit_fvcore["macs"]
    assert counted["unsupported_ops"] is None
    fvcore_modules = {name: value for name, value in vit_fvcore["by_module"].items() if value}
    assert counted["by_module"] == pytest.approx(fvcore_modules)
    assert set(fvcore_modules) == {"patch_embed", "blocks", "norm"}
    assert sum(fvcore_modules.values()) == pytest.approx(vit_fvcore["gflops"])


class ExplicitAttention(nn.Module):
    """q·kᵀ and attn·v written with matmul, einsum and bmm, plus a matmul that broadcasts its left operand."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6, 5))

    def forward(self, q, k, v):
        out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        out = out + torch.einsum("bhnm,bhmd->bhnd", torch.einsum("bhnd,bhmd->bhnm", q, k).softmax(-1), v)
        batch, heads, tokens, dim = q.shape
        q3, k3, v3 = (t.reshape(batch * heads, -1, dim) for t in (q, k, v))
        out = out + torch.bmm(torch.bmm(q3, k3.transpose(1, 2)).softmax(-1), v3).view_as(q)
        return out, out[0, 0, :, :6] @ self.weight  # [7, 6] @ [4, 6, 5] -> [4, 7, 5]


@pytest.mark.parametrize("backend", ["fvcore", "torch"])
def test_matmul_einsum_bmm_attention(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen) for _ in range(3))
    counted = count_gflops(ExplicitAttention(), (q, k, v), backend=backend)
    expected = 3 * attention_macs(batch_size=2, num_heads=3, query_tokens=7, key_tokens=7, head_dim=8) + 4 * 7 * 6 * 5
    assert counted["macs"] == expected
    assert counted["num_images"] == 2


class NormsAndResizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.group_norm = nn.GroupNorm(2, 8)
        self.batch_norm = nn.BatchNorm2d(8)
        self.layer_norm = nn.LayerNorm(8, elementwise_affine=False)

    def forward(self, x):
        x = self.batch_norm(self.group_norm(self.conv(x)))
        x = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(24, 24), mode="nearest")
        return self.layer_norm(F.adaptive_avg_pool2d(x, 4).permute(0, 2, 3, 1))


@pytest.mark.parametrize("backend", ["fvcore", "torch"])
def test_norms_and_resizes_in_fvcore_convention(backend):
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    counted = count_gflops(NormsAndResizes().eval(), x, backend=backend)
    expected = (
        8 * 3 * 9 * 36  # conv: out channels · in channels · 3² · output pixels
        + 5 * 8 * 36  # affine GroupNorm: 5 per element
        + 2 * 8 * 36  # affine BatchNorm in eval: 2 per element
        + 4 * 8 * 144  # bilinear: 4 per output element
        + 1 * 8 * 576  # nearest: 1 per output element
        + 1 * 8 * 576  # adaptive average pool: 1 per input element
        + 4 * 8 * 16  # LayerNorm without affine: 4 per element
    )
    assert counted["macs"] == expected


class KeepPositive(nn.Module):
    """Keeps the tokens whose first feature is positive (a data-dependent count, like merging), then projects."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.proj(tokens[tokens[:, 0] > 0])


@pytest.mark.parametrize("backend", ["fvcore", "torch"])
def test_data_dependent_shapes_are_counted_for_the_given_input(backend):
    tokens = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 0, 0, 0], [-3.0, 0, 0, 0], [0.5, 0, 0, 0]])
    counted = count_gflops(KeepPositive(), tokens, backend=backend, num_images=1)
    assert counted["macs"] == 3 * 4 * 3  # three kept tokens
    assert counted["gflops_per_image"] == pytest.approx(36e-9)


class DictModel(nn.Module):
    """detectron2-style: a list of dicts with tensors and strings in, a list of dicts out."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 5, 1)
        self.decoder = nn.Linear(5, 5)

    def forward(self, batched_inputs):
        outputs = []
        for sample in batched_inputs:
            assert isinstance(sample["file_name"], str)
            logits = self.head(sample["image"][None])[0]
            outputs.append({"sem_seg": self.decoder(logits.permute(1, 2, 0)), "name": sample["file_name"]})
        return outputs


@pytest.mark.parametrize("backend", ["fvcore", "torch"])
def test_list_of_dicts_inputs_and_dict_outputs(backend):
    batch = [{"image": torch.randn(3, 4, 4), "file_name": f"{i}.png", "height": 4} for i in range(3)]
    counted = count_gflops(DictModel(), batch, backend=backend, module_depth=1)
    assert counted["num_images"] == 3
    assert counted["macs"] == 3 * (16 * 3 * 5 + 16 * 5 * 5)
    assert counted["by_module"]["head"] == pytest.approx(3 * 16 * 3 * 5 / 1e9)


class GatherScatterPool(nn.Module):
    def forward(self, x, index):
        picked = torch.gather(x, 1, index)
        merged = torch.zeros_like(x).scatter_add(1, index, picked)
        return F.avg_pool2d(merged[:, None], 2)


def test_known_zero_ops_are_silent_and_the_rest_are_reported():
    x = torch.randn(2, 4, 6)
    index = torch.tensor([[[0] * 6, [1] * 6]] * 2)
    counted = count_gflops(GatherScatterPool(), (x, index))
    assert counted["macs"] == 0
    assert counted["unsupported_ops"] == {"aten::avg_pool2d": 1}


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend 'jit'"):
        count_gflops(nn.Identity(), torch.zeros(1), backend="jit")
    with pytest.raises(ValueError, match="num_images"):
        count_gflops(nn.Identity(), {"image": torch.zeros(1)})


class CrossAttention(nn.Module):
    """SDPA with Nq != Nk, d_v != d, and (for "gqa") fewer key/value heads than query heads."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, q, k, v):
        if self.mask == "gqa":
            return F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        attn_mask = {"none": None, "float": torch.zeros(5, 9), "bool": torch.ones(5, 9, dtype=torch.bool)}[self.mask]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@pytest.mark.parametrize("backend", ["fvcore", "torch"])
@pytest.mark.parametrize("mask", ["none", "float", "bool", "gqa"])
def test_sdpa_count_ignores_masks_and_counts_query_heads(backend, mask):
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 9, 8, generator=gen), torch.randn(2, 3, 9, 6)
    counted = count_gflops(CrossAttention(mask), (q, k, v), backend=backend)
    assert counted["macs"] == attention_macs(batch_size=2, num_heads=3, query_tokens=5, key_tokens=9, head_dim=8,
                                             value_head_dim=6) == 2 * 3 * 5 * 9 * (8 + 6)
    assert counted["unsupported_ops"] in ({}, None)
