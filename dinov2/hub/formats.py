"""Every export format behind one call: check the destination and the architecture, write, check parity.

Formats:
- ``safetensors``: our released-hub layout with the architecture in the metadata (``load_backbone``
  rebuilds it); parity: the reloaded backbone against the original (exact).
- ``timm``: safetensors in timm's ``VisionTransformer`` layout; no parity check here (timm is optional).
- ``onnx``: ``dinov2.hub.onnx``; parity: ONNX Runtime against our fp32 forward.
- ``hf``: a Transformers folder, ``dinov2.hub.transformers``; parity: ``Dinov2Model`` /
  ``Dinov2WithRegistersModel`` against our forward.

Parity figures are max abs differences of normalised tokens. Only figures that can match are held to the
tolerance (Transformers' resize of a model whose interpolation differs is reported, not held); an export
that fails its check is deleted and ``ParityError`` raised, so nothing that looks complete is left.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dinov2.models import DinoVisionTransformer

FORMATS = ("safetensors", "timm", "onnx", "hf")
SUFFIXES = {"safetensors": ".safetensors", "timm": ".safetensors", "onnx": ".onnx"}
# an hf export is a folder: a name with one of these suffixes is a mistake for a file
_FILE_SUFFIXES = (".safetensors", ".onnx", ".pth", ".pt", ".bin", ".json", ".ckpt")


class ParityError(ValueError):
    """The written model does not reproduce the backbone within the tolerance."""


@dataclass
class ExportReport:
    format: str
    path: Path
    parity: dict[str, float] = field(default_factory=dict)  # max abs difference per output
    held: list[str] = field(default_factory=list)  # the parity keys held to the tolerance
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)

    def files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(path for path in self.path.iterdir() if path.is_file())
        data = self.path.with_name(f"{self.path.name}.data")
        return [self.path, *([data] if data.exists() else [])]

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files())


def check_destination(format: str, out: Path, dtype: str = "fp32") -> None:
    """ValueError (one line) for an unknown format, an output name that does not fit it, or a dtype
    that the format does not take. Cheap: run it before loading any model."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    if dtype != "fp32" and format != "onnx":
        raise ValueError(f"--dtype {dtype} applies to --format onnx only")
    if format == "hf":
        if out.suffix in _FILE_SUFFIXES:
            raise ValueError(f"--format hf writes a folder (config.json + model.safetensors); {out} looks like a file")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--format hf writes a folder; {out} is a file")
        return
    if out.suffix != SUFFIXES[format]:
        raise ValueError(f"--format {format} writes a {SUFFIXES[format]} file; {out} should end in {SUFFIXES[format]}")


def require_packages(format: str) -> None:
    """ValueError (one line, what to pip install) when the format's optional packages are missing."""
    if format == "onnx":
        from dinov2.hub.onnx import require_onnx

        require_onnx()
    elif format == "hf":
        from dinov2.hub.transformers import require_transformers

        require_transformers()


def check_architecture(format: str, model: DinoVisionTransformer) -> None:
    """ValueError naming the field when ``format`` cannot hold ``model``'s architecture."""
    if format == "hf":
        from dinov2.hub.transformers import to_hf_config

        to_hf_config(model.config)
    elif format == "timm":
        from dinov2.hub.export import timm_model_kwargs

        timm_model_kwargs(model.config)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)


def _write(model: DinoVisionTransformer, format: str, out: Path, dtype: str) -> None:
    """Each writer is atomic: on failure nothing new is left at ``out``."""
    if format == "safetensors":
        from dinov2.hub.export import save_backbone

        save_backbone(model, out)
    elif format == "timm":
        from dinov2.hub.export import save_timm

        save_timm(model, out)
    elif format == "onnx":
        from dinov2.hub.onnx import export_onnx

        export_onnx(model, out, dtype=dtype)
    else:
        from dinov2.hub.transformers import save_hf

        save_hf(model, out)


def _check(model: DinoVisionTransformer, format: str, out: Path, dtype: str) -> ExportReport:
    report = ExportReport(format, out)
    if format == "safetensors":
        from dinov2.hub.export import load_backbone

        reloaded = load_backbone(out).eval()
        size, channels = model.patch_embed.img_size, model.patch_embed.proj.in_channels
        images = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            report.parity = {"cls_token": (reloaded(images) - model(images)).abs().max().item()}
        report.held, report.tolerance = ["cls_token"], 0.0
    elif format == "timm":
        report.notes.append("no parity check for the timm layout here (timm is optional)")
    elif format == "onnx":
        from dinov2.hub.onnx import TOLERANCE, check_onnx_parity

        report.parity = check_onnx_parity(model, out)
        report.held, report.tolerance = list(report.parity), TOLERANCE[dtype]
        report.notes.append(
            f"ONNX Runtime (CPU, {dtype}) vs our fp32 forward at the training resolution (batch 2) and a "
            "resized non-square one (batch 1)"
        )
    else:
        from dinov2.hub.transformers import TOLERANCE, check_hf_parity, hf_interpolation_matches

        report.parity = check_hf_parity(model, out)
        exact_everywhere = hf_interpolation_matches(model.config)
        report.held = [key for key in report.parity if exact_everywhere or key.endswith("_train")]
        report.tolerance = TOLERANCE
        if not exact_everywhere:
            report.notes.append(
                "transformers resizes the position embedding differently from this model (offset "
                f"{model.config['interpolate_offset']}, antialias {model.config['interpolate_antialias']}): "
                "outputs match exactly at the training resolution only; the *_resized figures are reported, not held"
            )
    return report


def export_model(model: DinoVisionTransformer, format: str, out: str | Path, dtype: str = "fp32") -> ExportReport:
    """Write ``model`` in ``format`` to ``out`` and check it; ParityError (and nothing left at ``out``) when
    a held parity figure exceeds the format's tolerance."""
    out = Path(out)
    check_destination(format, out, dtype)
    require_packages(format)
    check_architecture(format, model)
    training = model.training
    model.eval()
    try:
        _write(model, format, out, dtype)
        try:
            report = _check(model, format, out, dtype)
        except Exception:
            _remove(out)  # written but not verified: leave nothing that looks complete
            raise
    finally:
        model.train(training)
    failed = {key: report.parity[key] for key in report.held if not report.parity[key] <= report.tolerance}
    if failed:
        _remove(out)
        worst = max(failed, key=failed.get)
        raise ParityError(
            f"{format} export of {out} failed its parity check: max abs difference {failed[worst]:.3g} on {worst} "
            f"> tolerance {report.tolerance:g}; the export was removed"
        )
    return report
