"""Reading backbone weights from a file or URL, and loading them strictly with errors that say what is wrong.

A source is a local path, a ``file://`` URL or an ``http(s)://`` URL; files are ``.pth``/``.pt``
(read with ``torch.load(weights_only=True)``) or ``.safetensors``. Downloads land in torch.hub's
cache (``$TORCH_HOME/hub/checkpoints``), written to a temporary name and renamed when complete.
"""

import re
import urllib.error
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# Containers that training code wraps a state dict in, looked into in this order.
_CONTAINER_KEYS = ("teacher", "model", "state_dict", "module")
# Training checkpoints of the reference group blocks in FSDP wrap units: blocks.<chunk>.<index>.*
_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _download(url: str) -> Path:
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = Path(urllib.parse.urlparse(url).path).name or "checkpoint.pth"
    destination = cache_dir / filename
    if destination.exists():
        return destination
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and moves it into place only when the download is complete.
        torch.hub.download_url_to_file(url, str(destination), progress=True)
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise CheckpointError(
            f"could not download {url}: {reason}. If this machine is offline, fetch the file on one that is "
            f"online and pass its local path (weights='/path/to/{filename}')."
        ) from error
    return destination


def resolve_source(source: str | Path) -> Path:
    """The local file behind a path, file:// URL or http(s):// URL (downloaded and cached)."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        return _download(text)
    if text.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    else:
        path = Path(text).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a source, unwrapping the containers training code saves."""
    path = resolve_source(source)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/safetensors raise many types for truncated or foreign files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]  # torch's run over many lines
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupted or not a weights file ({reason})"
        ) from error
    return _unwrap(loaded, str(path))


def _unwrap(loaded: object, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{name} holds a {type(loaded).__name__}, not a state dict")
    for key in _CONTAINER_KEYS:
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    state_dict = dict(loaded)
    non_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{name} is not a state dict: entries {non_tensors[:5]} are not tensors")
    return state_dict


def to_backbone_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat released-hub keys from flat, chunked, DDP-wrapped or full meta-architecture state dicts.

    ``backbone.`` (student/teacher dicts with heads) and ``module.`` (DDP) prefixes are stripped; when a
    ``backbone.`` prefix is present, the head entries beside it are dropped.
    """
    has_backbone_prefix = any(key.startswith("backbone.") for key in state_dict)
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if has_backbone_prefix:
            if not key.startswith("backbone."):
                continue
            key = key.removeprefix("backbone.")
        converted[_CHUNKED_BLOCK_KEY.sub(r"blocks.\1.", key)] = value
    return converted


def describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not config:
        return type(model).__name__
    return (
        f"a ViT with embed_dim {config['embed_dim']}, depth {config['depth']}, patch {config['patch_size']}, "
        f"{config['num_register_tokens']} registers, ffn {config['ffn_layer']}, img_size {config['img_size']}"
    )


def _first(items: list, count: int = 6) -> str:
    shown = ", ".join(str(item) for item in items[:count])
    return shown + (f" (+{len(items) - count} more)" if len(items) > count else "")


def state_dict_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``given`` from loading where ``expected`` is (missing, unexpected and misshaped keys, by shape
    only: meta tensors do); empty when nothing does."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [
        f"{key} {tuple(given[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(given))
        if given[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatch: {_first(misshaped)}")
    hint = ""
    if any(item.startswith("pos_embed") for item in misshaped):
        hint = " (pos_embed depends on img_size: the released models use img_size=518)"
    return "; ".join(problems) + hint if problems else ""


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), but one error listing every missing, unexpected and misshaped key."""
    problems = state_dict_problems(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match {describe(model)}: {problems}")
    model.load_state_dict(state_dict, strict=True)


def load_backbone_weights(model: nn.Module, source: str | Path) -> nn.Module:
    """Read a source and load it into a backbone strictly, converting chunked/wrapped keys."""
    state_dict = to_backbone_keys(read_state_dict(source))
    load_state_dict_strict(model, state_dict, str(source))
    return model
