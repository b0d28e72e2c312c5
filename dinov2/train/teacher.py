"""EMA copies (the pretraining teacher, the distilled students' final models) and their export."""

import json
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from torch import nn

from dinov2.hub.export import save_backbone, write_atomically


def _storage(parameter: nn.Parameter) -> torch.Tensor:
    # Under ZeRO-3 a parameter's values live in its local partition, identically laid out for the
    # student and the teacher, so the EMA runs shard by shard with no communication.
    return parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter.data


@torch.no_grad()
def update_emas(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """ema <- momentum * ema + (1 - momentum) * trained, for every parameter of every (trained, ema) pair."""
    trained_values, ema_values = [], []
    for trained, ema in pairs:
        for trained_param, ema_param in zip(trained.parameters(), ema.parameters(), strict=True):
            trained_values.append(_storage(trained_param))
            ema_values.append(_storage(ema_param))
    if ema_values:
        torch._foreach_mul_(ema_values, momentum)
        torch._foreach_add_(ema_values, trained_values, alpha=1.0 - momentum)


def gathered(module: nn.Module, modifier_rank: int | None = None):
    """Full parameters of a ZeRO-3 partitioned module inside the context; no-op otherwise. Changes made
    on ``modifier_rank`` are partitioned back on exit (``None``: read-only)."""
    parameters = list(module.parameters())
    if not any(hasattr(p, "ds_tensor") for p in parameters):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


def export_models(models: nn.ModuleDict, folder: Path, is_writer: bool, metadata: dict) -> Path:
    """backbone.safetensors (released-hub layout) + heads.safetensors (dino_head.*, ibot_head.*).

    Every rank must call this (ZeRO-3 gathers collectively); only ``is_writer`` writes.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    with gathered(models):
        if is_writer:
            header = {
                key: json.dumps(value) if not isinstance(value, str) else value for key, value in metadata.items()
            }
            save_backbone(models["backbone"], folder / "backbone.safetensors", metadata=header)
            heads = {
                f"{name}.{key}": value.detach().cpu().contiguous()
                for name, module in models.items()
                if name != "backbone"
                for key, value in module.state_dict().items()
            }
            write_atomically(folder / "heads.safetensors", lambda tmp: save_file(heads, str(tmp), metadata=header))
    return folder


def _state_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}


def _gathered_all(modules: dict[str, nn.Module], modifier_rank: int | None = None) -> ExitStack:
    stack = ExitStack()
    for module in modules.values():
        stack.enter_context(gathered(module, modifier_rank))
    return stack


def save_ema_state(modules: dict[str, nn.Module], path: Path, is_writer: bool) -> None:
    """EMA weights + loss centers as one world-size-independent safetensors file (collective under ZeRO-3).

    DeepSpeed's universal checkpoints carry only what the optimizer trains, so a run resumed on
    another number of ranks takes the EMAs and the centers from here.
    """
    from safetensors.torch import save_file

    with _gathered_all(modules):
        if is_writer:
            tensors = {key: value.detach().cpu().contiguous() for key, value in _state_tensors(modules).items()}
            write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


def load_ema_state(modules: dict[str, nn.Module], path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    with _gathered_all(modules, modifier_rank=0), torch.no_grad():
        current = _state_tensors(modules)
        if current.keys() != saved.keys():
            raise RuntimeError(f"{path} does not hold this model's EMA state")
        for key, value in current.items():
            value.copy_(saved[key].to(value.device, value.dtype))
