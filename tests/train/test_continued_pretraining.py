"""Continued pretraining (`dinov2 pretrain --init SOURCE`): a released-layout backbone without heads gets its heads
fitted on the frozen backbone first, then everything trains with the recipe; a source that brings heads starts
with them; a wrong source is refused before any step; a run stopped in either phase resumes in it.

The released-layout backbone is a tiny ViT (width 64, 4 blocks, patch 4: cpu_tiny's student) saved as a plain
state dict in a .pth, as the released hub weights are; the data are Fashion-MNIST images."""

import csv
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dinov2.configuration.recipes import DistillRecipe, load_recipe
from dinov2.models import DinoVisionTransformer

# 4 iterations of 8 images (2 "epochs" of 2), checkpoints every 2; 6 head-fitting iterations first, at a high lr
# so that heads fit in so few
RECIPE = [
    "train.iterations_per_epoch=2", "optim.epochs=2", "train.batch_size=8", "checkpoint.every_n_iterations=2",
    "init.head_fitting.iterations=6", "init.head_fitting.base_lr=0.1",
]  # fmt: skip
# Measured (seeded, bitwise reproducible on CPU): total loss at the first iteration 7.533 after head fitting, 8.854
# with random heads (-15%); the teacher's DINO targets sharper (entropy / ln K 0.17 vs 0.46), the same number of
# prototypes in use (2 of 1024 on this untrained backbone) and no collapse (bottleneck cosine 0.76 vs 0.77)
FITTED_LOSS_SHARE_OF_RANDOM = 0.95


def released_backbone(path: Path, **architecture) -> dict[str, torch.Tensor]:
    """A tiny ViT saved as the released hub weights are (`torch.save(backbone.state_dict())`); its state dict."""
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, init_values=1.0)
    backbone = DinoVisionTransformer(**{**options, **architecture})
    torch.save(backbone.state_dict(), path)
    return backbone.state_dict()


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def exported(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / "backbone.safetensors")), **load_file(str(folder / "heads.safetensors"))}


TIMINGS = ("images_per_second", "peak_memory_gib")


def rows(run: Path) -> list[dict[str, float]]:
    """The run's plots/train.csv, one mapping per iteration, without the timings (which no two runs share)."""
    with open(run / "plots" / "train.csv") as handle:
        return [{k: float(v) for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def images(image_folder) -> Path:
    """20 training and 10 test Fashion-MNIST images per class."""
    return image_folder(20, 10)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("released") / "tiny_vit4_pretrain.pth"
    return path, released_backbone(path)


@pytest.fixture(scope="module")
def fitted_run(images, released, tmp_path_factory, run_dinov2) -> tuple[Path, str]:
    """`dinov2 pretrain --init RELEASED.pth` on cpu_tiny, as a user runs it: (its run folder, its MLflow store)."""
    folder = tmp_path_factory.mktemp("fitted")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    overrides = [word for key in RECIPE for word in ("--set", key)]
    run_dinov2(
        "pretrain", "--recipe", "cpu_tiny", "--init", str(released[0]), *overrides, "--data", str(images / "train"),
        "--output", str(folder / "run"), env={**os.environ, "MLFLOW_TRACKING_URI": store}, check=True,
    )  # fmt: skip
    return folder / "run", store


@pytest.mark.slow
def test_heads_are_fitted_first_on_the_unchanged_backbone_and_start_the_run_lower(fitted_run, released):
    run, store = fitted_run
    source_hash = weights_hash(released[1])
    fitting = run / "head_fitting"
    # head fitting ran first, as a run of its own: its 6 iterations logged to train.csv, then the 4 of the run
    assert [row["step"] for row in rows(fitting)] == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in rows(run)] == [1, 2, 3, 4]
    assert json.loads((fitting / "metrics.json").read_text())["iteration"] == 6
    # the backbone did not move while the heads were fitted, and the run starts from it with the fitted heads
    assert weights_hash(load_file(str(fitting / "teacher" / "backbone.safetensors"))) == source_hash
    start = run / "exports" / "iter_0000000" / "teacher"
    assert weights_hash(load_file(str(start / "backbone.safetensors"))) == source_hash
    fitted_heads = load_file(str(fitting / "teacher" / "heads.safetensors"))
    assert weights_hash(load_file(str(start / "heads.safetensors"))) == weights_hash(fitted_heads)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["init/heads_fitted"], metrics["init/head_fitting_iterations"], metrics["iteration"]) == (1, 6, 4)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("dinov2/pretrain").experiment_id])
    by_phase = {r.data.tags.get("dinov2.phase", "training"): r for r in runs}
    assert sorted(by_phase) == ["head_fitting", "training"] and len(runs) == 2
    head_fitting = by_phase["head_fitting"]
    steps = [m.step for m in client.get_metric_history(head_fitting.info.run_id, "train/total_loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert head_fitting.data.tags["dinov2.init"] == str(released[0])
    assert by_phase["training"].data.tags["dinov2.init_heads"] == "fitted"
    assert by_phase["training"].info.run_id == (run / "mlflow_run_id").read_text().strip()


CONTINUE = """
import json, sys
from pathlib import Path
from dinov2.configuration.recipes import load_recipe
from dinov2.train.pretrain import pretrain

data, output, steps = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
recipe = load_recipe("cpu_tiny", sys.argv[4:])
for max_iterations in steps:
    result = pretrain(recipe, data, output, max_iterations=max_iterations)
    print(json.dumps({"iteration": result.iteration, "folder": result.output_dir.name}))
"""


def continue_from(source: str, images: Path, output: Path, steps: list, *overrides: str) -> list[dict]:
    """Calls of ``pretrain(..., max_iterations=STEP)`` on one run folder, in a child process (a process group
    would outlive the test in this one); what each returned."""
    script = output.parent / f"continue_{output.name}.py"  # not a module name of its own: it would shadow one
    script.write_text(textwrap.dedent(CONTINUE))
    arguments = [str(images / "train"), str(output), json.dumps(steps), f"init.source={source}", *RECIPE, *overrides]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{output.parent / f'{output.name}.db'}"}
    result = subprocess.run(
        [sys.executable, str(script), *arguments], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_the_first_step_loss_is_lower_than_with_random_heads(fitted_run, released, images, tmp_path):
    random_run = tmp_path / "random"
    assert continue_from(str(released[0]), images, random_run, [None], "init.head_fitting.iterations=0") == [
        {"iteration": 4, "folder": "random"}
    ]
    assert not (random_run / "head_fitting").exists()
    assert json.loads((random_run / "metrics.json").read_text())["init/heads_fitted"] == 0
    # the same backbone, data, seed and recipe: only the heads differ
    start = load_file(str(random_run / "exports" / "iter_0000000" / "teacher" / "backbone.safetensors"))
    assert weights_hash(start) == weights_hash(released[1])
    fitted, random = rows(fitted_run[0])[0], rows(random_run)[0]
    print(f"first-iteration loss: fitted heads {fitted['total_loss']:.3f}, random heads {random['total_loss']:.3f}")
    assert fitted["total_loss"] < FITTED_LOSS_SHARE_OF_RANDOM * random["total_loss"]
    # lower, not collapsed: as many prototypes in use, image embeddings no more alike
    assert fitted["collapse/dino_prototypes_used"] >= random["collapse/dino_prototypes_used"]
    assert fitted["collapse/dino_bottleneck_cosine"] < 0.9
    assert fitted["koleo_loss"] == random["koleo_loss"]  # KoLeo sees the backbone only: the same backbone


@pytest.mark.slow
def test_a_run_stopped_in_either_phase_resumes_in_it_to_bitwise_the_same_model(fitted_run, released, images, tmp_path):
    run = tmp_path / "stopped"
    # 4 iterations: head fitting stops at 4 of 6; 4 more: its last 2, then 2 of the run; then the rest of the run
    calls = continue_from(str(released[0]), images, run, [4, 4, None])
    assert calls == [
        {"iteration": 4, "folder": "head_fitting"}, {"iteration": 2, "folder": "stopped"},
        {"iteration": 4, "folder": "stopped"},
    ]  # fmt: skip
    fitting = rows(run / "head_fitting")
    assert [row["step"] for row in fitting] == [1, 2, 3, 4, 5, 6]  # each head-fitting iteration logged once
    assert [row["step"] for row in rows(run)] == [1, 2, 3, 4]
    straight = fitted_run[0]
    assert rows(run / "head_fitting") == rows(straight / "head_fitting")
    again, reference = exported(run / "teacher"), exported(straight / "teacher")
    assert again.keys() == reference.keys()
    assert all(torch.equal(again[key], reference[key]) for key in reference)


@pytest.mark.slow
def test_a_source_with_heads_starts_with_them_and_fits_none(fitted_run, images, tmp_path):
    source = fitted_run[0] / "teacher"  # a run's export: backbone.safetensors + heads.safetensors
    assert continue_from(str(source), images, tmp_path / "again", [1]) == [{"iteration": 1, "folder": "again"}]
    assert not (tmp_path / "again" / "head_fitting").exists()
    start, given = exported(tmp_path / "again" / "exports" / "iter_0000000" / "teacher"), exported(source)
    assert start.keys() == given.keys() and all(torch.equal(start[key], given[key]) for key in given)
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["init/heads_fitted"] == 0


def test_the_student_and_its_ema_start_as_the_source(released):
    from dinov2.train.continued import inspect_init
    from dinov2.train.sources import load_source
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    recipe = load_recipe("cpu_tiny", [f"init.source={released[0]}"])
    spec = inspect_init(recipe)
    assert not spec.has_heads and spec.config["embed_dim"] == 64
    meta = SSLMetaArch(recipe, initial=load_source(spec))
    for name, value in released[1].items():
        assert torch.equal(meta.student.backbone.state_dict()[name], value), name
        assert torch.equal(meta.teacher.backbone.state_dict()[name], value), name
    for name, value in meta.student.dino_head.state_dict().items():
        assert torch.equal(meta.teacher.dino_head.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "init.source {tmp}/nowhere.pth does not exist"),
        ("wider", "init.source {tmp}/wide.pth is not the recipe's student (a ViT with embed_dim 64, depth 4, "
                  "patch 4, 0 registers, ffn mlp, img_size 32): shape mismatch: blocks.0.attn.proj.bias (96,) vs "
                  "model (64,)"),
        ("hub_weights", "init.source dinov2_vits14: weights {tmp}/nowhere.pth do not exist"),
        ("not_a_backbone", "init.source {tmp}/notes.pth: cannot read checkpoint"),
        ("other_heads", "init.source {tmp}/run/teacher: its dino_head is not the recipe's (shape mismatch: "
                        "last_layer.weight_g (512, 1) vs model (1024, 1)"),
    ],
)  # fmt: skip
def test_a_wrong_init_source_is_one_line_and_exit_code_2_before_any_step(case, message, images, tmp_path, cli_error):
    arguments = ["pretrain", "--recipe", "cpu_tiny", "--data", str(images / "train"), "--output", str(tmp_path / "out")]
    if case == "missing":
        arguments += ["--init", str(tmp_path / "nowhere.pth")]
    elif case == "wider":
        released_backbone(tmp_path / "wide.pth", embed_dim=96)
        arguments += ["--init", str(tmp_path / "wide.pth")]
    elif case == "hub_weights":
        arguments += ["--init", "dinov2_vits14", "--init-weights", str(tmp_path / "nowhere.pth")]
    elif case == "not_a_backbone":
        (tmp_path / "notes.pth").write_text("not weights")
        arguments += ["--init", str(tmp_path / "notes.pth")]
    else:
        from dinov2.train.ssl_meta_arch import SSLMetaArch
        from dinov2.train.teacher import export_models

        other = load_recipe("cpu_tiny", ["dino.head_n_prototypes=512"])
        export_models(SSLMetaArch(other).teacher, tmp_path / "run" / "teacher", True, {"recipe": other.name})
        arguments += ["--init", str(tmp_path / "run" / "teacher")]
    output = cli_error(arguments)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert message.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "out").exists()


def test_init_is_for_pretraining_and_student_weights_for_distillation_students(tmp_path):
    from dinov2.configuration import ConfigError

    with pytest.raises(ConfigError, match="to continue pretraining from a backbone set init.source"):
        load_recipe("cpu_tiny", [f"student.pretrained_weights={tmp_path / 'b.pth'}"])
    with pytest.raises(ConfigError, match="distillation students start from student.pretrained_weights"):
        load_recipe("distill_cpu_tiny", [f"init.source={tmp_path / 'b.pth'}"], schema=DistillRecipe)
    with pytest.raises(ConfigError, match="init.weights are the weights of a torch.hub init.source"):
        load_recipe("cpu_tiny", ["init.weights=LVD142M"])


def test_the_params_pretrain_section_carries_the_init_section(tmp_path):
    from dinov2.configuration import ConfigError
    from dinov2.configuration.params import training_recipe

    params = tmp_path / "params.yaml"
    params.write_text(
        "pretrain:\n  recipe: cpu_tiny\n  init:\n    source: runs/teacher\n    head_fitting: {iterations: 5}\n"
    )
    recipe = training_recipe(params, "pretrain")
    assert (recipe.init.source, recipe.init.head_fitting.iterations) == ("runs/teacher", 5)
    assert training_recipe(params, "pretrain", overrides=["init.source=other.pth"]).init.source == "other.pth"
    params.write_text("pretrain:\n  recipe: cpu_tiny\n  init:\n    sourc: runs/teacher\n")
    with pytest.raises(ConfigError, match="unknown key 'init.sourc'"):
        training_recipe(params, "pretrain")


def test_the_continue_vitb14_recipe_starts_from_the_released_vitb14_and_fits_its_heads():
    from dinov2.train.dry_run import dry_run_report

    recipe = load_recipe("continue_vitb14")
    vitb14 = load_recipe("vitb14")
    assert recipe.optim.base_lr < vitb14.optim.base_lr and recipe.optim.warmup_epochs < vitb14.optim.warmup_epochs
    assert recipe.teacher.momentum_teacher > vitb14.teacher.momentum_teacher
    assert 0 < recipe.init.head_fitting.iterations < recipe.total_iterations / 10
    report = dry_run_report(recipe)  # the source is checked against the student on the meta device
    assert report["init"] == {"source": "dinov2_vitb14", "heads": "fitted first: 2500 iterations"}
    assert report["backbone_parameters"] == 86_580_480  # the released ViT-B/14, 518 px position embedding
