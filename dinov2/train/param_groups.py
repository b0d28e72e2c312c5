"""Optimizer parameter groups built by name rules, in one place.

- layer-wise lr decay: ``decay ** (n_blocks + 1 - layer_id)``, layer_id 0 for the patch embedding and
  tokens, i + 1 for block i, n_blocks + 1 (multiplier 1) for everything else (final norm, heads);
- the patch embedding's lr is further multiplied by ``patch_embed_lr_mult``;
- no weight decay on biases, norms and LayerScale gammas;
- the heads' last layers are flagged so their lr can be held at 0 during the first epoch(s).
Parameters with the same (lr multiplier, wd multiplier, last-layer flag) share one group.
"""

from collections import defaultdict

from torch import nn

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def layer_id(name: str, n_blocks: int) -> int:
    if any(token in name for token in _EMBEDDING_NAMES):
        return 0
    if "blocks." in name:
        return int(name.split("blocks.")[1].split(".")[0]) + 1
    return n_blocks + 1


def param_groups(
    student: nn.ModuleDict, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float
) -> list[dict]:
    """Groups over every trainable parameter of the student's sub-modules (backbone, heads)."""
    grouped: dict[tuple, list] = defaultdict(list)
    names: dict[tuple, list[str]] = defaultdict(list)
    for module_name, module in student.items():
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:
                continue
            lr_multiplier = 1.0
            if module_name == "backbone":
                lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
                if "patch_embed" in name:
                    lr_multiplier *= patch_embed_lr_mult
            no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
            key = (lr_multiplier, 0.0 if no_decay else 1.0, "last_layer" in name)
            grouped[key].append(parameter)
            names[key].append(f"{module_name}.{name}")
    return [
        {
            "params": grouped[key],
            "lr_multiplier": key[0],
            "wd_multiplier": key[1],
            "is_last_layer": key[2],
            "member_names": names[key],
        }
        for key in sorted(grouped)
    ]


def apply_schedules(optimizer_param_groups: list[dict], lr: float, last_layer_lr: float, wd: float) -> None:
    for group in optimizer_param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
