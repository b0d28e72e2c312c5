"""Hugging Face Transformers folders: our backbone out (strict load, same outputs) and back in."""

import json

import pytest
import torch

from dinov2.hub import load_backbone, save_backbone
from dinov2.hub.checkpoints import CheckpointError
from dinov2.hub.transformers import check_hf_parity, from_hf_state_dict, load_hf_model, save_hf

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")

REGISTERS = dict(num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True)
# no registers, SwiGLU, no qkv bias, the released 0.1 offset (which Transformers' resize does not have)
PLAIN_SWIGLU = dict(ffn_layer="swiglufused", qkv_bias=False)


def perturbed(model):
    """Random non-trivial weights: LayerScale, biases and norms away from their init, so that a swapped or
    dropped tensor changes the outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def images(batch, height, width):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    "options, hf_class", [(REGISTERS, "Dinov2WithRegistersModel"), (PLAIN_SWIGLU, "Dinov2Model")], ids=["reg", "plain"]
)
def test_export_loads_strictly_in_transformers_and_matches_our_forward(tiny_vit, tmp_path, options, hf_class):
    model = perturbed(tiny_vit(**options))
    folder = save_hf(model, tmp_path / "hf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]  # no staging folder left
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert {key: config[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio")} == {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 4,
    }  # fmt: skip
    assert (config["image_size"], config["patch_size"], config["layerscale_value"]) == (32, 4, 1e-5)
    assert config["use_swiglu_ffn"] is (options is PLAIN_SWIGLU)
    assert config["qkv_bias"] is (options is not PLAIN_SWIGLU)
    assert config.get("num_register_tokens", 0) == options.get("num_register_tokens", 0)

    hf_model = load_hf_model(folder)  # raises on any missing, unexpected or misshaped weight
    assert type(hf_model).__name__ == hf_class
    with torch.no_grad():
        for batch, height, width in [(2, 32, 32), (1, 40, 48)]:
            x = images(batch, height, width)
            ours = model.forward_features(x)
            output = hf_model(pixel_values=x)
            tokens = model.norm(ours["x_prenorm"])
            assert output.last_hidden_state.shape == tokens.shape
            difference = (output.last_hidden_state - tokens).abs().max().item()
            pooled = (output.pooler_output - ours["x_norm_clstoken"]).abs().max().item()
            if height == 32 or options is REGISTERS:
                assert difference < 1e-5 and pooled < 1e-5, (height, difference, pooled)
            else:
                # Transformers' Dinov2Model resizes to the 10x12 grid without the 0.1 offset: documented, not hidden
                assert difference > 1e-3, difference


def test_check_hf_parity_reports_train_and_resized_figures(tiny_vit, tmp_path):
    model = perturbed(tiny_vit(**REGISTERS))
    figures = check_hf_parity(model, save_hf(model, tmp_path / "hf"))
    assert set(figures) == {
        "last_hidden_state_train", "pooler_output_train", "last_hidden_state_resized", "pooler_output_resized",
    }  # fmt: skip
    assert max(figures.values()) < 1e-5, figures


@pytest.mark.parametrize("options", [REGISTERS, PLAIN_SWIGLU, dict(ffn_layer="swiglu")], ids=["reg", "plain", "swiglu"])
def test_importing_our_export_gives_back_the_same_model(tiny_vit, tmp_path, options):
    model = perturbed(tiny_vit(**options))
    reloaded = load_backbone(save_hf(model, tmp_path / "hf")).eval()
    assert reloaded.config == model.config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        for x in (images(2, 32, 32), images(1, 40, 48)):
            torch.testing.assert_close(
                reloaded.forward_features(x)["x_prenorm"], model.forward_features(x)["x_prenorm"]
            )


@pytest.mark.parametrize("registers", [0, 4])
def test_a_folder_written_by_transformers_is_a_backbone_with_its_outputs(tmp_path, registers):
    if registers:
        config = transformers.Dinov2WithRegistersConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4,
            num_register_tokens=registers,
        )  # fmt: skip
        hf_model = transformers.Dinov2WithRegistersModel(config)
    else:
        config = transformers.Dinov2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4,
            use_swiglu_ffn=True, layerscale_value=0.5,
        )  # fmt: skip
        hf_model = transformers.Dinov2Model(config)
    torch.manual_seed(0)
    perturbed(hf_model).eval().save_pretrained(tmp_path / "hf")
    ours = load_backbone(tmp_path / "hf").eval()
    assert (ours.embed_dim, ours.n_blocks, ours.num_register_tokens) == (64, 2, registers)
    assert ours.config["ffn_layer"] == ("mlp" if registers else "swiglufused")
    with torch.no_grad():
        # training grid and a resized one: with Transformers' own resize settings both are exact
        for x in (images(2, 32, 32), images(1, 40, 48)):
            expected = hf_model(pixel_values=x).last_hidden_state
            got = ours.norm(ours.forward_features(x)["x_prenorm"])
            assert (got - expected).abs().max().item() < 1e-5


def test_transformers_in_memory_names_convert_too(tmp_path):
    """Transformers 5 names its modules q_proj / gate_proj / up_proj in memory (it writes the published
    layout); a state dict taken from a live model converts as well."""
    config = transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=4, use_swiglu_ffn=True
    )
    hf_model = transformers.Dinov2Model(config).eval()
    converted = from_hf_state_dict(hf_model.state_dict())
    assert converted["blocks.0.mlp.w12.weight"].shape == (2 * 176, 64)  # SwiGLU hidden: (256 * 2/3 + 7) // 8 * 8
    assert converted["blocks.0.attn.qkv.weight"].shape == (3 * 64, 64)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(init_values=None), "init_values=None"),
        (dict(proj_bias=False), "proj_bias=False"),
        (dict(ffn_bias=False), "ffn_bias=False"),
        (dict(mlp_ratio=2.5), "mlp_ratio=2.5"),
    ],
)
def test_architectures_transformers_cannot_hold_are_refused_by_field(tiny_vit, tmp_path, options, field):
    with pytest.raises(ValueError, match=field):
        save_hf(tiny_vit(**options), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, field",
    [({"layer_norm_eps": 1e-5}, "layer_norm_eps=1e-05"), ({"hidden_act": "relu"}, "hidden_act='relu'"),
     ({"model_type": "vit"}, "model_type='vit'"), ({"image_size": [32, 48]}, "image_size=\\[32, 48\\]")],
)  # fmt: skip
def test_folders_our_backbone_cannot_hold_are_refused_by_field(tiny_vit, tmp_path, change, field):
    folder = save_hf(tiny_vit(), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=field):
        load_backbone(folder)


def test_a_folder_without_safetensors_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="has no model.safetensors: only safetensors weights are read"):
        load_backbone(tmp_path)


def test_cli_exports_an_hf_folder_and_an_hf_folder_is_a_backbone_source(cli, monkeypatch, tiny_vit, tmp_path):
    monkeypatch.setenv("DINOV2_TRACKING", "off")
    model = perturbed(tiny_vit(**REGISTERS))
    source = save_backbone(model, tmp_path / "backbone.safetensors")
    output = cli(["export", "--format", "hf", "--backbone", str(source), "--out", str(tmp_path / "hf")])
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in output.splitlines() if line.count("│") == 4
    }
    assert set(rows) == {
        "last_hidden_state_train",
        "pooler_output_train",
        "last_hidden_state_resized",
        "pooler_output_resized",
    }
    assert all(float(value) < 1e-5 for value in rows.values()), rows
    # back: the folder as --backbone, written in our own safetensors layout
    cli(["export", "--backbone", str(tmp_path / "hf"), "--out", str(tmp_path / "again.safetensors")])
    again = load_backbone(tmp_path / "again.safetensors").eval()
    x = images(2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_cli_refuses_what_transformers_cannot_hold_in_one_line(cli, monkeypatch, tiny_vit, tmp_path):
    monkeypatch.chdir(tmp_path)  # were a tracking run opened, it would land here, and the check below sees it
    source = save_backbone(tiny_vit(init_values=None), tmp_path / "backbone.safetensors")
    output = cli(["export", "--format", "hf", "--backbone", str(source), "--out", str(tmp_path / "hf")], 2)
    assert (
        output.strip() == "error: init_values=None (no LayerScale): Transformers' DINOv2 blocks always have LayerScale"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backbone.safetensors"]  # no export, no run


def test_cli_export_is_logged_to_mlflow(cli, mlflow_uri, tiny_vit, tmp_path):
    from mlflow import MlflowClient

    source = save_backbone(perturbed(tiny_vit(**REGISTERS)), tmp_path / "backbone.safetensors")
    cli(["export", "--format", "hf", "--backbone", str(source), "--out", str(tmp_path / "hf")])
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("dinov2/export")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="params.format = 'hf'", max_results=1)
    assert run.data.params["export/path"] == str((tmp_path / "hf").resolve())
    assert run.data.metrics["export/parity_last_hidden_state_train"] < 1e-5
    assert {"export/parity_pooler_output_train", "export/parity_last_hidden_state_resized"} <= set(run.data.metrics)
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id, "export/hf")]
    assert sorted(artifacts) == ["export/hf/config.json", "export/hf/model.safetensors"]


def test_an_hf_folder_is_a_distillation_teacher_an_evaluated_backbone_and_a_student_initialisation(tiny_vit, tmp_path):
    from dinov2.distill.teacher import inspect_teacher, load_teacher
    from dinov2.eval.suite import load_evaluated_backbone
    from dinov2.train.ssl_meta_arch import load_pretrained

    model = perturbed(tiny_vit(**REGISTERS))
    folder = save_hf(model, tmp_path / "hf")
    x = images(2, 32, 32)
    spec = inspect_teacher(str(folder))
    assert spec.heads_file is None and spec.config["num_register_tokens"] == REGISTERS["num_register_tokens"]
    teacher = load_teacher(spec)
    assert list(teacher) == ["backbone"]  # headless: distillation fits the heads first
    evaluated = load_evaluated_backbone(str(folder)).model
    student = type(model)(**spec.config)
    load_pretrained(student, str(folder))
    with torch.no_grad():
        expected = model.eval()(x)
        for backbone in (teacher["backbone"], evaluated, student):
            torch.testing.assert_close(backbone.eval()(x), expected, rtol=0, atol=0)
