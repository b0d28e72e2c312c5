"""The `dinov2` command as a user runs it: a real process, real photos, real files."""

import json

import numpy as np
import pytest


@pytest.fixture
def photo_folder(tmp_path, photos):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for index, image in enumerate(photos[:3]):
        image.save(folder / ("sub" if index else ".") / f"photo{index}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_demo_embeds_real_photos_skips_a_corrupt_one_and_reloads_its_export(photo_folder, tmp_path, run_dinov2):
    out = tmp_path / "demo"
    result = run_dinov2("demo", "--images", str(photo_folder), "--out", str(out), "--crop-size", "56", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3
    assert summary["unreadable_images"] == 1
    assert summary["unreadable_paths"] == [str(photo_folder / "broken.jpg")]
    assert summary["parameters"] == 22_056_576
    assert summary["reload_max_abs_difference"] == 0.0
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (3, 384) and embeddings.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1.0, atol=1e-3)
    assert (out / "ids.txt").read_text().splitlines() == ["photo0.jpg", "sub/photo1.jpg", "sub/photo2.jpg"]
    similarity = np.loadtxt(out / "cosine_similarity.csv", delimiter=",")
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-3)
    assert {"backbone.safetensors", "backbone_timm.safetensors", "patch_pca.png"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".*partial"))


def test_demo_on_an_empty_folder_fails_before_any_work_and_writes_nothing(tmp_path, run_dinov2):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "demo"
    result = run_dinov2("demo", "--images", str(tmp_path / "empty"), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert "no image files" in result.stdout and str(tmp_path / "empty") in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


def test_demo_with_a_crop_size_that_is_not_a_multiple_of_the_patch(tmp_path, photo_folder, run_dinov2):
    result = run_dinov2(
        "demo", "--images", str(photo_folder), "--out", str(tmp_path / "o"), "--crop-size", "50", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "not a multiple of the patch size 14" in result.stdout


def test_models_lists_every_hub_entry_with_its_parameter_count(tmp_path, run_dinov2):
    result = run_dinov2("models", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dinov2_vitg14_reg_lc" in result.stdout
    assert "22,056,576" in result.stdout and "1,136,480,768" in result.stdout


def test_export_refuses_a_missing_checkpoint_with_one_line(tmp_path, run_dinov2):
    result = run_dinov2(
        "export", "--model", "dinov2_vits14", "--weights", str(tmp_path / "nope.pth"),
        "--out", str(tmp_path / "x.safetensors"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "checkpoint file not found" in result.stdout
    assert not (tmp_path / "x.safetensors").exists()


def test_export_help_lists_the_formats(cli):
    output = cli(["export", "--help"])
    for name in ("safetensors:", "timm:", "onnx:", "hf:"):
        assert name in output, output
    assert "--backbone" in output and "--dtype" in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "pdf", "--out", "m.pdf"],
         "unknown export format 'pdf'; expected one of safetensors, timm, onnx, hf"),
        (["--format", "onnx", "--out", "m.safetensors"],
         "--format onnx writes a .onnx file; m.safetensors should end in .onnx"),
        (["--format", "timm", "--out", "m.onnx"],
         "--format timm writes a .safetensors file; m.onnx should end in .safetensors"),
        (["--format", "hf", "--out", "m.onnx"],
         "--format hf writes a folder (config.json + model.safetensors); m.onnx looks like a file"),
        (["--dtype", "fp16", "--out", "m.safetensors"],
         "--dtype fp16 applies to --format onnx only"),
        (["--format", "onnx", "--out", "m.onnx", "--backbone", "nope.safetensors"],
         "backbone not found: nope.safetensors"),
        (["--out", "m.safetensors"],
         "give the backbone as --model NAME --weights W, or as --backbone PATH (not both)"),
    ],
    ids=["format", "onnx-suffix", "timm-suffix", "hf-file", "dtype", "missing-backbone", "no-source"],
)  # fmt: skip
def test_export_refuses_bad_options_in_one_line(cli, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    output = cli(["export", *args], 2)
    assert output.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_export_writes_the_timm_layout(tmp_path, monkeypatch, run_dinov2):
    import torch

    monkeypatch.setenv("DINOV2_TRACKING", "off")  # MLflow logging of exports is tested in tests/hub

    from dinov2.hub import dinov2_vits14_reg

    torch.save(dinov2_vits14_reg(pretrained=False).state_dict(), tmp_path / "w.pth")
    out = tmp_path / "timm.safetensors"
    result = run_dinov2(
        "export", "--model", "dinov2_vits14_reg", "--weights", str(tmp_path / "w.pth"), "--out", str(out),
        "--format", "timm", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["timm.model_name"] == "vit_small_patch14_reg4_dinov2"
        assert "reg_token" in handle.keys() and "mask_token" not in handle.keys()
