"""The DeepSpeed engine of a training run: ZeRO settings, precision, the optimizer and the block options.

``deepspeed.precision``: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere; ``autocast_bf16`` keeps fp32
weights and runs matmuls in bf16; ``deepspeed_bf16`` is DeepSpeed's bf16 mode (bf16 weights, gradients and
communication, fp32 master weights in the optimizer) with the EMAs kept in fp32. Gradients are clipped per
module by the loop (``clipping.py``), not by DeepSpeed's one global norm.
"""

import logging
from typing import Any

import torch

from dinov2.configuration.recipes import DeepSpeedSection, Recipe
from dinov2.layers import Block
from dinov2.train.activation_checkpointing import checkpoint_blocks
from dinov2.train.teacher import keep_in_fp32

logger = logging.getLogger(__name__)


def zero_optimization(section: DeepSpeedSection) -> dict[str, Any]:
    """ZeRO's settings. ``offload_optimizer: cpu`` keeps the optimizer state (Adam moments, 8 bytes per
    parameter, and in DeepSpeed's bf16 mode the fp32 master weights) in pinned CPU memory, where DeepSpeed's
    CPU Adam steps it."""
    zero: dict[str, Any] = {"stage": section.zero_stage, "stage3_param_persistence_threshold": 0}
    if section.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(recipe: Recipe, world_size: int, device_type: str = "cuda") -> dict[str, Any]:
    """DeepSpeed's configuration for a run on ``world_size`` devices of ``device_type`` (the dry runs
    describe CUDA runs).

    The step's bf16 autocast is DeepSpeed's ``torch_autocast``: the engine's forward turns off on CUDA an
    autocast entered around it unless that section is on. ``lower_precision_safe_modules`` is empty, so
    gradients are reduced in the parameters' own dtype, as without it."""
    config = {
        "train_batch_size": recipe.train.batch_size,
        "train_micro_batch_size_per_gpu": recipe.train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # DeepSpeed would clip one global norm; the engine clips each module instead (clipping.py)
        "gradient_clipping": 0.0,
        "zero_optimization": zero_optimization(recipe.deepspeed),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if recipe.deepspeed.precision == "deepspeed_bf16":
        config["bf16"] = {"enabled": True}
    if precision_dtype(recipe, torch.device(device_type)) is not None:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


def precision_mode(recipe: Recipe, device: torch.device) -> str:
    """``deepspeed.precision`` with ``auto`` resolved: autocast_bf16 on CUDA, fp32 elsewhere."""
    precision = recipe.deepspeed.precision
    if precision == "auto":
        return "autocast_bf16" if device.type == "cuda" else "fp32"
    return precision


def precision_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the step's forward: bf16 in both bf16 modes, None in fp32.

    Under ``deepspeed_bf16`` autocast still runs the forward: it casts the fp32 crops for the bf16 weights
    and runs the fp32 EMAs (the teacher) in bf16 without a second copy of their weights.
    """
    return None if precision_mode(recipe, device) == "fp32" else torch.bfloat16


def build_adamw(groups: list[dict], recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW over the objective's groups with the recipe's kernel; ``auto`` takes the fused
    kernel on CUDA (one launch for every tensor) and torch's default elsewhere."""
    if recipe.deepspeed.offload_optimizer == "cpu":
        # the offloaded state is stepped where it lives: DeepSpeed's CPU Adam (a C++ op compiled on first
        # use) in its AdamW mode; DeepSpeed refuses torch's optimizers with offload
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=(recipe.optim.adamw_beta1, recipe.optim.adamw_beta2), adamw_mode=True)
    implementation = recipe.optim.adamw_implementation
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "default"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    return torch.optim.AdamW(
        groups, betas=(recipe.optim.adamw_beta1, recipe.optim.adamw_beta2), **kernel.get(implementation, {})
    )


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` every transformer block of ``model``; returns how many. A block compiles once per
    input structure (the student's list of global and local crops, the teacher's global crops). Blocks,
    not the whole model: the masking, the heads, the losses and DeepSpeed's work between blocks (ZeRO-3
    gathers each block's weights in module hooks) stay in eager mode."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def initialize_engine(
    objective: torch.nn.Module, recipe: Recipe, device: torch.device, world_size: int, load_universal: bool = False
):
    """The DeepSpeed engine and optimizer over ``objective`` with the recipe's block options (activation
    checkpointing, compile), AdamW kernel, ZeRO stage and precision."""
    import deepspeed

    if recipe.train.activation_checkpointing:
        checkpoint_blocks(objective.clip_units())
    if recipe.train.compile:
        if device.type == "cuda" and recipe.deepspeed.precision == "deepspeed_bf16":
            logger.warning(
                "train.compile with deepspeed.precision=deepspeed_bf16: on CUDA these steps drifted from fp32 "
                "(5% after 6 steps, the loss rising; not on CPU); autocast_bf16 or eager blocks are safer"
            )
        compile_blocks(objective)
    optimizer = build_adamw(objective.optimizer_groups(), recipe, device)
    objective.to(device)
    config = deepspeed_config(recipe, world_size, device.type)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
    if recipe.deepspeed.precision == "deepspeed_bf16":
        keep_in_fp32(objective.ema_state().values())
    return engine, optimizer


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
