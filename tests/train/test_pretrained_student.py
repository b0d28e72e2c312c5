"""`student.pretrained_weights` initialises the student (and so the teacher) from a backbone file."""

import pytest
import torch

from dinov2.configuration.recipes import load_recipe
from dinov2.hub import save_backbone
from dinov2.hub.checkpoints import CheckpointError
from dinov2.train.ssl_meta_arch import SSLMetaArch, build_backbone


def test_a_student_starts_from_the_weights_it_names_and_the_teacher_copies_it(tmp_path):
    recipe = load_recipe("cpu_tiny")
    torch.manual_seed(1)
    source = build_backbone(recipe, 0.0)
    save_backbone(source, tmp_path / "backbone.safetensors")
    pretrained = load_recipe("cpu_tiny", [f"student.pretrained_weights={tmp_path / 'backbone.safetensors'}"])
    torch.manual_seed(0)
    meta = SSLMetaArch(pretrained)
    for name, value in source.state_dict().items():
        assert torch.equal(meta.student.backbone.state_dict()[name], value), name
        assert torch.equal(meta.teacher.backbone.state_dict()[name], value), name
    torch.manual_seed(0)
    fresh = SSLMetaArch(recipe)
    assert not torch.equal(fresh.student.backbone.cls_token, source.cls_token)


def test_weights_of_another_architecture_are_refused_naming_the_mismatch(tmp_path):
    wider = load_recipe("cpu_tiny", ["student.embed_dim=96", "student.num_heads=3"])
    save_backbone(build_backbone(wider, 0.0), tmp_path / "wide.safetensors")
    recipe = load_recipe("cpu_tiny", [f"student.pretrained_weights={tmp_path / 'wide.safetensors'}"])
    with pytest.raises(CheckpointError, match="shape mismatch"):
        SSLMetaArch(recipe)
    missing = load_recipe("cpu_tiny", [f"student.pretrained_weights={tmp_path / 'nowhere.safetensors'}"])
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors does not exist"):
        SSLMetaArch(missing)
