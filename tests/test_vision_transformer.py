"""The ViT family: exact released layout, token order, interpolation, attention kernels, drop path."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dinov2.hub import create
from dinov2.hub.export import count_parameters
from dinov2.layers import attention as attention_module
from dinov2.layers.drop_path import add_residual_on_kept_samples, drop_path
from dinov2.layers.mlp import SwiGLUFFNFused, swiglu_hidden_dim
from dinov2.models import build_vit, interpolate_pos_embed


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("dinov2_vits14", 22_056_576),
        ("dinov2_vitb14", 86_580_480),
        ("dinov2_vitl14", 304_368_640),
        ("dinov2_vitg14", 1_136_480_768),
    ],
)
def test_parameter_counts_match_the_released_models(name, parameters):
    with torch.device("meta"):
        model = create(name, pretrained=False)
    assert count_parameters(model) == parameters


def released_vits14_layout(registers: int = 0) -> dict[str, tuple[int, ...]]:
    """The state dict of the released dinov2_vits14, written out from the published key list."""
    dim, hidden = 384, 1536
    layout = {"cls_token": (1, 1, dim), "pos_embed": (1, 1370, dim), "mask_token": (1, dim)}
    if registers:
        layout["register_tokens"] = (1, registers, dim)
    layout["patch_embed.proj.weight"] = (dim, 3, 14, 14)
    layout["patch_embed.proj.bias"] = (dim,)
    for i in range(12):
        block = {
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
            "ls1.gamma": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,),
            "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
            "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,),
            "ls2.gamma": (dim,),
        }  # fmt: skip
        layout.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    layout["norm.weight"] = (dim,)
    layout["norm.bias"] = (dim,)
    return layout


@pytest.mark.parametrize("name, registers, n_keys", [("dinov2_vits14", 0, 175), ("dinov2_vits14_reg", 4, 176)])
def test_vits14_state_dict_has_exactly_the_released_keys_and_shapes(name, registers, n_keys):
    with torch.device("meta"):
        model = create(name, pretrained=False)
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = released_vits14_layout(registers)
    assert len(expected) == n_keys
    assert got == expected


def test_vitg14_uses_the_packed_swiglu_layout():
    with torch.device("meta"):
        model = create("dinov2_vitg14", pretrained=False)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items() if key.startswith("blocks.39.mlp")}
    assert shapes == {
        "blocks.39.mlp.w12.weight": (8192, 1536),
        "blocks.39.mlp.w12.bias": (8192,),
        "blocks.39.mlp.w3.weight": (1536, 4096),
        "blocks.39.mlp.w3.bias": (1536,),
    }


def test_swiglu_hidden_width_and_output_by_hand():
    assert swiglu_hidden_dim(6144) == 4096
    assert swiglu_hidden_dim(4096) == 2736  # ViT-L from scratch with SwiGLU
    torch.manual_seed(0)
    ffn = SwiGLUFFNFused(8, 12)  # hidden 12 -> 8
    x = torch.randn(3, 8)
    x1 = x @ ffn.w12.weight[:8].T + ffn.w12.bias[:8]
    x2 = x @ ffn.w12.weight[8:].T + ffn.w12.bias[8:]
    expected = (x1 * torch.sigmoid(x1) * x2) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), expected)


def test_initialisation_follows_the_reference(tiny_vit):
    model = tiny_vit(num_register_tokens=2)
    assert torch.count_nonzero(model.mask_token) == 0
    assert model.cls_token.abs().max() < 1e-5
    assert model.register_tokens.abs().max() < 1e-5
    assert 0.01 < model.pos_embed.std() < 0.03
    assert all(torch.count_nonzero(block.attn.qkv.bias) == 0 for block in model.blocks)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((64,), 1e-5))


def test_token_order_cls_registers_patches_and_registers_have_no_position_embedding(tiny_vit, photo_batch):
    model = tiny_vit(num_register_tokens=3)
    images = photo_batch(32)
    tokens = model.prepare_tokens_with_masks(images)
    assert tokens.shape == (4, 1 + 3 + 64, 64)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1]).expand(4, 1, 64)[:, 0])
    torch.testing.assert_close(tokens[:, 1:4], model.register_tokens.expand(4, -1, -1))
    patches = model.patch_embed(images) + model.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[:, 4:], patches)


def test_fully_masked_images_give_the_same_output_whatever_their_content(tiny_vit, photo_batch):
    model = tiny_vit()
    images = photo_batch(32)
    masks = torch.ones(4, 64, dtype=torch.bool)
    out = model.forward_features(images, masks=masks)["x_norm_clstoken"]
    torch.testing.assert_close(out[0], out[1])
    unmasked = model.forward_features(images)["x_norm_clstoken"]
    assert not torch.allclose(unmasked[0], unmasked[1])


def test_position_embedding_is_used_as_is_on_the_training_grid(tiny_vit):
    model = tiny_vit()
    assert model.position_embedding((8, 8), torch.float32) is model.pos_embed


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True)])
def test_interpolation_keeps_rows_as_rows_on_non_square_grids(offset, antialias):
    # position embedding that varies along the rows only (value = row index), 4x4 grid, 2 channels
    rows = torch.arange(4.0).repeat_interleave(4)
    patch_pos = torch.stack([rows, torch.ones(16)], dim=-1).unsqueeze(0)
    resized = interpolate_pos_embed(patch_pos, (2, 6), offset, antialias).reshape(2, 6, 2)
    assert resized.shape == (2, 6, 2)
    # constant along each row, increasing down the rows, constants preserved
    torch.testing.assert_close(resized[..., 0], resized[:, :1, 0].expand(2, 6))
    assert resized[1, 0, 0] > resized[0, 0, 0]
    torch.testing.assert_close(resized[..., 1], torch.ones(2, 6))


def test_legacy_offset_and_antialias_interpolation_differ_as_in_the_released_models():
    torch.manual_seed(0)
    patch_pos = torch.randn(1, 37 * 37, 8)
    legacy = interpolate_pos_embed(patch_pos, (16, 16), 0.1, False)
    antialiased = interpolate_pos_embed(patch_pos, (16, 16), 0.0, True)
    assert legacy.shape == antialiased.shape == (1, 256, 8)
    # antialiasing low-passes the 37->16 downsampling: smaller spread than plain bicubic
    assert antialiased.std() < legacy.std()
    expected_legacy = F.interpolate(
        patch_pos.reshape(1, 37, 37, 8).permute(0, 3, 1, 2), scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic"
    )
    torch.testing.assert_close(legacy, expected_legacy.permute(0, 2, 3, 1).reshape(1, 256, 8))


def test_any_multiple_of_the_patch_size_runs(tiny_vit, photo_batch):
    model = tiny_vit()
    images = F.interpolate(photo_batch(32), size=(24, 40), mode="bilinear")
    out = model.forward_features(images)
    assert out["x_norm_patchtokens"].shape == (4, 6 * 10, 64)


def test_sdpa_and_plain_math_attention_agree(tiny_vit, photo_batch):
    model = tiny_vit(init_values=1.0)  # LayerScale 1 so attention dominates the output
    images = photo_batch(32)
    model.set_attention_backend("sdpa")
    sdpa = model.forward_features(images)["x_prenorm"]
    model.set_attention_backend("math")
    math = model.forward_features(images)["x_prenorm"]
    torch.testing.assert_close(sdpa, math, atol=1e-5, rtol=1e-5)


def test_xformers_backend_falls_back_to_sdpa_silently_when_its_kernels_do_not_run(tiny_vit, photo_batch, monkeypatch):
    # An xformers that imports but has no kernel for this build, as PyPI's wheel on torch 2.11+cu130.
    broken = types.ModuleType("xformers.ops")

    def memory_efficient_attention(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    broken.memory_efficient_attention = memory_efficient_attention
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", broken)
    attention_module.xformers_usable.cache_clear()
    try:
        model = tiny_vit()
        images = photo_batch(32)
        expected = model(images)
        model.set_attention_backend("xformers")
        torch.testing.assert_close(model(images), expected)
        assert attention_module.xformers_usable("cpu", torch.float32) is False
    finally:
        attention_module.xformers_usable.cache_clear()


def test_list_of_crops_equals_each_crop_on_its_own(tiny_vit, photo_batch):
    model = tiny_vit()
    global_crops = photo_batch(32)
    local_crops = photo_batch(16)
    masks = torch.zeros(4, 64, dtype=torch.bool)
    masks[:2, 10:30] = True
    together = model.forward_features([global_crops, local_crops], masks=[masks, None])
    alone = [model.forward_features(global_crops, masks=masks), model.forward_features(local_crops)]
    for joint, single in zip(together, alone, strict=True):
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(joint[key], single[key])
    assert together[1]["x_norm_patchtokens"].shape == (4, 16, 64)


def test_intermediate_layers_match_forward_features(tiny_vit, photo_batch):
    model = tiny_vit(depth=3, num_register_tokens=1)
    images = photo_batch(32)
    features = model.forward_features(images)
    last = model.get_intermediate_layers(images, n=1, return_class_token=True)
    torch.testing.assert_close(last[0][0], features["x_norm_patchtokens"])
    torch.testing.assert_close(last[0][1], features["x_norm_clstoken"])
    by_index = model.get_intermediate_layers(images, n=[0, 2], reshape=True)
    assert [tuple(out.shape) for out in by_index] == [(4, 64, 8, 8), (4, 64, 8, 8)]
    torch.testing.assert_close(by_index[1].flatten(2).transpose(1, 2), features["x_norm_patchtokens"])
    with pytest.raises(ValueError, match="out of range for a model with 3 blocks"):
        model.get_intermediate_layers(images, n=[3])


def test_drop_path_keeps_or_drops_whole_samples():
    torch.manual_seed(0)
    out = drop_path(torch.ones(1000, 5), rate=0.5)
    per_sample = out[:, 0]
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(out, per_sample[:, None].expand(-1, 5))
    assert 400 < int((per_sample == 2.0).sum()) < 600


def test_kept_sample_drop_path_computes_the_branch_only_for_kept_samples():
    torch.manual_seed(0)
    x = torch.zeros(4, 3, 2)
    seen = []

    def branch(kept):
        seen.append(kept.shape[0])
        return torch.ones_like(kept)

    out = add_residual_on_kept_samples(x, branch, rate=0.5)
    assert seen == [2]
    changed = out.flatten(1).abs().sum(dim=1) > 0
    assert int(changed.sum()) == 2
    assert torch.all(out[changed] == 2.0)  # scaled by batch / kept = 4 / 2


def test_drop_path_is_off_in_eval_mode_and_on_in_training(tiny_vit, photo_batch):
    model = tiny_vit(drop_path_rate=0.4, drop_path_uniform=True, init_values=1.0)
    images = photo_batch(32)
    torch.testing.assert_close(model(images), model(images))
    model.train()
    torch.manual_seed(1)
    first = model(images)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(images))


def test_bad_inputs_name_the_problem(tiny_vit, photo_batch):
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"image size 30x32 is not a multiple of the patch size 4"):
        model(photo_batch(32)[:, :, :30])
    with pytest.raises(ValueError, match="masks must have shape"):
        model.forward_features(photo_batch(32), masks=torch.zeros(4, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown architecture 'vit_huge'"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="unknown model 'dinov2_vitx14'"):
        create("dinov2_vitx14")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        tiny_vit(attn_backend="flash")
    with pytest.raises(ValueError, match="unknown ffn_layer 'moe'"):
        tiny_vit(ffn_layer="moe")
