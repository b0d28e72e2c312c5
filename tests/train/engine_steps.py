"""The engine's iteration driven step by step in one process, on one real batch: what the GPU tests run on
CUDA and compare with the same steps in fp32 on the CPU (``cpu_fp32_losses``, in a child process).

The pieces are the engine's own (``initialize_engine``, the objective, per-module clipping, the EMA) on a
tiny ViT (``cpu_tiny``: 4 blocks, width 64) over Fashion-MNIST crops made by the pretraining augmentation.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from dinov2.configuration.recipes import load_recipe
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.train.clipping import clip_per_module
from dinov2.train.distributed import init_distributed
from dinov2.train.engine import initialize_engine
from dinov2.train.param_groups import apply_schedules
from dinov2.train.schedules import build_schedules
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.teacher import update_emas
from dinov2.train.train import make_collate

REPOSITORY = Path(__file__).resolve().parents[2]
# no drop path (its draws differ between CPU and CUDA generators); LayerScale 1 so that images differ
# from the first step (at 1e-5 every CLS token is the same and KoLeo's distances are rounding noise)
TINY = ["train.batch_size=8", "student.drop_path_rate=0", "student.layerscale=1.0"]
STEPS = 6
FIRST_ITERATION = 25  # past cpu_tiny's warmup (lr 0 at iteration 0) and last-layer freeze


def real_batch(root: Path) -> dict:
    """8 Fashion-MNIST images, cropped by the pretraining augmentation from a seeded generator and
    collated with iBOT masks: the same batch on every device."""
    recipe = load_recipe("cpu_tiny", TINY)
    crops = recipe.crops
    augmentation = DataAugmentationDINO(
        crops.global_crops_scale, crops.local_crops_scale, crops.local_crops_number,
        crops.global_crops_size, crops.local_crops_size,
    )  # fmt: skip
    paths = sorted((root / "train").rglob("*.png"))[:8]
    generator = torch.Generator().manual_seed(0)
    samples = [(augmentation(Image.open(path).convert("RGB"), generator=generator), 0) for path in paths]
    return make_collate(recipe)(samples, generator=generator)


def build_engine(overrides: list[str]):
    recipe = load_recipe("cpu_tiny", [*TINY, *overrides])
    _, world_size, device = init_distributed()
    torch.manual_seed(0)
    meta = SSLMetaArch(recipe)
    engine, optimizer = initialize_engine(meta, recipe, device, world_size)
    return recipe, meta, engine, optimizer, device


def run_steps(recipe, meta, engine, optimizer, device, batch: dict, start: int, steps: int) -> list[float]:
    """The engine's iteration (schedules, forward under the recipe's autocast, backward, per-module clip,
    step, EMA) on the same batch; returns each step's total loss."""
    schedules = build_schedules(recipe)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    meta.train()
    losses = []
    for iteration in range(start, start + steps):
        values = schedules.at(iteration)
        apply_schedules(optimizer.param_groups, values["lr"], values["last_layer_lr"], values["wd"])
        loss, _ = engine(batch, values["teacher_temp"])  # under the recipe's autocast (deepspeed_config)
        losses.append(loss.item())
        engine.backward(loss)
        clip_per_module(meta.clip_units(), recipe.optim.clip_grad)
        engine.step()
        update_emas(meta.ema_pairs(), values["momentum"])
    return losses


def engine_losses(overrides: list[str], batch: dict, steps: int = STEPS) -> list[float]:
    recipe, meta, engine, optimizer, device = build_engine(overrides)
    return run_steps(recipe, meta, engine, optimizer, device, batch, FIRST_ITERATION, steps)


def forward_dtypes(overrides: list[str], batch: dict) -> list[str]:
    """The dtypes a student Linear's outputs take in one forward through the engine, nothing around it."""
    recipe, meta, engine, _, _ = build_engine(overrides)
    seen: set[str] = set()
    hook = meta.student.backbone.blocks[0].mlp.fc1.register_forward_hook(
        lambda module, args, output: seen.add(str(output.dtype))
    )
    loss, _ = engine(batch, recipe.teacher.teacher_temp)
    hook.remove()
    assert torch.isfinite(loss)
    return sorted(seen)


def losses_in_child_process(runs: list[list[str]], batch: dict, folder: Path, env: dict[str, str]) -> list[list[float]]:
    """``engine_losses`` of each list of overrides, in a fresh process (its own process group of one,
    DeepSpeed's global state not shared with the caller), on ``batch``."""
    return in_child_process("engine_losses", runs, batch, folder, env)


def in_child_process(function: str, runs: list[list[str]], batch: dict, folder: Path, env: dict[str, str]) -> list:
    """``function`` of this module (overrides, batch) for each list of overrides, in a fresh process."""
    saved = folder / "batch.pt"
    torch.save(batch, saved)
    script = (
        "import json, sys, torch\n"
        f"from tests.train.engine_steps import {function} as function\n"
        "batch = torch.load(sys.argv[1], weights_only=True)\n"
        "print(json.dumps([function(overrides, batch) for overrides in json.loads(sys.argv[2])]))\n"
    )
    group = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in env.items() if k not in group}
    result = subprocess.run(
        [sys.executable, "-c", script, str(saved), json.dumps(runs)], cwd=REPOSITORY, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
