"""ONNX export: one graph for every batch size and image size, checked in ONNX Runtime against our forward."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2.hub.onnx import (
    TOLERANCE,
    bicubic_resize_weights,
    check_onnx_parity,
    export_onnx,
)
from dinov2.models import DinoVisionTransformer

pytest.importorskip("onnxruntime", reason="onnx, onnxruntime and onnxscript are dev dependencies")

# width 64, 2 blocks, patch 4, trained at 32 px: an 8x8 position grid
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=1e-5)
MODELS = {
    # register model as released: resize to the new grid with antialias, no offset
    "registers": dict(num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True),
    # no registers, SwiGLU, the released 0.1 offset: the resize the exporter cannot trace by itself
    "plain_swiglu": dict(ffn_layer="swiglufused"),
}


def build(name: str) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = DinoVisionTransformer(**TINY, **MODELS[name]).eval()
    with torch.no_grad():
        # a position embedding of std 1 (not 0.02) so that a wrong resize shows far above the tolerance
        model.pos_embed.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, path of its fp32 ONNX export); each model is exported once for the module."""
    folder = tmp_path_factory.mktemp("onnx")
    result = {}
    for name in MODELS:
        model = build(name)
        result[name] = (model, export_onnx(model, folder / f"{name}.onnx"))
    return result


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_matches_our_forward_at_two_resolutions_and_two_batch_sizes(exported, name):
    model, path = exported[name]
    generator = torch.Generator().manual_seed(1)
    # 32x32 is the training grid (8x8); 40x48 is a 10x12 grid where the position embedding is resized
    for batch, height, width in [(1, 32, 32), (3, 32, 32), (1, 40, 48), (3, 40, 48)]:
        images = torch.randn(batch, 3, height, width, generator=generator)
        parity = check_onnx_parity(model, path, [images])
        assert set(parity) == ({"cls_token", "patch_tokens"} | ({"register_tokens"} if name == "registers" else set()))
        assert max(parity.values()) < 1e-4, (batch, height, width, parity)


def test_onnx_outputs_have_the_documented_shapes(exported):
    import onnxruntime

    _, path = exported["registers"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.zeros((3, 3, 40, 48), dtype=np.float32)
    cls_token, patch_tokens, register_tokens = session.run(None, {"images": images})
    assert cls_token.shape == (3, 64)
    assert patch_tokens.shape == (3, 10 * 12, 64)
    assert register_tokens.shape == (3, 2, 64)
    assert [output.name for output in session.get_outputs()] == ["cls_token", "patch_tokens", "register_tokens"]


def test_the_graph_declares_batch_height_and_width_dynamic(exported):
    import onnx

    _, path = exported["plain_swiglu"]
    proto = onnx.load(str(path))
    graph = proto.graph
    (images,) = graph.input
    dims = images.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3  # channels fixed
    assert all(dims[axis].dim_param for axis in (0, 2, 3)), [str(dim) for dim in dims]
    assert [output.name for output in graph.output] == ["cls_token", "patch_tokens"]
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    assert (metadata["dinov2.patch_size"], metadata["dinov2.img_size"], metadata["dinov2.dtype"]) == ("4", "32", "fp32")


def test_resize_weights_reproduce_f_interpolate_in_the_three_modes_the_backbone_uses():
    """The exported graph resizes the position embedding with these weights instead of F.interpolate (whose
    scale factor an export bakes in): scale factor with the 0.1 offset, target size, target size with
    antialias. Grids from 3 to 37 positions, up- and downsampling, square and not."""
    generator = torch.Generator().manual_seed(0)
    learned = torch.randn(1, 16, 8, 8, generator=generator)
    worst = {}
    for height, width in [(8, 8), (4, 5), (10, 12), (16, 9), (37, 3)]:
        cases = {
            "offset": (dict(scale_factor=((height + 0.1) / 8, (width + 0.1) / 8)), 0.1, False),
            "size": (dict(size=(height, width)), 0.0, False),
            "antialias": (dict(size=(height, width), antialias=True), 0.0, True),
        }
        for mode, (kwargs, offset, antialias) in cases.items():
            expected = F.interpolate(learned, mode="bicubic", **kwargs)[0]
            rows = bicubic_resize_weights(height, torch.tensor(height + offset), 8, antialias)
            cols = bicubic_resize_weights(width, torch.tensor(width + offset), 8, antialias)
            got = rows @ learned[0] @ cols.T
            worst[mode] = max(worst.get(mode, 0.0), (got - expected).abs().max().item())
    assert max(worst.values()) < 1e-5, worst


def test_resize_weights_at_the_training_grid_are_the_identity():
    weights = bicubic_resize_weights(8, torch.tensor(8.0), 8, antialias=False)
    torch.testing.assert_close(weights, torch.eye(8), rtol=0, atol=0)
    weights = bicubic_resize_weights(8, torch.tensor(8.0), 8, antialias=True)
    torch.testing.assert_close(weights, torch.eye(8), rtol=0, atol=0)


def test_export_refuses_a_wrong_suffix_and_dtype(tmp_path):
    model = DinoVisionTransformer(**TINY)
    with pytest.raises(ValueError, match=r"should end in \.onnx"):
        export_onnx(model, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unknown ONNX dtype 'int8'"):
        export_onnx(model, tmp_path / "model.onnx", dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_are_one_line_with_what_to_install(monkeypatch, cli, tmp_path):
    from dinov2.hub import save_backbone

    source = save_backbone(DinoVisionTransformer(**TINY), tmp_path / "backbone.safetensors")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    output = cli(["export", "--format", "onnx", "--backbone", str(source), "--out", str(tmp_path / "m.onnx")], 2)
    assert output.strip() == "error: ONNX export needs onnxruntime: pip install onnxruntime (or '.[dev]')"
    assert not (tmp_path / "m.onnx").exists()


def test_cli_exports_fp16_onnx_that_runs_on_the_cpu_and_prints_the_parity_per_output(cli, monkeypatch, tmp_path):
    from dinov2.hub import save_backbone

    monkeypatch.setenv("DINOV2_TRACKING", "off")
    source = save_backbone(build("registers"), tmp_path / "backbone.safetensors")
    out = tmp_path / "exports" / "backbone.onnx"
    output = cli(["export", "--format", "onnx", "--dtype", "fp16", "--backbone", str(source), "--out", str(out)])
    assert out.is_file()
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in output.splitlines() if line.count("│") == 4
    }
    assert set(rows) == {"cls_token", "patch_tokens", "register_tokens"}
    # measured about 3e-3 against the fp32 forward: fp16 keeps about 3 significant digits
    assert all(1e-5 < float(value) < TOLERANCE["fp16"] for value in rows.values()), rows
    assert f"wrote {out} (onnx)" in output
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"  # an fp16 graph, run by ONNX Runtime's CPU provider


def test_cli_removes_an_export_that_fails_parity_and_exits_2(cli, monkeypatch, tmp_path):
    """The parity check is replaced by one that reports a 0.5 difference: the command must refuse the export."""
    from dinov2.hub import onnx as onnx_export
    from dinov2.hub import save_backbone

    monkeypatch.setenv("DINOV2_TRACKING", "off")
    source = save_backbone(DinoVisionTransformer(**TINY), tmp_path / "backbone.safetensors")
    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, path, dtype: path.write_bytes(b"graph"))
    monkeypatch.setattr(onnx_export, "check_onnx_parity", lambda model, path: {"cls_token": 0.5, "patch_tokens": 0.0})
    out = tmp_path / "model.onnx"
    output = cli(["export", "--format", "onnx", "--backbone", str(source), "--out", str(out)], 2)
    assert output.strip() == (
        f"error: onnx export of {out} failed its parity check: max abs difference 0.5 on cls_token > tolerance "
        "0.0001; the export was removed"
    )
    assert not out.exists()
