"""Per-module gradient clipping on every ZeRO stage, as the reference clips under FSDP.

The reference clips each sub-module (the backbone, each head) to ``optim.clip_grad`` separately;
DeepSpeed's ``gradient_clipping`` clips one global norm over everything it trains, which trains
differently. So the engine sets DeepSpeed's clipping to 0 and calls ``clip_per_module`` between
``engine.backward`` and ``engine.step``, the window in which DeepSpeed holds the reduced gradients:

- ZeRO-0: every rank holds every averaged gradient (``param.grad``); nothing to communicate.
- ZeRO-1/2: each rank holds the fragments of the gradients its optimizer partition updates,
  reached through DeepSpeed's low-to-high precision mapping (``param._hp_mapping``).
- ZeRO-3: each rank holds the gradient partition of every parameter (DeepSpeed's local-gradient API).

Under ZeRO >= 1 the squared norms of the local pieces are summed per module over ranks (one
all-reduce of one number per module), then each piece is scaled in place, so the update is the
one full-gradient clipping would give, up to fp32 summation order.
"""

from collections.abc import Iterator

import torch
from torch import nn

from dinov2.loss.distributed import all_reduce_sum

# torch.nn.utils.clip_grad_norm_'s guard against a zero norm, kept so ZeRO-0 matches it
_EPSILON = 1e-6


def _fragment(parameter: nn.Parameter) -> torch.Tensor | None:
    """The part of a ZeRO-1/2 parameter's reduced gradient that this rank's optimizer partition owns."""
    mapping = parameter._hp_mapping
    if mapping is None:  # every element of this parameter belongs to another rank's partition
        return None
    fragment = mapping.get_lp_grad_fragment(parameter._index_in_param_group).view(-1)
    if fragment.numel() == parameter.numel():
        # some modes keep the whole gradient on every rank: count only the owned slice
        address = mapping.lp_fragment_address
        fragment = fragment.narrow(0, address.start, address.numel)
    return fragment


def _zero3_local_gradients(parameters: list[nn.Parameter]) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    from deepspeed.utils import safe_get_local_grad

    for parameter in parameters:
        gradient = safe_get_local_grad(parameter)
        if gradient is not None:
            yield parameter, gradient


def is_partitioned(modules: list[nn.Module]) -> bool:
    """Whether DeepSpeed spreads these modules' gradients over ranks (ZeRO >= 1)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for m in modules for p in m.parameters())


@torch.no_grad()
def clip_per_module(modules: list[nn.Module], max_norm: float) -> torch.Tensor:
    """Scale each module's gradients so that their L2 norm is at most ``max_norm``; returns the norms
    before clipping, one per module, on the device. Every rank must call it (under ZeRO >= 1 it is
    collective). Nothing here makes the host wait for the device: the norms come from fused multi-tensor
    kernels and every gradient is multiplied by its module's factor, which is exactly 1 when the norm is
    within bounds."""
    partitioned = is_partitioned(modules)
    pieces: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
    for module in modules:
        trained = [p for p in module.parameters() if p.requires_grad]
        if any(hasattr(p, "ds_id") for p in trained):
            pieces.append(list(_zero3_local_gradients(trained)))
        elif partitioned:
            pieces.append([(p, f) for p in trained if (f := _fragment(p)) is not None])
        else:
            pieces.append([(p, p.grad) for p in trained if p.grad is not None])
    device = next(p.device for m in modules for p in m.parameters())
    squares = torch.stack([_sum_of_squares([g for _, g in module_pieces], device) for module_pieces in pieces])
    if partitioned:
        all_reduce_sum(squares)
    norms = squares.sqrt()
    scales = (max_norm / (norms + _EPSILON)).clamp(max=1.0)
    for module_pieces, scale in zip(pieces, scales, strict=True):
        if any(hasattr(p, "ds_id") for p, _ in module_pieces):
            # ZeRO-3: the local-gradient API may hand out a converted copy; write the scaled values back
            from deepspeed.utils import safe_set_local_grad

            for parameter, gradient in module_pieces:
                safe_set_local_grad(parameter, gradient * scale)
        elif module_pieces:
            # the fp32 factor, as a Python float factor would be applied to bf16 gradients
            torch._foreach_mul_([g for _, g in module_pieces], scale)
    return norms


def _sum_of_squares(gradients: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The squared L2 norm of all ``gradients`` together, accumulated in fp32."""
    if not gradients:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(gradients, 2, dtype=torch.float32)).square().sum()
