"""Throughput of one full DINOv2 training step: img/s, MFU and peak memory for a recipe and batch.

A step is what the engine does per iteration: teacher forward on the 2 global crops, student forward
and backward on all crops (iBOT masks from the real collate), the losses read back once, per-module
gradient clipping, DeepSpeed optimizer step, teacher EMA. ``--set`` changes any recipe key (precision,
compile, AdamW kernel, ZeRO stage) as ``dinov2 pretrain --set`` does.
Inputs are random tensors of the recipe's crop sizes, so data loading is not measured. FLOPs are the
dry run's analytic count; MFU = FLOPs/s / the device's dense bf16 peak (give --peak-tflops for
others). On CPU it reports achieved GFLOP/s and no MFU.

    python benchmarks/pretrain/bench_step.py --recipe vitl14 --batch-size 32
    python benchmarks/pretrain/bench_step.py --recipe vitg14 --batch-size 12
    python benchmarks/pretrain/bench_step.py --recipe vitl14 --batch-size 32 --set deepspeed.precision=deepspeed_bf16
    python benchmarks/pretrain/bench_step.py --recipe cpu_tiny --batch-size 32 --steps 10
"""

import argparse
import json
import os
import sys
import time

import torch

from dinov2.configuration.recipes import load_recipe
from dinov2.loss.distributed import all_reduce_sum
from dinov2.train.clipping import clip_per_module
from dinov2.train.distributed import init_distributed
from dinov2.train.dry_run import budget
from dinov2.train.engine import initialize_engine, peak_memory_gib, precision_mode
from dinov2.train.param_groups import apply_schedules
from dinov2.train.schedules import build_schedules
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.teacher import update_emas
from dinov2.train.train import make_collate

# dense bf16 peaks, TFLOP/s
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def synthetic_batch(recipe, batch_size: int) -> dict:
    crops = recipe.crops
    generator = torch.Generator().manual_seed(0)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, crops.global_crops_size, crops.global_crops_size, generator=generator)]
                * 2,
                "local_crops": [torch.randn(3, crops.local_crops_size, crops.local_crops_size, generator=generator)]
                * crops.local_crops_number,
            },
            0,
        )
        for _ in range(batch_size)
    ]
    return make_collate(recipe)(samples, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="cpu_tiny")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (one device)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="recipe override")
    args = parser.parse_args()

    overrides = [f"train.batch_size={args.batch_size}", *args.set]
    if args.zero_stage is not None:
        overrides.append(f"deepspeed.zero_stage={args.zero_stage}")
    recipe = load_recipe(args.recipe, overrides)
    _, world_size, device = init_distributed()
    torch.manual_seed(0)
    meta = SSLMetaArch(recipe)
    engine, optimizer = initialize_engine(meta, recipe, device, world_size)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_batch(recipe, args.batch_size).items()}
    values = build_schedules(recipe).at(recipe.train.iterations_per_epoch * 20)  # past warmup and freeze
    meta.train()

    def step() -> None:
        apply_schedules(optimizer.param_groups, values["lr"], values["last_layer_lr"], values["wd"])
        loss, parts = engine(batch, values["teacher_temp"])  # under the recipe's autocast (deepspeed_config)
        all_reduce_sum(torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float()).tolist()
        engine.backward(loss)
        clip_per_module(meta.clip_units(), recipe.optim.clip_grad)
        engine.step()
        update_emas(meta.ema_pairs(), values["momentum"])

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    images_per_second = args.batch_size * args.steps / seconds
    flops = budget(recipe).flops_per_image * images_per_second
    peak = device_peak(device, args.peak_tflops)
    result = {
        "recipe": recipe.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "precision": precision_mode(recipe, device),
        "compile": recipe.train.compile,
        "adamw": recipe.optim.adamw_implementation,
        "zero_stage": recipe.deepspeed.zero_stage,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "images_per_second": round(images_per_second, 2),
        "achieved_tflops": float(f"{flops / 1e12:.3g}"),  # 3 significant digits: a slow CPU is not 0
        "mfu": round(flops / peak, 3) if peak else None,
        "peak_memory_gib": round(peak_memory_gib(device), 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
    # leave without interpreter finalisers: a process-group destructor can hang or abort after the
    # figures are out, which would cost a lent GPU's minutes or fail the run (dinov2's commands do the same)
    sys.stderr.flush()
    os._exit(0)
