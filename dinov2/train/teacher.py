"""The teacher: EMA of the student, and its export for distillation and continued pretraining."""

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from dinov2.hub.export import save_backbone, write_atomically


def _storage(parameter: nn.Parameter) -> torch.Tensor:
    # Under ZeRO-3 a parameter's values live in its local partition, identically laid out for the
    # student and the teacher, so the EMA runs shard by shard with no communication.
    return parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter.data


@torch.no_grad()
def update_teacher(student: nn.ModuleDict, teacher: nn.ModuleDict, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every paired parameter."""
    student_values, teacher_values = [], []
    for name, module in student.items():
        for student_param, teacher_param in zip(module.parameters(), teacher[name].parameters(), strict=True):
            student_values.append(_storage(student_param))
            teacher_values.append(_storage(teacher_param))
    torch._foreach_mul_(teacher_values, momentum)
    torch._foreach_add_(teacher_values, student_values, alpha=1.0 - momentum)


def gathered(module: nn.Module):
    """Full parameters of a ZeRO-3 partitioned module inside the context (read-only); no-op otherwise."""
    parameters = list(module.parameters())
    if not any(hasattr(p, "ds_tensor") for p in parameters):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


def export_teacher(teacher: nn.ModuleDict, folder: Path, is_writer: bool, metadata: dict) -> Path:
    """backbone.safetensors (released-hub layout) + heads.safetensors (dino_head.*, ibot_head.*).

    Every rank must call this (ZeRO-3 gathers collectively); only ``is_writer`` writes.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    with gathered(teacher):
        if is_writer:
            header = {
                key: json.dumps(value) if not isinstance(value, str) else value for key, value in metadata.items()
            }
            save_backbone(teacher["backbone"], folder / "backbone.safetensors", metadata=header)
            heads = {
                f"{name}.{key}": value.detach().cpu().contiguous()
                for name, module in teacher.items()
                if name != "backbone"
                for key, value in module.state_dict().items()
            }
            write_atomically(folder / "heads.safetensors", lambda tmp: save_file(heads, str(tmp), metadata=header))
    return folder
