"""What a distillation recipe costs before it runs: teacher and students sized on the meta device.

Per image and step: the teacher's forward over the 2 global crops and its heads (CLS of both crops,
every patch token), each student's forward and backward (x3) over all crops with its heads on every
CLS and every global patch token. Memory per GPU: each student as in pretraining (fp32 weights,
gradients, AdamW moments, partitioned per ZeRO stage) plus its EMA (partitioned under ZeRO-3), and
the teacher whole on every GPU (fp32, outside DeepSpeed), plus the students' activations.
"""

import torch

from dinov2.configuration.recipes import DistillRecipe
from dinov2.distill.meta_arch import DistillMetaArch
from dinov2.distill.teacher import HEAD_NAMES, TeacherSpec, inspect_teacher
from dinov2.models import DinoVisionTransformer
from dinov2.train.dry_run import (
    GPU_COUNTS,
    Budget,
    activation_bytes,
    backbone_forward_flops,
    compute_summary,
    count,
    head_flops,
    memory_table,
)
from dinov2.train.engine import deepspeed_config
from dinov2.train.ssl_meta_arch import build_heads


def _meta_teacher(recipe: DistillRecipe, spec: TeacherSpec) -> torch.nn.ModuleDict:
    """The teacher on the meta device: its own heads' shapes, or the heads head fitting would train."""
    backbone = DinoVisionTransformer(**spec.config)
    if spec.has_heads:
        heads = {name: spec.heads[name].build() for name in HEAD_NAMES if name in spec.heads}
    else:
        heads = build_heads(recipe, backbone.embed_dim)
    return torch.nn.ModuleDict({"backbone": backbone, **heads})


def distill_dry_run_report(recipe: DistillRecipe, gpus: tuple[int, ...] = GPU_COUNTS, assumed_mfu: float = 0.4):
    spec = inspect_teacher(recipe.distillation.teacher, recipe.distillation.teacher_weights)
    crops = recipe.crops
    with torch.device("meta"):
        teacher = _meta_teacher(recipe, spec)
        meta = DistillMetaArch(recipe, teacher)
    global_patches = 2 * (crops.global_crops_size // spec.config["patch_size"]) ** 2
    ibot = meta.ibot_head_name
    flops = 2 * backbone_forward_flops(spec.config, crops.global_crops_size)
    flops += 2 * head_flops(teacher["dino_head"]) + global_patches * head_flops(teacher[ibot])
    students, activations = {}, 0.0
    for name, student in meta.students.items():
        config = student.backbone.config
        forward = 2 * backbone_forward_flops(config, crops.global_crops_size)
        forward += crops.local_crops_number * backbone_forward_flops(config, crops.local_crops_size)
        forward += (2 + crops.local_crops_number) * head_flops(student["dino_head"])
        forward += global_patches * head_flops(student[ibot])
        flops += 3 * forward
        activations += activation_bytes(config, crops)
        students[name] = {"parameters": count(student), "backbone_parameters": count(student.backbone)}
    result = Budget(
        student_parameters=count(meta.students),
        teacher_parameters=count(meta.student_emas),
        backbone_parameters=sum(s["backbone_parameters"] for s in students.values()),
        flops_per_image=flops,
        activation_bytes_per_image=activations,
        replicated_parameters=count(teacher),
    )
    table = memory_table(result, recipe.train.batch_size, gpus)
    return {
        "recipe": recipe.name,
        "teacher": spec.source,
        "teacher_parameters": count(teacher),
        "teacher_heads": "from the teacher" if spec.has_heads else "fitted first (distillation.head_fitting)",
        "students": students,
        **compute_summary(result, recipe, assumed_mfu),
        "memory_per_gpu": table,
        "deepspeed_config": deepspeed_config(recipe, max(table) if table else 1),
    }
