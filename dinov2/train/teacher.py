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


def gathered(module: nn.Module, modifier_rank: int | None = None):
    """Full parameters of a ZeRO-3 partitioned module inside the context; no-op otherwise. Changes made
    on ``modifier_rank`` are partitioned back on exit (``None``: read-only)."""
    parameters = list(module.parameters())
    if not any(hasattr(p, "ds_tensor") for p in parameters):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


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


def _ema_state_tensors(meta: nn.Module) -> dict[str, torch.Tensor]:
    """The state that is not trained by the optimizer: teacher weights and the loss centers."""
    state = {f"teacher.{key}": value for key, value in meta.teacher.state_dict().items()}
    for name in ("dino_loss", "ibot_patch_loss"):
        state.update({f"{name}.{key}": value for key, value in getattr(meta, name).state_dict().items()})
    return state


def save_ema_state(meta: nn.Module, path: Path, is_writer: bool) -> None:
    """Teacher + centers as one world-size-independent safetensors file (collective under ZeRO-3).

    DeepSpeed's universal checkpoints carry only what the optimizer trains, so a run resumed on
    another number of ranks takes the teacher and the centers from here.
    """
    from safetensors.torch import save_file

    with gathered(meta.teacher):
        if is_writer:
            tensors = {key: value.detach().cpu().contiguous() for key, value in _ema_state_tensors(meta).items()}
            write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


def load_ema_state(meta: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    with gathered(meta.teacher, modifier_rank=0), torch.no_grad():
        current = _ema_state_tensors(meta)
        if current.keys() != saved.keys():
            raise RuntimeError(f"{path} does not hold this model's teacher state")
        for key, value in current.items():
            value.copy_(saved[key].to(value.device, value.dtype))
