"""ONNX export of a DINOv2 backbone for any batch size and any image size that is a multiple of the patch.

The graph comes from ``torch.onnx.export(dynamo=True)``. The backbone's own position-embedding resize
cannot be traced as a function of the image size: ``F.interpolate`` with a scale factor (the 0.1 offset of
models without registers) gets the example input's scale baked into the graph, which is then wrong, or
fails, at every other resolution. ``ExportableBackbone`` therefore runs the backbone's own patch
embedding, blocks and norm, but computes the same bicubic resize as two small interpolation matrices
built from the runtime patch grid (one per axis: output positions x learned positions). That is plain
tensor arithmetic in the graph and follows the image size. ``check_onnx_parity`` runs the saved file in
ONNX Runtime against the backbone's forward at two resolutions and two batch sizes.

Outputs: ``cls_token`` (B, D), what ``model(x)`` returns; ``patch_tokens`` (B, h*w, D); and
``register_tokens`` (B, R, D) for models with registers. All are after the final LayerNorm.
"""

import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from dinov2.atomic import write_atomically
from dinov2.models import DinoVisionTransformer

INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_token", "patch_tokens", "register_tokens")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Max abs difference allowed between ONNX Runtime and the backbone's fp32 forward (normalised tokens,
# so values of order 1). fp16 keeps about 3 significant digits through every block.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
# Above this, protobuf cannot hold the weights inside the .onnx file: they go to ``<name>.data`` beside it.
_EXTERNAL_DATA_BYTES = 1_800_000_000


def require_onnx() -> None:
    """Fail with one line naming what to install when the ONNX packages are missing."""
    missing = []
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: pip install {' '.join(missing)} (or '.[dev]')")


def _keys_cubic(distance: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel at ``distance`` (in input pixels), zero beyond 2."""
    x = distance.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_resize_weights(out_size, scaled_size: torch.Tensor, in_size: int, antialias: bool) -> torch.Tensor:
    """(out_size, in_size) weights of ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis.

    Output ``i`` samples input position ``(i + 0.5) * in_size / scaled_size - 0.5``; ``scaled_size`` is
    the output size, or ``size + offset`` when interpolate is given the scale factor ``(size + offset) /
    in_size``. Without antialias: 4 taps of Keys' kernel (a = -0.75) with indices clamped at the border.
    With antialias: Keys' kernel with a = -0.5, widened by the downscale factor and normalised per row.
    ``out_size`` may be a symbolic size: the weights are tensor arithmetic, so an exported graph keeps it.
    """
    scale = in_size / scaled_size  # input pixels per output pixel
    positions = torch.arange(out_size, dtype=torch.float32)
    columns = torch.arange(in_size, dtype=torch.float32)
    if antialias:
        center = (positions + 0.5) * scale
        stretch = torch.clamp(scale, min=1.0)
        weights = _keys_cubic((columns - center.unsqueeze(-1) + 0.5) / stretch, a=-0.5)
        return weights / weights.sum(-1, keepdim=True)
    source = (positions + 0.5) * scale - 0.5
    start = torch.floor(source)
    offsets = torch.arange(-1, 3, dtype=torch.float32)
    taps = _keys_cubic(source.unsqueeze(-1) - start.unsqueeze(-1) - offsets, a=-0.75)  # (out, 4)
    index = (start.unsqueeze(-1) + offsets).clamp(0, in_size - 1)
    return (taps.unsqueeze(-1) * (index.unsqueeze(-1) == columns).to(torch.float32)).sum(1)


class ExportableBackbone(nn.Module):
    """The backbone's inference forward with a position-embedding resize that follows the input size.

    Same token order as ``DinoVisionTransformer.prepare_tokens_with_masks`` (without masks): patch
    tokens, CLS prepended, position embedding added, registers inserted after CLS. At the training grid
    the learned embedding is used as is (the resize weights are then the identity), as the backbone does.
    """

    def __init__(self, backbone: DinoVisionTransformer):
        super().__init__()
        self.backbone = backbone
        self.grid_side = math.isqrt(backbone.pos_embed.shape[1] - 1)

    def position_embedding(self, grid_h, grid_w) -> torch.Tensor:
        backbone, side = self.backbone, self.grid_side
        pos_embed = backbone.pos_embed.float()
        dim = pos_embed.shape[-1]
        learned = pos_embed[0, 1:].reshape(side, side, dim).permute(2, 0, 1)  # (D, M, M)
        height = torch.full((), grid_h, dtype=torch.float32)
        width = torch.full((), grid_w, dtype=torch.float32)
        # the backbone skips the resize at its training grid, where an offset would not give the identity
        at_training_grid = ((height == side) & (width == side)).to(torch.float32)
        offset = backbone.interpolate_offset * (1.0 - at_training_grid)
        antialias = backbone.interpolate_antialias
        rows = bicubic_resize_weights(grid_h, height + offset, side, antialias)
        cols = bicubic_resize_weights(grid_w, width + offset, side, antialias)
        patch = torch.matmul(torch.matmul(rows, learned), cols.transpose(0, 1))  # (D, h, w)
        patch = patch.permute(1, 2, 0).reshape(1, -1, dim)
        return torch.cat((pos_embed[:, :1], patch), dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        backbone = self.backbone
        tokens = backbone.patch_embed(images)
        batch = tokens.shape[0]
        grid_h, grid_w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
        x = torch.cat((backbone.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens), dim=1)
        x = x + self.position_embedding(grid_h, grid_w).to(x.dtype)
        registers = backbone.num_register_tokens
        if registers:
            x = torch.cat((x[:, :1], backbone.register_tokens.expand(batch, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        for block in backbone.blocks:
            x = block(x)
        x = backbone.norm(x)
        if registers:
            return x[:, 0], x[:, registers + 1 :], x[:, 1 : registers + 1]
        return x[:, 0], x[:, 1:]


def output_names(model: DinoVisionTransformer) -> tuple[str, ...]:
    return OUTPUT_NAMES if model.num_register_tokens else OUTPUT_NAMES[:2]


@contextlib.contextmanager
def _inference_mode(model: DinoVisionTransformer) -> Iterator[None]:
    """eval() and SDPA attention while exporting (xformers calls cannot be exported), restored after."""
    training = model.training
    backends = [block.attn.backend for block in model.blocks]
    model.eval()
    model.set_attention_backend("sdpa")
    try:
        yield
    finally:
        model.train(training)
        for block, backend in zip(model.blocks, backends, strict=True):
            block.attn.backend = backend


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO: keep them out of the command's output."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _save(program, path: Path) -> None:
    """Atomically: the .onnx appears when complete. Weights over protobuf's limit go to ``<name>.data``
    (written first, referenced by the final name)."""
    import onnx_ir

    weight_bytes = sum(value.const_value.nbytes for value in program.model.graph.initializers.values())
    external = f"{path.name}.data" if weight_bytes > _EXTERNAL_DATA_BYTES else None
    write_atomically(path, lambda tmp: onnx_ir.save(program.model, tmp, format="protobuf", external_data=external))


def export_onnx(model: DinoVisionTransformer, path: str | Path, dtype: str = "fp32", opset: int | None = None) -> Path:
    """Write ``model`` as ONNX with a dynamic batch and a dynamic image size (multiples of the patch).

    ``dtype="fp16"`` exports a half-precision copy (inputs and outputs float16; the position-embedding
    resize stays float32, as in the backbone). ONNX Runtime's CPU provider runs it.
    """
    require_onnx()
    if dtype not in DTYPES:
        raise ValueError(f"unknown ONNX dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path} should end in .onnx")
    source = copy.deepcopy(model).to(DTYPES[dtype]) if dtype != "fp32" else model
    patch, side = source.patch_size, math.isqrt(source.pos_embed.shape[1] - 1)
    # an example off the training grid and not square, so that no size gets specialised
    example = torch.zeros(2, source.patch_embed.proj.in_channels, (side + 1) * patch, (side + 2) * patch)
    grid_h, grid_w = torch.export.Dim("grid_height", min=1), torch.export.Dim("grid_width", min=1)
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1), 2: patch * grid_h, 3: patch * grid_w}}
    with _inference_mode(source), _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            ExportableBackbone(source).eval(),
            (example.to(DTYPES[dtype]),),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=list(output_names(source)),
            opset_version=opset,
            verbose=False,
        )
    # what a consumer needs to feed the graph without our code: patch size (image sides are multiples of
    # it), training size, outputs; the full architecture for rebuilding
    program.model.metadata_props.update(
        {
            "dinov2.config": json.dumps(model.config),
            "dinov2.patch_size": str(model.patch_size),
            "dinov2.img_size": str(model.config["img_size"]),
            "dinov2.outputs": ",".join(output_names(model)),
            "dinov2.dtype": dtype,
        }
    )
    _save(program, path)
    return path


def parity_inputs(model: DinoVisionTransformer, seed: int = 0) -> list[torch.Tensor]:
    """Images at the training resolution (batch 2) and at a larger non-square one (batch 1), where the
    position embedding is resized: a graph that only works at the traced size fails one of them."""
    generator = torch.Generator().manual_seed(seed)
    patch, side = model.patch_size, math.isqrt(model.pos_embed.shape[1] - 1)
    channels = model.patch_embed.proj.in_channels
    shapes = [(2, channels, side * patch, side * patch), (1, channels, (side + 2) * patch, (side + 3) * patch)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def check_onnx_parity(
    model: DinoVisionTransformer, path: str | Path, inputs: Sequence[torch.Tensor] | None = None
) -> dict[str, float]:
    """Max abs difference per output between ONNX Runtime (CPU) and the backbone's fp32 forward, over
    ``inputs`` (default: ``parity_inputs``). Keys: ``cls_token``, ``patch_tokens``[, ``register_tokens``]."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_type = session.get_inputs()[0].type
    input_dtype = torch.float16 if "float16" in input_type else torch.float32
    names = output_names(model)
    worst = dict.fromkeys(names, 0.0)
    with _inference_mode(model), torch.no_grad():
        for images in inputs if inputs is not None else parity_inputs(model):
            features = model.forward_features(images.float())
            expected = {
                "cls_token": features["x_norm_clstoken"],
                "patch_tokens": features["x_norm_patchtokens"],
                "register_tokens": features["x_norm_regtokens"],
            }
            got = session.run(list(names), {INPUT_NAME: images.to(input_dtype).numpy()})
            for name, array in zip(names, got, strict=True):
                difference = (torch.from_numpy(array).float() - expected[name].float()).abs().max().item()
                worst[name] = max(worst[name], difference)
    return worst
