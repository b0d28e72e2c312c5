"""DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_


class WeightNormLinear(nn.Module):
    """Linear without bias whose rows are v / ||v|| scaled by a trainable gain g (initialised to 1).

    Parameter names match torch's weight_norm (``weight_g``, ``weight_v``) and so the reference's
    head checkpoints; written out so that ZeRO-3 partitioning sees two plain parameters.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out, bias=mlp_bias))
            if index < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(fan_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers) if len(layers) > 1 else layers[0]
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck the prototypes score (what a collapse monitor watches)."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
