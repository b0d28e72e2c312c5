"""`student.pretrained_weights` starts a distillation student (and so its EMA) from a backbone file; a pretraining
run starts from a backbone with `init.source` instead (tests/train/test_continued_pretraining.py)."""

import pytest
import torch

from dinov2.configuration import ConfigError
from dinov2.configuration.recipes import DistillRecipe, load_recipe
from dinov2.distill.meta_arch import DistillMetaArch
from dinov2.hub import save_backbone
from dinov2.hub.checkpoints import CheckpointError
from dinov2.train.ssl_meta_arch import SSLMetaArch, build_backbone


def tiny_teacher() -> torch.nn.ModuleDict:
    torch.manual_seed(2)
    return SSLMetaArch(load_recipe("cpu_tiny")).teacher


def test_a_student_starts_from_the_weights_it_names_and_its_ema_copies_it(tmp_path):
    recipe = load_recipe("distill_cpu_tiny", schema=DistillRecipe)
    torch.manual_seed(1)
    source = build_backbone(recipe, 0.0)  # the student's architecture: 3 blocks of width 48
    save_backbone(source, tmp_path / "backbone.safetensors")
    pretrained = load_recipe(
        "distill_cpu_tiny", [f"student.pretrained_weights={tmp_path / 'backbone.safetensors'}"], schema=DistillRecipe
    )
    torch.manual_seed(0)
    meta = DistillMetaArch(pretrained, tiny_teacher())
    for name, value in source.state_dict().items():
        assert torch.equal(meta.students["tiny"].backbone.state_dict()[name], value), name
        assert torch.equal(meta.student_emas["tiny"].backbone.state_dict()[name], value), name
    torch.manual_seed(0)
    fresh = DistillMetaArch(recipe, tiny_teacher())
    assert not torch.equal(fresh.students["tiny"].backbone.cls_token, source.cls_token)


def test_weights_of_another_architecture_are_refused_naming_the_mismatch(tmp_path):
    wider = load_recipe("cpu_tiny", ["student.embed_dim=96", "student.num_heads=3"])
    save_backbone(build_backbone(wider, 0.0), tmp_path / "wide.safetensors")
    recipe = load_recipe(
        "distill_cpu_tiny", [f"student.pretrained_weights={tmp_path / 'wide.safetensors'}"], schema=DistillRecipe
    )
    with pytest.raises(CheckpointError, match="shape mismatch"):
        DistillMetaArch(recipe, tiny_teacher())
    missing = load_recipe(
        "distill_cpu_tiny", [f"student.pretrained_weights={tmp_path / 'nowhere.safetensors'}"], schema=DistillRecipe
    )
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors does not exist"):
        DistillMetaArch(missing, tiny_teacher())


def test_a_pretraining_recipe_names_init_source_instead(tmp_path):
    with pytest.raises(ConfigError, match="to continue pretraining from a backbone set init.source"):
        load_recipe("cpu_tiny", [f"student.pretrained_weights={tmp_path / 'backbone.safetensors'}"])
