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
def clip_per_module(modules: list[nn.Module], max_norm: float) -> list[float]:
    """Scale each module's gradients so that their L2 norm is at most ``max_norm``; returns the norms
    before clipping. Every rank must call it (under ZeRO >= 1 it is collective)."""
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
    squares = torch.stack([
        sum((g.float().square().sum() for _, g in module_pieces), torch.zeros((), device=device))
        for module_pieces in pieces
    ])  # fmt: skip
    if partitioned:
        all_reduce_sum(squares)
    norms = squares.sqrt()
    scales = (max_norm / (norms + _EPSILON)).clamp(max=1.0)
    for module_pieces, scale in zip(pieces, scales.tolist(), strict=True):
        if scale < 1.0:
            for parameter, gradient in module_pieces:
                _scale_gradient(parameter, gradient, scale)
    return norms.tolist()


def _scale_gradient(parameter: nn.Parameter, gradient: torch.Tensor, scale: float) -> None:
    if hasattr(parameter, "ds_id"):
        # the local-gradient API may hand out a converted copy: write the scaled values back through it
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(parameter, gradient * scale)
    else:
        gradient.mul_(scale)
