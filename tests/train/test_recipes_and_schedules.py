"""Recipes validate before any work; schedules and param groups follow the reference's rules."""

import math

import pytest
import torch

from dinov2.configuration import ConfigError
from dinov2.configuration.recipes import load_recipe
from dinov2.train.dry_run import Budget, budget, dry_run_report
from dinov2.train.param_groups import apply_schedules, layer_id, param_groups
from dinov2.train.schedules import CosineScheduler, build_schedules, scaled_lr
from dinov2.train.ssl_meta_arch import SSLMetaArch


@pytest.mark.parametrize("name", ["default", "vits14", "vitb14", "vitl14", "vitg14", "cpu_tiny"])
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name


def test_the_vitg14_recipe_has_the_paper_numbers():
    recipe = load_recipe("vitg14")
    assert (recipe.student.arch, recipe.student.patch_size, recipe.student.ffn_layer) == (
        "vit_giant2",
        14,
        "swiglufused",
    )
    assert recipe.train.batch_size == 3072 and recipe.total_iterations == 625_000
    assert recipe.train.centering == "sinkhorn_knopp" and recipe.ibot.separate_head
    assert recipe.dino.head_n_prototypes == recipe.ibot.head_n_prototypes == 131072
    assert recipe.dino.head_bottleneck_dim == 384 and recipe.student.drop_path_rate == 0.4
    assert (recipe.optim.base_lr, recipe.optim.warmup_epochs, recipe.optim.weight_decay_end) == (2e-4, 80, 0.2)
    assert (recipe.optim.layerwise_decay, recipe.teacher.momentum_teacher, recipe.crops.local_crops_size) == (
        1.0,
        0.994,
        98,
    )


def test_unknown_and_inconsistent_keys_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optim.base_lrr'"):
        load_recipe("cpu_tiny", ["optim.base_lrr=0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("crops:\n  global_crops_size: 30\n")
    with pytest.raises(ConfigError, match="global_crops_size 30 is not a multiple of student.patch_size 16"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="unknown recipe 'vitz14'"):
        load_recipe("vitz14")
    with pytest.raises(ConfigError, match="'train.centering': Input should be 'centering' or 'sinkhorn_knopp'"):
        load_recipe("cpu_tiny", ["train.centering=sinkhorn"])


def test_cosine_schedule_by_hand():
    schedule = CosineScheduler(base_value=1.0, final_value=0.0, total_iters=6, warmup_iters=2, freeze_iters=1)
    # frozen 1, warmup 2 (0, 0.5), cosine over 3: 1, 0.75, 0.25; then the final value
    expected = [0.0, 0.0, 0.5, 1.0, 0.75, 0.25]
    assert [round(schedule[i], 6) for i in range(6)] == expected
    assert schedule[100] == 0.0


def test_recipe_schedules_follow_the_default_numbers():
    recipe = load_recipe("default")
    schedules = build_schedules(recipe)
    per_epoch = 1250
    assert scaled_lr(recipe) == pytest.approx(4e-3)  # batch 1024: sqrt(1) scaling
    assert schedules.lr[0] == 0.0 and schedules.lr[10 * per_epoch] == pytest.approx(4e-3)
    assert schedules.lr[recipe.total_iterations - 1] == pytest.approx(1e-6, abs=1e-8)
    assert schedules.last_layer_lr[per_epoch - 1] == 0.0 and schedules.last_layer_lr[per_epoch] > 0
    assert schedules.teacher_temp[0] == pytest.approx(0.04) and schedules.teacher_temp[30 * per_epoch] == pytest.approx(
        0.07
    )
    assert schedules.teacher_temp[15 * per_epoch] == pytest.approx(0.055)
    assert schedules.momentum[0] == pytest.approx(0.992) and schedules.momentum[10**9] == 1.0
    assert schedules.weight_decay[0] == pytest.approx(0.04)
    assert schedules.weight_decay[recipe.total_iterations // 2] == pytest.approx(0.22, abs=1e-4)
    assert scaled_lr(load_recipe("vitg14")) == pytest.approx(2e-4 * math.sqrt(3))


def test_param_groups_apply_layer_decay_patch_embed_multiplier_and_no_decay_rules():
    recipe = load_recipe("cpu_tiny", ["optim.layerwise_decay=0.5", "ibot.separate_head=true"])
    meta = SSLMetaArch(recipe)
    groups = param_groups(meta.student, 4, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {name: group for group in groups for name in group["member_names"]}
    assert len(by_name) == sum(1 for p in meta.student.parameters())
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5**5 * 0.2)
    assert by_name["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.5**5)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5**4)
    assert by_name["backbone.blocks.3.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    assert by_name["backbone.blocks.0.attn.qkv.bias"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.0.ls1.gamma"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.0.norm1.weight"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["ibot_head.last_layer.weight_v"]["is_last_layer"]
    assert not by_name["dino_head.mlp.0.weight"]["is_last_layer"]
    assert layer_id("backbone.register_tokens", 4) == 0
    apply_schedules(groups, lr=1.0, last_layer_lr=0.0, wd=0.1)
    assert by_name["ibot_head.last_layer.weight_g"]["lr"] == 0.0
    assert by_name["backbone.blocks.3.mlp.fc1.weight"]["lr"] == 0.5
    assert by_name["backbone.blocks.3.mlp.fc1.weight"]["weight_decay"] == 0.1


def test_student_and_teacher_start_equal_and_the_teacher_is_frozen():
    meta = SSLMetaArch(load_recipe("cpu_tiny"))
    for (name, student), teacher in zip(
        meta.student.state_dict().items(), meta.teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(student, teacher), name
    assert not any(p.requires_grad for p in meta.teacher.parameters())
    assert meta.teacher.backbone.blocks[-1].drop_path_rate == 0.0
    assert meta.student.backbone.blocks[-1].drop_path_rate == 0.1


def test_dry_run_sizes_vitg14_on_the_meta_device():
    recipe = load_recipe("vitg14")
    result = budget(recipe)

    def head(bottleneck: int) -> int:  # 1536 -> 2048 -> 2048 -> bottleneck -> 131072 prototypes (+ gains)
        return 1536 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * bottleneck + bottleneck + bottleneck * 131072 + 131072

    # ViT-g/14 at 224 (257 position embeddings), DINO head with a 384 bottleneck, iBOT head with 256
    assert result.backbone_parameters == 1_136_480_768 - (1370 - 257) * 1536
    assert result.student_parameters == result.backbone_parameters + head(384) + head(256)
    assert result.teacher_parameters == result.student_parameters
    report = dry_run_report(recipe)
    assert 6000 < report["training_gflops_per_image"] < 9000  # ~6 x 1.1e9 params x 914 tokens
    memory = report["memory_per_gpu"][256]
    assert memory["images_per_gpu"] == 12
    assert memory["zero3_gib"] < memory["zero2_gib"] < memory["zero1_gib"] < memory["zero0_gib"]
    assert report["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 12
    # the largest parameter an export gathers under ZeRO-3: the DINO head's prototypes, 131072 x 384 in fp32
    assert result.largest_exported_parameter == 131072 * 384
    assert report["zero3_export_gathers_gib"] == round(4 * 131072 * 384 / 2**30, 3)


def test_memory_per_gpu_counts_what_a_zero3_export_gathers_between_steps():
    # 100 trained and 100 EMA parameters, 10 bytes of activations per image, a 50-element largest parameter
    result = Budget(student_parameters=100, teacher_parameters=100, backbone_parameters=80, flops_per_image=0.0,
                    activation_bytes_per_image=10.0, largest_exported_parameter=50)  # fmt: skip
    # ZeRO-2 on 2 GPUs: weights 400 + gradients 400 / 2 + moments 800 / 2 + teacher 400 + activations 10
    assert result.memory_gib(2, gpus=2, images_per_gpu=1) * 2**30 == 1410
    # ZeRO-3: everything halved (1000 bytes); the export's 200-byte gather outweighs 10 bytes of activations
    assert result.memory_gib(3, gpus=2, images_per_gpu=1) * 2**30 == 1200
    assert result.memory_gib(3, gpus=2, images_per_gpu=30) * 2**30 == 1300


def test_the_step_benchmark_runs_on_a_tiny_configuration():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain" / "bench_step.py"
    command = [
        sys.executable,
        str(script),
        "--recipe",
        "cpu_tiny",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["recipe"] == "cpu_tiny" and figures["batch_size"] == 4
    assert figures["images_per_second"] > 0 and figures["achieved_tflops"] > 0
    assert figures["mfu"] is None  # no peak is known for a CPU


def test_every_recipe_key_is_read_by_the_code():
    # A key that validates but that no code reads is a setting that silently does nothing.
    import ast
    from pathlib import Path

    from dinov2.configuration.recipes import Recipe

    package = Path(__file__).resolve().parents[2] / "dinov2"
    read = set()
    for source in package.rglob("*.py"):
        if source.name != "config.py":
            tree = ast.parse(source.read_text())
            read.update(node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute))
    unread = [
        f"{section}.{key}"
        for section, field in Recipe.model_fields.items()
        if hasattr(field.annotation, "model_fields")
        for key in field.annotation.model_fields
        if key not in read
    ]
    assert unread == []


def test_recomputed_blocks_keep_their_inputs_and_one_block_of_activations():
    from dinov2.train.dry_run import activation_bytes

    recipe = load_recipe("cpu_tiny")  # width 64, 4 blocks, patch 4; 2 crops of 32 px and 4 of 16 px
    config = SSLMetaArch(recipe).student.backbone.config
    tokens = 2 * (8 * 8 + 1) + 4 * (4 * 4 + 1)  # 198
    assert activation_bytes(config, recipe.crops) == 34 * tokens * 64 * 4  # 1,723,392
    assert activation_bytes(config, recipe.crops, recomputed=True) == 4 * tokens * 64 * 4 + 34 * tokens * 64  # 633,600
    recomputing = load_recipe("cpu_tiny", ["train.activation_checkpointing=true"])
    assert budget(recomputing).activation_bytes_per_image == 633_600


def test_a_recipe_builds_on_its_base_and_a_loop_of_bases_is_named(tmp_path):
    (tmp_path / "small.yaml").write_text("base: cpu_tiny\nstudent:\n  depth: 2\n")
    small = load_recipe(tmp_path / "small.yaml")
    tiny = load_recipe("cpu_tiny")
    assert small.name == "small" and small.student.depth == 2
    assert small.model_dump(exclude={"name", "student"}) == tiny.model_dump(exclude={"name", "student"})
    assert small.student.embed_dim == tiny.student.embed_dim == 64
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="builds on itself: a -> b -> a"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: vitz14\n")
    with pytest.raises(ConfigError, match="unknown recipe 'vitz14'"):
        load_recipe(tmp_path / "orphan.yaml")
