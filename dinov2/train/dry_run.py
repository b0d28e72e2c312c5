"""What a recipe costs before it runs: parameters, FLOPs per image, memory per GPU per ZeRO stage.

The model is built on the meta device (no memory), so ViT-g/14 is sized in a second on a laptop.
FLOPs are analytic (2 per multiply-add) for one training step of one image: the student's forward
and backward (x3) over 2 global + n local crops, the teacher's forward over the 2 global crops, and
the heads. Memory assumes what the engine does: fp32 master weights, bf16 autocast, AdamW (two fp32
moments), the teacher in fp32 (partitioned under ZeRO-3), and activations estimated at 34 bytes x
tokens x width per block (flash attention: no tokens^2 term), or, with
``train.activation_checkpointing``, each block's fp32 input plus one block recomputed at a time; the
activation figure is an estimate, the rest is exact bookkeeping. Exports and checkpoints run between
steps, when the activations are freed; under ZeRO-3 they gather the teacher one parameter at a time,
so the largest teacher parameter (fp32) is counted when it exceeds the activations.
"""

from dataclasses import dataclass

import torch

from dinov2.configuration.recipes import Recipe
from dinov2.layers.mlp import swiglu_hidden_dim
from dinov2.train.engine import deepspeed_config
from dinov2.train.ssl_meta_arch import SSLMetaArch

GPU_COUNTS = (1, 8, 16, 32, 64, 96, 128, 256)
_ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34
A100_BF16_PEAK = 312e12


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_forward_flops(config: dict, image_size: int) -> float:
    """Forward FLOPs of one image through a backbone described by its ``config`` (DinoVisionTransformer's)."""
    width, depth, patch = config["embed_dim"], config["depth"], config["patch_size"]
    tokens = (image_size // patch) ** 2 + 1 + config["num_register_tokens"]
    hidden = int(config["mlp_ratio"] * width)
    if config["ffn_layer"] in ("swiglu", "swiglufused"):
        ffn_macs = tokens * width * 3 * swiglu_hidden_dim(hidden)
    else:
        ffn_macs = tokens * width * 2 * hidden
    attention_macs = 4 * tokens * width * width + 2 * tokens * tokens * width
    patch_macs = (tokens - 1) * 3 * patch**2 * width
    return 2.0 * (depth * (attention_macs + ffn_macs) + patch_macs)


def activation_bytes(config: dict, crops, recomputed: bool = False) -> float:
    """Activations kept for the backward of one image's crops (2 global + the locals). With
    ``recomputed`` blocks (activation checkpointing) each block keeps only its fp32 input, and one
    block's activations exist at a time while it is recomputed."""
    patch = config["patch_size"]
    tokens = 2 * ((crops.global_crops_size // patch) ** 2 + 1)
    tokens += crops.local_crops_number * ((crops.local_crops_size // patch) ** 2 + 1)
    per_block = _ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * config["embed_dim"]
    if recomputed:
        return 4 * tokens * config["embed_dim"] * config["depth"] + per_block
    return per_block * config["depth"]


def head_flops(head: torch.nn.Module) -> float:
    return 2.0 * sum(p.numel() for name, p in head.named_parameters() if p.ndim == 2)


@dataclass
class Budget:
    student_parameters: int
    teacher_parameters: int
    backbone_parameters: int
    flops_per_image: float
    activation_bytes_per_image: float
    replicated_parameters: int = 0  # frozen weights outside DeepSpeed (a distillation teacher): whole on every GPU
    largest_exported_parameter: int = 0  # gathered whole on every GPU by exports under ZeRO-3

    def memory_gib(self, zero_stage: int, gpus: int, images_per_gpu: int) -> float:
        """``student_parameters`` are trained (fp32 weights, gradients, two AdamW moments); the
        ``teacher_parameters`` are EMAs inside the DeepSpeed module (fp32, partitioned under ZeRO-3),
        whose exports gather ``largest_exported_parameter`` whole between steps under ZeRO-3."""
        student, teacher = self.student_parameters, self.teacher_parameters
        weights, gradients, moments = 4 * student, 4 * student, 8 * student
        if zero_stage >= 1:
            moments /= gpus
        if zero_stage >= 2:
            gradients /= gpus
        if zero_stage >= 3:
            weights /= gpus
            teacher = teacher / gpus
        total = weights + gradients + moments + 4 * teacher + 4 * self.replicated_parameters
        between_steps = 4 * self.largest_exported_parameter if zero_stage >= 3 else 0
        return (total + max(self.activation_bytes_per_image * images_per_gpu, between_steps)) / 2**30


def budget(recipe: Recipe) -> Budget:
    with torch.device("meta"):
        meta = SSLMetaArch(recipe)
    crops = recipe.crops
    config = meta.student.backbone.config
    global_forward = backbone_forward_flops(config, crops.global_crops_size)
    local_forward = backbone_forward_flops(config, crops.local_crops_size)
    student_forward = 2 * global_forward + crops.local_crops_number * local_forward
    n_cls = 2 + crops.local_crops_number
    masked_patches = recipe.ibot.mask_sample_probability * sum(recipe.ibot.mask_ratio_min_max) / 2
    masked_patches *= 2 * (crops.global_crops_size // recipe.student.patch_size) ** 2
    ibot_head = meta.student["ibot_head"] if "ibot_head" in meta.student else meta.student["dino_head"]
    student_heads = n_cls * head_flops(meta.student["dino_head"]) + masked_patches * head_flops(ibot_head)
    teacher = 2 * global_forward + 2 * head_flops(meta.teacher["dino_head"]) + masked_patches * head_flops(ibot_head)
    return Budget(
        student_parameters=count(meta.student),
        teacher_parameters=count(meta.teacher),
        backbone_parameters=count(meta.student.backbone),
        flops_per_image=3 * (student_forward + student_heads) + teacher,
        activation_bytes_per_image=activation_bytes(config, crops, recipe.train.activation_checkpointing),
        largest_exported_parameter=max(p.numel() for p in meta.teacher.parameters()),
    )


def memory_table(result: Budget, batch_size: int, gpus: tuple[int, ...] = GPU_COUNTS) -> dict[int, dict]:
    """GiB per GPU for each ZeRO stage, for every GPU count that divides the batch."""
    table = {}
    for n_gpus in gpus:
        if batch_size % n_gpus:
            continue
        images_per_gpu = batch_size // n_gpus
        table[n_gpus] = {
            "images_per_gpu": images_per_gpu,
            **{f"zero{stage}_gib": round(result.memory_gib(stage, n_gpus, images_per_gpu), 1) for stage in range(4)},
        }
    return table


def compute_summary(result: Budget, recipe: Recipe, assumed_mfu: float = 0.4) -> dict:
    total_flops = result.flops_per_image * recipe.train.batch_size * recipe.total_iterations
    return {
        "training_gflops_per_image": round(result.flops_per_image / 1e9, 1),
        "total_training_flops": f"{total_flops:.3e}",
        "a100_hours_at_mfu": {"mfu": assumed_mfu, "hours": round(total_flops / (A100_BF16_PEAK * assumed_mfu) / 3600)},
    }


def init_plan(recipe: Recipe) -> dict | None:
    """Where a continued pretraining starts (``init.source``, checked against the student from headers and
    shapes) and where its heads come from; None from scratch."""
    if recipe.init.source is None:
        return None
    from dinov2.train.continued import inspect_init

    spec = inspect_init(recipe)
    fitting = recipe.init.head_fitting.iterations
    heads = "from the source" if spec.has_heads else f"fitted first: {fitting} iterations" if fitting else "random"
    return {"source": spec.source, "heads": heads}


def dry_run_report(recipe: Recipe, gpus: tuple[int, ...] = GPU_COUNTS, assumed_mfu: float = 0.4) -> dict:
    init = init_plan(recipe)
    result = budget(recipe)
    table = memory_table(result, recipe.train.batch_size, gpus)
    return {
        "recipe": recipe.name,
        **({"init": init} if init else {}),
        "student_parameters": result.student_parameters,
        "backbone_parameters": result.backbone_parameters,
        "teacher_parameters": result.teacher_parameters,
        "zero3_export_gathers_gib": round(4 * result.largest_exported_parameter / 2**30, 3),
        **compute_summary(result, recipe, assumed_mfu),
        "memory_per_gpu": table,
        "deepspeed_config": deepspeed_config(recipe, max(table) if table else 1),
    }
