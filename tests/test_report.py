"""The report stage: one page over real stage outputs (default data curated by the real stages, evaluation
folders written by the evaluation suite on real Fashion-MNIST images) and training runs in the engine's layout."""

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from dinov2.cli import app
from dinov2.configuration.curation import DedupParams, EmbedParams, RetrieveParams
from dinov2.configuration.evaluation import EvaluateParams
from dinov2.configuration.report import ReportParams
from dinov2.curation.dedup import dedup as run_dedup
from dinov2.curation.embed import embed as run_embed
from dinov2.curation.retrieval import retrieve as run_retrieve
from dinov2.demo_data.ground_truth import score_curation
from dinov2.eval.features import model_fingerprint
from dinov2.eval.report import write_metrics_json, write_report
from dinov2.eval.suite import Backbone, load_evaluated_backbone, run_suite
from dinov2.models import DinoVisionTransformer
from dinov2.report.inputs import EvaluationInput, ReportInputs
from dinov2.report.sections import build_page, choose_groups, split_groups

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def curation(tmp_path_factory, small_default_data) -> dict[str, Path]:
    """prepare-default (the session's small default data: 55 pool images), embed, dedup and retrieve run for real."""
    root = tmp_path_factory.mktemp("curation")
    prepared, _ = small_default_data
    embed = EmbedParams(num_workers=0, device="cpu")
    for name in ("pool", "seed", "eval_test"):
        run_embed(prepared / "manifests" / name / "manifest.parquet", root / "embeddings" / name, embed)
    # Looser than the default thresholds, so that this pool has found copies and wrong merges to draw.
    dedup = DedupParams(k=8, self_threshold=0.98, relative_threshold=0.95)
    run_dedup(root / "embeddings" / "pool", [root / "embeddings" / "eval_test"], root / "dedup", dedup)
    seeds = [root / "embeddings" / "seed"]
    run_retrieve(root / "embeddings" / "pool", root / "dedup" / "kept.parquet", seeds, root / "retrieve",
                    RetrieveParams(n_clusters=4))  # fmt: skip
    return {"prepare": prepared, "dedup": root / "dedup", "retrieve": root / "retrieve"}


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, image_folder) -> dict[str, tuple[Path, Path]]:
    """What `dinov2 evaluate --out DIR --metrics FILE` writes, for raw pixels and a random-init tiny ViT."""
    root = tmp_path_factory.mktemp("evaluate")
    data = image_folder(10, 5)
    params = EvaluateParams(
        dataset="fashion_mnist", train_dir=data / "train", test_dir=data / "test", evaluations=["knn", "retrieval"],
        resize_size=32, crop_size=32, cache_dir=root / "cache", knn={"ks": [10, 20]},
        retrieval={"n_instance_queries": 10},
    )  # fmt: skip
    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=1e-5)
    backbones = {
        "raw_pixels": load_evaluated_backbone("raw_pixels"),
        "random_init": Backbone("tiny_vit", vit.eval(), model_fingerprint(vit)),
    }
    written = {}
    for name, backbone in backbones.items():
        result = run_suite(params, backbone)
        write_report(result, backbone.name, root / name)
        written[name] = (root / name, write_metrics_json(result, backbone.name, root / "metrics" / f"{name}.json"))
    return written


LOSS_PARTS = ("dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")


def write_run(folder: Path, recipe: str, metrics: dict, loss_prefix: str = "") -> Path:
    """A training run folder as the engine leaves it: metrics.json, recipe.json, plots/train.csv (step, then the
    logged values in sorted order); the losses fall by 0.1 a step from 1.0 (each part) and 4.0 (the total)."""
    (folder / "plots").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "recipe.json").write_text(json.dumps({"name": recipe}))
    columns = sorted([f"{loss_prefix}{part}" for part in LOSS_PARTS] + ["lr", "total_loss"])
    lines = [",".join(["step", *columns])]
    for step in range(1, 11):
        values = {name: 1.0 - 0.1 * (step - 1) for name in columns}
        values.update(lr=0.001, total_loss=4.0 - 0.1 * (step - 1))
        lines.append(",".join([str(step), *(f"{values[name]:.6g}" for name in columns)]))
    (folder / "plots" / "train.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    pretrain = {"iteration": 10, "total_loss": 3.1, "knn_top1_k20_init": 0.1, "knn_top1_k20": 0.35}
    distill = {
        "iteration": 10, "total_loss": 3.25, "vits/knn_top1_k20_init": 0.12, "vits/knn_top1_k20": 0.3,
        "teacher/knn_top1_k20_init": 0.35, "teacher/knn_top1_k20": 0.35,
    }  # fmt: skip
    return {
        "pretrain": write_run(root / "pretrain", "tiny-pretrain", pretrain),
        "distill": write_run(root / "distill", "tiny-distill", distill, loss_prefix="vits/"),
    }


def report_cli(*args: str) -> None:
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def report(tmp_path_factory, curation, evaluations, runs) -> Path:
    """The report over every input, tracked in a SQLite MLflow store of its own."""
    root = tmp_path_factory.mktemp("report")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"report": {"duplicate_groups": 4, "images_per_group": 4}}))
    given = [f"--{name}={path}" for name, path in {**curation, **runs}.items()]
    given += [f"--evaluation={name}={folder}:{metrics}" for name, (folder, metrics) in evaluations.items()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        report_cli("--out", str(root / "report"), "--params", str(params), *given)
    return root / "report"


def section(markdown: str, title: str) -> str:
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of a text, header row first, without the separator row and bold marks."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([cell.strip().replace("**", "") for cell in line.strip("|").split(" | ")])
        elif current:
            found.append(current)
            current = []
    return found


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def test_the_headline_table_holds_each_stage_number_as_its_stage_wrote_it(report, curation, evaluations):
    markdown = (report / "report.md").read_text()
    (headline,) = tables(section(markdown, "Headline"))
    assert headline[0] == ["stage", "measure", "value"]
    shown = {(stage, measure): value for stage, measure, value in headline[1:]}
    dedup = json.loads((curation["dedup"] / "metrics.json").read_text())
    retrieve = json.loads((curation["retrieve"] / "metrics.json").read_text())
    scores = score_curation(curation["prepare"] / "ground_truth.parquet", curation["dedup"], curation["retrieve"])
    knn = {name: json.loads(metrics.read_text())["fashion_mnist"]["knn_top1_k20"] for name, (_, metrics) in
           evaluations.items()}  # fmt: skip
    assert shown == {
        ("prepare", "pool images"): "55",
        ("prepare", "planted copies of pool images"): "6",
        ("prepare", "planted copies of test images"): "4",
        ("prepare", "planted distractors"): "5",
        ("dedup", "removed by self-dedup"): str(dedup["dedup/self_removed"]),
        ("dedup", "removed as copies of evaluation images"): str(dedup["dedup/eval_leaks_removed"]),
        ("dedup", "kept"): str(dedup["dedup/kept"]),
        ("dedup", "self-dedup precision (planted)"): percent(scores["curation/pool_duplicate_precision"]),
        ("dedup", "self-dedup recall (planted)"): percent(scores["curation/pool_duplicate_recall"]),
        ("dedup", "planted test copies removed"): percent(scores["curation/test_copies_removed"]),
        ("retrieve", "curated images"): str(retrieve["retrieve/curated"]),
        ("retrieve", "distractor share of the pool"): "9.1%",  # 5 of 55
        ("retrieve", "distractor share of the curated set"): percent(scores["curation/distractor_share_curated"]),
        ("pretrain", "iterations"): "10",
        ("pretrain", "final total loss"): "3.1",
        ("pretrain", "teacher kNN top-1 at init"): "10.0%",
        ("pretrain", "teacher kNN top-1 at the end"): "35.0%",
        ("distill", "iterations"): "10",
        ("distill", "final total loss"): "3.25",
        ("distill", "vits kNN top-1 at init"): "12.0%",
        ("distill", "vits kNN top-1 at the end"): "30.0%",
        ("distill", "teacher (frozen) kNN top-1 at the end"): "35.0%",
        ("evaluate", "raw_pixels: kNN top-1 (k=20)"): percent(knn["raw_pixels"]),
        ("evaluate", "random_init: kNN top-1 (k=20)"): percent(knn["random_init"]),
    }
    # metrics.json holds the same numbers unrounded, for `dvc metrics diff`.
    metrics = json.loads((report / "metrics.json").read_text())
    assert len(metrics) == len(shown)
    assert metrics["prepare/distractors"] == 5 and metrics["dedup/kept"] == dedup["dedup/kept"]
    assert metrics["curation/pool_duplicate_recall"] == scores["curation/pool_duplicate_recall"]
    assert metrics["distill/vits/knn_top1_k20"] == 0.3 and metrics["pretrain/total_loss"] == 3.1
    assert metrics["evaluate/raw_pixels/knn_top1_k20"] == knn["raw_pixels"]
    assert "Missing inputs" not in markdown


def test_curation_shows_the_scores_against_the_planted_copies_and_draws_duplicate_groups(report, curation):
    markdown = (report / "report.md").read_text()
    scores = score_curation(curation["prepare"] / "ground_truth.parquet", curation["dedup"], curation["retrieve"])
    (table,) = tables(section(markdown, "Curation"))
    rows = dict(table[1:])
    found, planted = int(scores["curation/pool_duplicates_found"]), int(scores["curation/pool_duplicates"])
    assert planted == 6
    assert rows["planted copies of pool images found (recall)"] == f"{found} of 6 ({100 * found / 6:.1f}%)"
    removed = int(scores["curation/self_dedup_removed"])
    right = round(scores["curation/pool_duplicate_precision"] * removed)
    precision = rows["self-dedup removals that were a planted copy or its original (precision)"]
    assert precision == f"{right} of {removed} ({100 * right / removed:.1f}%)"
    shares = [percent(scores[f"curation/distractor_share_{key}"]) for key in ("pool", "kept", "curated")]
    assert rows["distractor share: pool \u2192 after dedup \u2192 curated"] == " \u2192 ".join(shares)
    # The grid draws groups of duplicate_groups.parquet: at most 4 (params), of the groups dedup found.
    groups = pq.read_table(curation["dedup"] / "duplicate_groups.parquet").to_pylist()
    n_groups = len({row["representative"] for row in groups})
    assert n_groups >= 2
    caption = re.search(r"\*(\d+) of (\d+) duplicate groups \((\d+) holds? .*, (\d+) merges? ", markdown)
    assert caption is not None
    drawn, total, whole, merged = map(int, caption.groups())
    assert (drawn, total, whole + merged) == (min(4, n_groups), n_groups, n_groups)
    picture = Image.open(report / "figures" / "duplicate_groups.png")
    assert picture.height > drawn * 100  # one row of thumbnails per group


def test_choose_groups_puts_wrong_merges_beside_found_copies():
    """Groups (kept image first): a0 with its copies a1, a2; b0 with b1; c0 with c1; d0 merged with e0
    and with f0 (different garments) — three groups of one family, two wrong merges."""

    def group(*ids):
        return [{"id": image_id, "kept": index == 0} for index, image_id in enumerate(ids)]

    truth = {
        copy: {"id": copy, "kind": "pool_duplicate", "original_id": original, "edit": "flip"}
        for copy, original in (("a1", "a0"), ("a2", "a0"), ("b1", "b0"), ("c1", "c0"))
    }
    groups = [group("b0", "b1"), group("d0", "e0"), group("a0", "a1", "a2"), group("c1", "c0"), group("f0", "d1")]
    right, wrong = split_groups(groups, truth)
    assert [[m["id"] for m in g] for g in right] == [["a0", "a1", "a2"], ["b0", "b1"], ["c1", "c0"]]
    assert [[m["id"] for m in g] for g in wrong] == [["d0", "e0"], ["f0", "d1"]]
    chosen = [(group[0]["id"], verdict) for group, verdict in choose_groups(right, wrong, 3)]
    assert chosen == [("a0", "planted copies"), ("b0", "planted copies"), ("d0", "wrong merge")]
    assert [g[0]["id"] for g, _ in choose_groups(right, wrong, 6)] == ["a0", "b0", "c1", "d0", "f0"]
    assert [g[0]["id"] for g, _ in choose_groups(right[:1], wrong, 3)] == ["a0", "d0", "f0"]
    assert choose_groups(right, wrong, 0) == []


def test_training_shows_losses_and_knn_from_init_to_end(report):
    training = section((report / "report.md").read_text(), "Training")
    runs, knn = tables(training)[0], tables(training)[2]
    assert runs[1:] == [
        ["pretraining", "`tiny-pretrain`", "10", "3.1"],
        ["distillation", "`tiny-distill`", "10", "3.25"],
    ]
    assert knn[1:] == [
        ["pretraining: teacher", "10.0%", "35.0%", "+25.0 pts"],
        ["distillation: vits", "12.0%", "30.0%", "+18.0 pts"],
        ["distillation: teacher (frozen)", "35.0%", "35.0%", "+0.0 pts"],
    ]
    # The loss curves sit side by side in a one-row table, each a real PNG figure.
    assert tables(training)[1] == [
        ["Pretraining losses per iteration", "Distillation losses per iteration"],
        ["![Pretraining losses per iteration](figures/loss_pretrain.png)",
         "![Distillation losses per iteration](figures/loss_distill.png)"],
    ]  # fmt: skip
    for name in ("loss_pretrain", "loss_distill", "knn_init_vs_end"):
        assert Image.open(report / "figures" / f"{name}.png").format == "PNG"


def test_evaluation_has_one_row_per_model_and_the_pictures_side_by_side(report, evaluations):
    evaluation = section((report / "report.md").read_text(), "Evaluation")
    table, pictures = tables(evaluation)
    assert table[0] == ["model", "backbone", "kNN top-1 (k=20)", "class retrieval mAP", "copy retrieval mAP"]
    for row, (name, (_, metrics_file)) in zip(table[1:], evaluations.items(), strict=True):
        metrics = json.loads(metrics_file.read_text())["fashion_mnist"]
        keys = ("knn_top1_k20", "retrieval_class_map", "retrieval_instance_map")
        assert row == [
            name,
            f"`{json.loads(metrics_file.read_text())['backbone']}`",
            *(percent(metrics[k]) for k in keys),
        ]
    # Raw pixels have no patch tokens: only the ViT has a PCA picture, copied byte for byte.
    assert pictures == [["random_init"], ["![random_init](figures/pca_patches_random_init.png)"]]
    copied = (report / "figures" / "pca_patches_random_init.png").read_bytes()
    assert copied == (evaluations["random_init"][0] / "pca_patches.png").read_bytes()
    assert "No such picture for raw_pixels" in evaluation


def write_evaluation(folder: Path, backbone: str, metrics: dict) -> EvaluationInput:
    folder.mkdir()
    (folder / "evaluate.json").write_text(json.dumps({"backbone": backbone, "fashion_mnist": metrics}))
    return EvaluationInput.parse(f"{folder.name}={folder}:{folder / 'evaluate.json'}")


def test_the_page_says_plainly_where_raw_pixels_win(tmp_path):
    given = [
        write_evaluation(tmp_path / "raw_pixels", "raw_pixels",
                         {"knn_top1_k20": 0.76, "logreg_top1": 0.8, "retrieval_instance_map": 0.5}),
        write_evaluation(tmp_path / "teacher", "run/teacher/backbone.safetensors",
                         {"knn_top1_k20": 0.7, "logreg_top1": 0.85, "retrieval_instance_map": 0.5,
                          "segmentation_miou": 0.4}),
        write_evaluation(tmp_path / "student", "run/vits/backbone.safetensors",
                         {"knn_top1_k20": 0.65, "logreg_top1": 0.82, "retrieval_instance_map": 0.45,
                          "segmentation_miou": 0.3}),
    ]  # fmt: skip
    page, metrics = build_page(ReportInputs(evaluations=given), ReportParams())
    from dinov2.report.page import render_markdown

    evaluation = section(render_markdown(page), "Evaluation")
    assert tables(evaluation)[0][1:] == [
        ["raw_pixels", "`raw_pixels`", "76.0%", "80.0%", "50.0%", "\u2014"],
        ["teacher", "`backbone.safetensors`", "70.0%", "85.0%", "50.0%", "40.0%"],
        ["student", "`backbone.safetensors`", "65.0%", "82.0%", "45.0%", "30.0%"],
    ]
    assert "| raw_pixels | `raw_pixels` | **76.0%** | 80.0% | **50.0%** | \u2014 |" in evaluation
    assert (
        "**Raw pixels beat or tie every other model on kNN top-1 (k=20) (76.0% vs 70.0% for teacher), "
        "copy retrieval mAP (50.0% vs 50.0% for teacher).** The ViT features lead on logistic regression top-1 "
        "(80.0% vs 85.0% for teacher)." in evaluation
    )
    assert metrics == {
        "evaluate/raw_pixels/knn_top1_k20": 0.76,
        "evaluate/teacher/knn_top1_k20": 0.7,
        "evaluate/student/knn_top1_k20": 0.65,
    }
    markdown = render_markdown(page)
    assert "**Missing inputs:** --prepare, --dedup, --retrieve, --pretrain, --distill not given" in markdown


class References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.references: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action", "poster"):
                self.references.append((tag, name, value))


def test_the_html_page_is_self_contained(report):
    page = (report / "report.html").read_text()
    parsed = References()
    parsed.feed(page)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parsed.tags)
    assert all(tag == "img" and name == "src" for tag, name, _ in parsed.references)
    assert all(value.startswith("data:image/png;base64,") for _, _, value in parsed.references)
    assert "http://" not in page and "https://" not in page and "url(" not in page
    # Every figure of the Markdown version is in the page, byte for byte.
    embedded = sorted(base64.b64decode(value.partition(",")[2]) for _, _, value in parsed.references)
    assert embedded == sorted(path.read_bytes() for path in (report / "figures").iterdir())
    assert all(Image.open(io.BytesIO(png)).format == "PNG" for png in embedded)


def test_the_markdown_names_only_pictures_that_are_in_the_report_folder(report):
    markdown = (report / "report.md").read_text()
    named = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(set(named)) == sorted(f"figures/{path.name}" for path in (report / "figures").iterdir())
    assert not list(report.parent.glob(".*partial"))


def test_with_only_dedup_the_page_renders_and_names_what_is_missing(curation, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    report_cli("--out", str(tmp_path / "report"), "--dedup", str(curation["dedup"]))
    markdown = (tmp_path / "report" / "report.md").read_text()
    missing = "**Missing inputs:** --prepare, --retrieve, --pretrain, --distill, --evaluation not given"
    assert missing in markdown.splitlines()[3]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert sorted(metrics) == ["dedup/eval_leaks_removed", "dedup/kept", "dedup/self_removed"]
    # Without the pool manifest the report shows the grid dedup drew itself.
    drawn = (curation["dedup"] / "plots" / "duplicate_groups.png").read_bytes()
    assert (tmp_path / "report" / "figures" / "duplicate_groups.png").read_bytes() == drawn
    assert "Not reported: give `--pretrain` and `--distill`." in section(markdown, "Training")

    report_cli("--out", str(tmp_path / "empty"))
    assert json.loads((tmp_path / "empty" / "metrics.json").read_text()) == {}
    assert "Nothing to report: no input was given." in (tmp_path / "empty" / "report.html").read_text()


def test_the_mlflow_run_holds_the_page_its_figures_and_metrics(mlflow_uri, runs, tmp_path):
    report_cli("--out", str(tmp_path / "report"), "--pretrain", str(runs["pretrain"]))
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dinov2/report").experiment_id])
    assert run.data.metrics == {
        "pretrain/iteration": 10,
        "pretrain/total_loss": 3.1,
        "pretrain/knn_top1_k20_init": 0.1,
        "pretrain/knn_top1_k20": 0.35,
    }
    assert run.data.tags["dinov2.stage"] == "report"
    listed = {item.path for item in client.list_artifacts(run.info.run_id, "report")}
    assert listed == {"report/report.md", "report/report.html", "report/metrics.json", "report/figures"}
    figures = {item.path for item in client.list_artifacts(run.info.run_id, "report/figures")}
    assert figures == {"report/figures/loss_pretrain.png", "report/figures/knn_init_vs_end.png"}
    page = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report/report.html",
                                               dst_path=str(tmp_path / "download"))  # fmt: skip
    assert Path(page).read_text() == (tmp_path / "report" / "report.html").read_text()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: ReportInputs(dedup=tmp / "missing"), "--dedup {tmp}/missing: no such folder"),
        (lambda tmp: ReportInputs(retrieve=tmp), "--retrieve {tmp} has no curated.parquet"),
        (lambda tmp: ReportInputs(evaluations=[EvaluationInput.parse(f"teacher={tmp}")]),
         "--evaluation teacher: no metrics file {tmp}/metrics.json"),
        (lambda tmp: ReportInputs(evaluations=[EvaluationInput.parse(f"a={tmp}:{tmp}/m.json")] * 2),
         "--evaluation names must be unique; repeated: a"),
        (lambda tmp: EvaluationInput.parse(str(tmp)), "expected NAME=DIR or NAME=DIR:METRICS.json"),
    ],
)  # fmt: skip
def test_bad_inputs_are_named_before_any_work(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        make(tmp_path).check()
    assert message.format(tmp=tmp_path) in str(raised.value)


def test_unreadable_stage_outputs_are_named(tmp_path, runs):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"backbone": "x", "a": {}, "b": {}}))
    with pytest.raises(ValueError, match="expected .*found keys \\['a', 'b', 'backbone'\\]"):
        build_page(ReportInputs(evaluations=[EvaluationInput.parse(f"x={tmp_path / 'eval'}")]), ReportParams())
    run = tmp_path / "run"
    write_run(run, "r", {"iteration": 1})
    (run / "plots" / "train.csv").write_text("iteration,loss\n1,2.0\n")
    with pytest.raises(ValueError, match=f"{run / 'plots' / 'train.csv'} must start with a header"):
        build_page(ReportInputs(pretrain=run), ReportParams())


def test_a_missing_input_path_is_a_one_line_error_with_exit_code_2_and_the_last_report_stays(
    tmp_path, runs, run_dinov2
):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.html").write_text("the last complete report")
    result = run_dinov2(
        "report", "--out", str(out), "--pretrain", str(runs["pretrain"]), "--distill", str(tmp_path / "no_such_run"),
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout.strip() == f"error: --distill {tmp_path / 'no_such_run'}: no such folder"
    assert "Traceback" not in result.stderr
    assert [path.name for path in tmp_path.iterdir() if path.name != "report"] == []
    assert (out / "report.html").read_text() == "the last complete report"
