"""EMA copies (the pretraining teacher, the distilled students' final models) and their export."""

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from dinov2.atomic import write_atomically
from dinov2.hub.export import save_backbone


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


@torch.no_grad()
def keep_in_fp32(modules) -> None:
    """Return the parameters of ``modules`` (the EMAs, the loss centers) to fp32 after DeepSpeed's bf16 mode
    has cast every parameter of the model it wraps to bf16.

    An EMA must accumulate in fp32: bf16 keeps 8 significant bits, so an update of
    ``(1 - momentum) * (trained - ema)`` smaller than half of the EMA's rounding step (0.2% of its value) is
    lost, and with the teacher momentum at 0.994 and rising to 1 nearly every update would be. The EMAs
    are not trained, so no optimizer holds an fp32 copy of them. Under ZeRO-3 each rank's partition is
    converted in place (and gathered in fp32 for the forward).
    """
    for module in modules:
        for parameter in module.parameters():
            if hasattr(parameter, "ds_tensor"):
                parameter.ds_tensor.data = parameter.ds_tensor.data.float()
                parameter.data = torch.empty(0, dtype=torch.float32, device=parameter.device)
            else:
                parameter.data = parameter.data.float()
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.float()


def _gathered(tensor: torch.Tensor, modifier_rank: int | None = None):
    """The whole of one ZeRO-3 partitioned parameter inside the context (a collective every rank
    joins); no-op for anything DeepSpeed does not partition. Changes made on ``modifier_rank`` are
    partitioned back on exit (``None``: read-only)."""
    if not hasattr(tensor, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], modifier_rank=modifier_rank)


def gathered_state(modules: dict[str, nn.Module], is_writer: bool) -> dict[str, torch.Tensor]:
    """Every state tensor of ``modules`` as ``<name>.<key>`` -> a CPU copy on the writer, nothing elsewhere.

    Every rank must call it. Under ZeRO-3 the parameters are gathered one at a time: DeepSpeed has
    no gather to a single rank, and gathering a whole ViT-g teacher (about 5 GB) would put it on
    every GPU at once; this way no GPU holds more than its partitions plus one whole parameter.
    """
    tensors = {}
    for name, module in modules.items():
        for key, value in module.state_dict(keep_vars=True).items():
            with _gathered(value):
                if is_writer:
                    tensors[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


class _GatheredBackbone:
    """What ``save_backbone`` reads of a backbone, from its state gathered to the writer."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


def export_models(models: nn.ModuleDict, folder: Path, is_writer: bool, metadata: dict) -> Path:
    """backbone.safetensors (released-hub layout) + heads.safetensors (dino_head.*, ibot_head.*).

    Every rank must call this (ZeRO-3 gathers collectively, one parameter at a time); only ``is_writer`` writes.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = gathered_state(dict(models.items()), is_writer)
    if is_writer:
        header = {key: json.dumps(value) if not isinstance(value, str) else value for key, value in metadata.items()}
        backbone = {key.removeprefix("backbone."): v for key, v in tensors.items() if key.startswith("backbone.")}
        heads = {key: value for key, value in tensors.items() if not key.startswith("backbone.")}
        save_backbone(
            _GatheredBackbone(models["backbone"].config, backbone), folder / "backbone.safetensors", metadata=header
        )
        write_atomically(folder / "heads.safetensors", lambda tmp: save_file(heads, str(tmp), metadata=header))
    return folder


def save_ema_state(modules: dict[str, nn.Module], path: Path, is_writer: bool) -> None:
    """EMA weights + loss centers as one world-size-independent safetensors file (collective under ZeRO-3).

    DeepSpeed's universal checkpoints carry only what the optimizer trains, so a run resumed on
    another number of ranks takes the EMAs and the centers from here.
    """
    from safetensors.torch import save_file

    tensors = gathered_state(modules, is_writer)
    if is_writer:
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


def load_ema_state(modules: dict[str, nn.Module], path: Path) -> None:
    """The inverse of ``save_ema_state``, one tensor at a time (read lazily from the file; under ZeRO-3
    each parameter is gathered, set from rank 0's copy and partitioned again)."""
    from safetensors import safe_open

    current = {
        f"{name}.{key}": value
        for name, module in modules.items()
        for key, value in module.state_dict(keep_vars=True).items()
    }
    with safe_open(str(path), framework="pt") as saved, torch.no_grad():
        if set(current) != set(saved.keys()):
            raise RuntimeError(f"{path} does not hold this model's EMA state")
        for key, value in current.items():
            with _gathered(value, modifier_rank=0):
                value.data.copy_(saved.get_tensor(key).to(value.device, value.dtype))
