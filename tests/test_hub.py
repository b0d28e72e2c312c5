"""Hub entry points: released-layout round trips, chunked keys, download, export, bad checkpoints."""

import functools
import http.server
import importlib.util
import re
import threading
from pathlib import Path

import pytest
import torch

from dinov2.hub import (
    CheckpointError,
    create,
    dinov2_vits14,
    dinov2_vits14_lc,
    dinov2_vits14_reg,
    load_backbone,
    save_backbone,
    save_timm,
    to_timm_state_dict,
)
from dinov2.hub.backbones import released_backbone_url
from dinov2.hub.classifiers import released_head_url
from dinov2.hub.export import timm_model_kwargs, timm_model_name

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """Downloads go to a per-test torch.hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture(scope="module")
def released_vits14(tmp_path_factory):
    """A ViT-S/14 state dict saved exactly as the released .pth files are: flat keys, torch.save."""
    torch.manual_seed(0)
    model = dinov2_vits14(pretrained=False)
    path = tmp_path_factory.mktemp("released") / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def small_images(batch: int = 2, size: int = 28) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)


def test_released_names_and_urls():
    assert released_backbone_url("vit_small", 14) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    )
    assert released_backbone_url("vit_giant2", 14, 4) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    )
    assert released_head_url("vit_base", 14, 4, 4) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_linear4_head.pth"
    )
    assert released_head_url("vit_large", 14, 0, 1).endswith("dinov2_vitl14/dinov2_vitl14_linear_head.pth")


def test_released_layout_round_trips_with_strict_loading(released_vits14):
    model, path = released_vits14
    loaded = dinov2_vits14(weights=path).eval()
    assert_same_weights(model, loaded)
    torch.testing.assert_close(loaded(small_images()), model(small_images()), rtol=0, atol=0)


def test_file_url_loads(released_vits14):
    model, path = released_vits14
    assert_same_weights(model, dinov2_vits14(weights=path.as_uri()))


def test_chunked_training_checkpoint_with_heads_is_converted(released_vits14, tmp_path):
    model, _ = released_vits14
    # the reference's FSDP layout: 4 chunks of 3 blocks, inside a teacher dict beside the heads
    chunked = {}
    for key, value in model.state_dict().items():
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if match:
            index = int(match.group(1))
            key = f"blocks.{index // 3}.{index}.{match.group(2)}"
        chunked[f"backbone.{key}"] = value
    chunked["dino_head.mlp.0.weight"] = torch.zeros(8, 384)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": chunked}, path)
    assert "backbone.blocks.3.11.attn.qkv.weight" in chunked
    assert_same_weights(model, dinov2_vits14(weights=path))


def serve_folder(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_from_a_local_http_server_is_cached(released_vits14, torch_home):
    model, path = released_vits14
    server = serve_folder(path.parent)
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    try:
        assert_same_weights(model, dinov2_vits14(weights=url))
    finally:
        server.shutdown()
        server.server_close()
    cached = torch_home / "hub" / "checkpoints" / path.name
    assert cached.is_file()
    assert_same_weights(model, dinov2_vits14(weights=url))  # server gone: served from the cache


def test_offline_download_gives_a_clear_error(torch_home):
    server = serve_folder(torch_home.parent)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()  # nothing listens on this port any more
    with pytest.raises(CheckpointError, match=r"could not download http://127\.0\.0\.1:\d+/x\.pth.*offline"):
        dinov2_vits14(weights=f"http://127.0.0.1:{port}/x.pth")
    assert not list((torch_home / "hub" / "checkpoints").glob("*"))


def test_missing_and_unexpected_keys_are_named(released_vits14, tmp_path):
    model, _ = released_vits14
    state_dict = dict(model.state_dict())
    del state_dict["norm.bias"]
    state_dict["head.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"missing keys: norm\.bias; unexpected keys: head\.weight"):
        dinov2_vits14(weights=path)


def test_a_checkpoint_of_another_architecture_is_refused(released_vits14):
    _, path = released_vits14
    with pytest.raises(CheckpointError, match=r"missing keys: register_tokens"):
        dinov2_vits14_reg(weights=path)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: pos_embed \(1, 1370, 384\) vs model \(1, 257, 384\).*518"
    ):
        dinov2_vits14(weights=path, img_size=224)


def test_corrupted_and_missing_files_are_refused(released_vits14, tmp_path):
    _, path = released_vits14
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*truncated\.pth: it is corrupted"):
        dinov2_vits14(weights=truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.safetensors: it is corrupted"):
        dinov2_vits14(weights=garbage)
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nowhere.pth"):
        dinov2_vits14(weights=tmp_path / "nowhere.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([1, 2], not_a_dict)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        dinov2_vits14(weights=not_a_dict)


def test_linear_classifier_concatenates_four_class_tokens_and_the_mean_patch_token(released_vits14, tmp_path):
    model, backbone_path = released_vits14
    torch.manual_seed(0)
    head = torch.nn.Linear(5 * 384, 1000)
    head_path = tmp_path / "dinov2_vits14_linear4_head.pth"
    torch.save(head.state_dict(), head_path)
    classifier = dinov2_vits14_lc(layers=4, weights=head_path, backbone_weights=backbone_path).eval()
    images = small_images()
    outputs = model.get_intermediate_layers(images, n=4, return_class_token=True)
    features = torch.cat([cls for _, cls in outputs] + [outputs[-1][0].mean(dim=1)], dim=1)
    torch.testing.assert_close(classifier(images), head(features))
    one_block = dinov2_vits14_lc(layers=1, pretrained=False)
    assert one_block.linear_head.in_features == 2 * 384
    with pytest.raises(CheckpointError, match="is not a linear head"):
        dinov2_vits14_lc(weights=backbone_path, backbone_weights=backbone_path)
    with pytest.raises(ValueError, match="layers must be 1 or 4"):
        dinov2_vits14_lc(layers=2, pretrained=False)


def test_torch_hub_loads_from_this_repository():
    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = [name for name in dir(hubconf) if name.startswith("dinov2_")]
    assert len(names) == 16
    assert {"dinov2_vits14", "dinov2_vitg14_reg", "dinov2_vitl14_reg_lc"} <= set(names)
    model = torch.hub.load(str(REPO_ROOT), "dinov2_vits14", source="local", pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    classifier = torch.hub.load(str(REPO_ROOT), "dinov2_vits14_reg_lc", source="local", layers=1, pretrained=False)
    assert classifier.backbone.num_register_tokens == 4


def test_safetensors_export_rebuilds_the_architecture(tiny_vit, photo_batch, tmp_path):
    model = tiny_vit(num_register_tokens=2, ffn_layer="swiglufused", interpolate_offset=0.0, interpolate_antialias=True)
    path = save_backbone(model, tmp_path / "backbone.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.safetensors"]  # no temporary file left
    reloaded = load_backbone(path).eval()
    assert reloaded.config == model.config
    torch.testing.assert_close(reloaded(photo_batch(24)), model(photo_batch(24)), rtol=0, atol=0)


def test_loading_a_foreign_safetensors_file_says_what_to_do(released_vits14, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no DINOv2 architecture metadata"):
        load_backbone(path)


@pytest.mark.parametrize(
    "hub_name, timm_overrides",
    [
        ("dinov2_vits14", {}),
        ("dinov2_vits14_reg", {}),
        # a narrow ViT-g: same code path as the 1.1B model (packed SwiGLU), 96 wide so it runs here
        ("dinov2_vitg14", {"embed_dim": 96, "depth": 2, "num_heads": 3}),
    ],
)
def test_timm_layout_gives_the_same_features_in_timm(hub_name, timm_overrides, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is a dev dependency")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    if timm_overrides:
        from dinov2.models import DinoVisionTransformer

        model = DinoVisionTransformer(
            img_size=56, patch_size=14, init_values=1.0, ffn_layer="swiglufused", **timm_overrides
        ).eval()
    else:
        model = create(hub_name, pretrained=False, img_size=56).eval()
    for parameter in model.parameters():  # non-trivial values everywhere, including gammas and tokens
        torch.nn.init.normal_(parameter, std=0.05)
    path = save_timm(model, tmp_path / "timm.safetensors")
    timm_model = timm.create_model(timm_model_name(model.config), **timm_model_kwargs(model.config))
    timm_model.load_state_dict(load_file(str(path)), strict=True)
    timm_model.eval()
    images = small_images(size=56)
    ours = model.forward_features(images)
    theirs = timm_model.forward_features(images)
    torch.testing.assert_close(theirs[:, 0], ours["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        theirs[:, 1 + model.num_register_tokens :], ours["x_norm_patchtokens"], atol=1e-5, rtol=1e-5
    )
    assert "mask_token" not in to_timm_state_dict(model.state_dict())
