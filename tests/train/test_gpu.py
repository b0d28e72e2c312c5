"""The engine on CUDA: fp32 steps against the CPU's, bf16 steps under ZeRO-2 and ZeRO-3 against fp32,
save and resume, the attention kernels. Run by hand on a GPU machine (``pytest -m gpu``); skipped
without CUDA.

The steps are the engine's own pieces driven in this process (``tests/train/engine_steps.py``) on a tiny
ViT over real Fashion-MNIST crops. The reference is the same steps in fp32 on the GPU (TF32 off), which
match the same steps on the CPU (in a child process that sees no GPU).
"""

import math
import os

import pytest
import torch

from dinov2.train.teacher import load_ema_state, save_ema_state
from tests.train.engine_steps import (
    FIRST_ITERATION,
    build_engine,
    engine_losses,
    losses_in_child_process,
    real_batch,
    run_steps,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine"),
]


@pytest.fixture(scope="module")
def batch(image_folder) -> dict:
    return real_batch(image_folder(2, 1))


@pytest.fixture(scope="module")
def gpu_fp32_losses(batch) -> list[float]:
    """The same steps in fp32 on the GPU, ZeRO-0, with TF32 off (cuDNN would use it for the patch embedding)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return engine_losses(["deepspeed.precision=fp32", "deepspeed.zero_stage=0"], batch)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp32_steps_on_the_gpu_give_the_cpu_losses(batch, gpu_fp32_losses, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    (cpu_fp32_losses,) = losses_in_child_process(
        [["deepspeed.precision=fp32", "deepspeed.zero_stage=0"]], batch, tmp_path, env
    )
    print(f"fp32 on the GPU: {gpu_fp32_losses}; on the CPU: {cpu_fp32_losses}")
    assert gpu_fp32_losses == pytest.approx(cpu_fp32_losses, rel=1e-4)


@pytest.mark.parametrize(
    "precision, zero_stage, compiled",
    [
        ("autocast_bf16", 2, False),
        ("autocast_bf16", 3, False),
        ("deepspeed_bf16", 2, False),
        ("deepspeed_bf16", 3, False),
        ("deepspeed_bf16", 2, True),
    ],
)
def test_bf16_steps_stay_close_to_fp32(batch, gpu_fp32_losses, precision, zero_stage, compiled):
    overrides = [f"deepspeed.precision={precision}", f"deepspeed.zero_stage={zero_stage}", f"train.compile={compiled}"]
    losses = engine_losses(overrides, batch)
    print(f"{precision} ZeRO-{zero_stage} compile={compiled}: {losses}; fp32: {gpu_fp32_losses}")
    assert all(math.isfinite(value) for value in losses)
    # measured on CPU with the same steps: bf16 autocast within 0.03% of fp32, DeepSpeed's bf16 (bf16
    # weights and gradients) 1.4-1.5% away after 6 steps under ZeRO-2 and ZeRO-3, 0.03% without clipping
    assert losses == pytest.approx(gpu_fp32_losses, rel=0.03)


def test_deepspeed_bf16_keeps_the_teacher_and_the_centers_in_fp32(batch):
    recipe, meta, engine, optimizer, device = build_engine(["deepspeed.precision=deepspeed_bf16"])
    run_steps(recipe, meta, engine, optimizer, device, batch, FIRST_ITERATION, 1)
    assert {p.dtype for p in meta.student.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in meta.teacher.parameters()} == {torch.float32}
    assert meta.dino_loss.center.dtype == torch.float32


def test_a_checkpoint_saved_on_the_gpu_resumes_to_the_same_steps(batch, tmp_path):
    # ZeRO-2 with DeepSpeed's bf16: fp32 master weights in the optimizer state, the fp32 teacher in the
    # module state and the EMA file
    overrides = ["deepspeed.precision=deepspeed_bf16", "deepspeed.zero_stage=2"]
    recipe, meta, engine, optimizer, device = build_engine(overrides)
    run_steps(recipe, meta, engine, optimizer, device, batch, FIRST_ITERATION, 2)
    save_ema_state(meta.ema_state(), tmp_path / "ema.safetensors", is_writer=True)
    engine.save_checkpoint(str(tmp_path), tag="iter_2")
    straight = run_steps(recipe, meta, engine, optimizer, device, batch, FIRST_ITERATION + 2, 3)

    recipe, meta, engine, optimizer, device = build_engine(overrides)
    engine.load_checkpoint(str(tmp_path), tag="iter_2")
    load_ema_state(meta.ema_state(), tmp_path / "ema.safetensors")
    resumed = run_steps(recipe, meta, engine, optimizer, device, batch, FIRST_ITERATION + 2, 3)
    print(f"straight {straight}, resumed {resumed}")
    # the same arithmetic on the same device; CUDA's atomics in some backward kernels may reorder sums
    assert resumed == pytest.approx(straight, rel=1e-3)


def test_sdpa_runs_the_vit_attention_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dinov2.models import build_vit

    # a ViT-L/14 block's shapes at 224 px (257 tokens, 16 heads of 64) in bf16
    model = build_vit("vit_large", patch_size=14, img_size=224, init_values=1e-5, ffn_layer="swiglufused").cuda()
    block = model.blocks[0]
    tokens = torch.randn(4, 257, 1024, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        default = block(tokens)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot serve these inputs
            flash = block(tokens)
            flash.float().sum().backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            block(tokens)
            torch.cuda.synchronize()
    kernels = [event.name for event in profile.events()]
    assert any("flash" in name.lower() for name in kernels), kernels
    # the default may choose another fused kernel than the one forced (cuDNN's on Hopper): same attention
    print(f"default vs flash: max |difference| {(default - flash).abs().max().item():.3g}")
    torch.testing.assert_close(default, flash, atol=3e-2, rtol=3e-2)


def test_the_xformers_backend_matches_sdpa_or_falls_back_to_it():
    from dinov2.layers import Attention, xformers_usable

    torch.manual_seed(0)
    sdpa = Attention(128, 2).cuda()
    xformers = Attention(128, 2, backend="xformers").cuda()
    xformers.load_state_dict(sdpa.state_dict())
    tokens = torch.randn(2, 65, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = sdpa(tokens).float(), xformers(tokens).float()
    print(f"xformers kernels usable on CUDA bf16: {xformers_usable('cuda', torch.bfloat16)}")
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
