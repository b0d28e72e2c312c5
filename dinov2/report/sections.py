"""The page's content, built from what the stages wrote: headline numbers, curation, training, evaluation.

Every number shown in the headline table is also a key of the report's ``metrics.json`` (and an MLflow
metric of the report run): ``prepare/...``, ``dedup/...``, ``curation/...`` (``score_curation``),
``retrieve/curated``, ``pretrain/...``, ``distill/<model>/...`` and ``evaluate/<name>/<metric>``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dinov2.configuration.report import ReportParams
from dinov2.report import figures
from dinov2.report.inputs import Curation, Evaluation, ReportInputs, TrainingRun
from dinov2.report.page import Gallery, Page, Picture, Section, Table, Text

DASH = "\u2014"
KNN_KEY = "knn_top1_k20"
# Evaluation table columns: metric key of `dinov2 evaluate` -> header.
EVALUATION_COLUMNS = {
    "knn_top1_k20": "kNN top-1 (k=20)",
    "linear_top1": "linear top-1",
    "logreg_top1": "logistic regression top-1",
    "retrieval_class_map": "class retrieval mAP",
    "retrieval_instance_map": "copy retrieval mAP",
    "segmentation_miou": "segmentation mIoU (proxy)",
}
EVALUATION_HEADLINES = ("knn_top1_k20", "linear_top1")
PICTURE_TITLES = {
    "pca_patches": "PCA of patch features: the first three components as RGB, same test images for every model",
    "segmentation_overlay": "Segmentation proxy: predicted tile classes over the 2x2 mosaics",
}


@dataclass
class Headline:
    stage: str
    label: str
    key: str  # in metrics.json
    value: float
    kind: str  # count, share or loss

    @property
    def shown(self) -> str:
        return format_value(self.value, self.kind)


def format_value(value: float, kind: str) -> str:
    if kind == "count":
        return str(int(value))
    if kind == "share":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def build_page(inputs: ReportInputs, params: ReportParams) -> tuple[Page, dict[str, float]]:
    """The page and its headline numbers (``metrics.json``)."""
    headlines: list[Headline] = []
    sections = [
        _curation(inputs, Curation.read(inputs), params, headlines),
        _training(inputs, headlines),
        _evaluation([Evaluation.read(given) for given in inputs.evaluations], headlines),
    ]
    headline_table = Table(["stage", "measure", "value"], [[h.stage, h.label, h.shown] for h in headlines])
    headline = Section("Headline", [headline_table] if headlines else [Text("Nothing to report: no input was given.")])
    notes = [f"Read: {', '.join(_read(inputs)) or 'nothing'}."]
    missing = inputs.not_given()
    if missing:
        notes.append(f"**Missing inputs:** {', '.join(missing)} not given; their parts of the page are left out.")
    page = Page("DINOv2 pipeline report", notes, [headline, *sections])
    return page, {h.key: float(h.value) for h in headlines}


def _read(inputs: ReportInputs) -> list[str]:
    given = [f"`--{stage} {folder}`" for stage, folder in vars(inputs).items() if isinstance(folder, Path)]
    return given + [f"`--evaluation {e.name}={e.folder}`" for e in inputs.evaluations]


def _share_of(part: float, whole: float) -> str:
    return f"{int(part)} of {int(whole)} ({100 * part / whole:.1f}%)" if whole else f"{int(part)} of 0"


def _curation(inputs: ReportInputs, curation: Curation, params: ReportParams, headlines: list[Headline]) -> Section:
    section = Section("Curation")
    if curation.prepare_metrics is None and curation.dedup_metrics is None and curation.retrieve_metrics is None:
        section.blocks.append(Text("Not reported: give `--prepare`, `--dedup` and `--retrieve`."))
        return section

    def add(metrics: dict[str, Any] | None, stage: str, key: str, label: str, kind: str = "count") -> None:
        if metrics is not None and key in metrics:
            headlines.append(Headline(stage, label, key, metrics[key], kind))

    prepare = curation.prepare_metrics
    add(prepare, "prepare", "prepare/pool_images", "pool images")
    add(prepare, "prepare", "prepare/planted_pool_duplicates", "planted copies of pool images")
    add(prepare, "prepare", "prepare/planted_test_copies", "planted copies of test images")
    if prepare is not None and "prepare/distractor_digits" in prepare:
        distractors = prepare["prepare/distractor_digits"] + prepare.get("prepare/distractor_photos", 0)
        headlines.append(Headline("prepare", "planted distractors", "prepare/distractors", distractors, "count"))
    dedup = curation.dedup_metrics
    add(dedup, "dedup", "dedup/self_removed", "removed by self-dedup")
    add(dedup, "dedup", "dedup/eval_leaks_removed", "removed as copies of evaluation images")
    add(dedup, "dedup", "dedup/kept", "kept")
    scores = curation.scores
    add(scores, "dedup", "curation/pool_duplicate_precision", "self-dedup precision (planted)", "share")
    add(scores, "dedup", "curation/pool_duplicate_recall", "self-dedup recall (planted)", "share")
    add(scores, "dedup", "curation/test_copies_removed", "planted test copies removed", "share")
    add(curation.retrieve_metrics, "retrieve", "retrieve/curated", "curated images")
    add(scores, "retrieve", "curation/distractor_share_pool", "distractor share of the pool", "share")
    add(scores, "retrieve", "curation/distractor_share_curated", "distractor share of the curated set", "share")

    if scores is None:
        section.blocks.append(
            Text("Planted copies and distractors are scored only with all of `--prepare`, `--dedup`, `--retrieve`.")
        )
    else:
        section.blocks += _curation_scores(scores)
    if curation.groups and params.duplicate_groups:
        section.blocks += _duplicate_groups(curation, params)
    elif curation.dedup_metrics is not None and not curation.groups:
        section.blocks.append(Text("Self-dedup found no duplicate groups."))
    return section


def _curation_scores(scores: dict[str, float]) -> list:
    rows = []
    found, planted = scores["curation/pool_duplicates_found"], scores["curation/pool_duplicates"]
    rows.append(["planted copies of pool images found (recall)", _share_of(found, planted)])
    for family, label in (
        ("photometric", "recall on copies with photometric edits only (flip, brightness, JPEG)"),
        ("geometric", "recall on copies with a geometric edit (crop, rotate)"),
    ):
        key = f"curation/pool_duplicate_recall_{family}"
        if key in scores:
            rows.append([label, format_value(scores[key], "share")])
    removed = scores["curation/self_dedup_removed"]
    if "curation/pool_duplicate_precision" in scores:
        right = round(scores["curation/pool_duplicate_precision"] * removed)
        rows.append(
            ["self-dedup removals that were a planted copy or its original (precision)", _share_of(right, removed)]
        )
    copies = scores["curation/test_copies"]
    if "curation/test_copies_removed" in scores:
        gone = round(scores["curation/test_copies_removed"] * copies)
        rows.append(["planted copies of test images removed (self or relative dedup)", _share_of(gone, copies)])
    rows.append(["planted test copies left in the curated set", str(int(scores["curation/test_copies_in_curated"]))])
    shares = {
        name: scores[f"curation/distractor_share_{key}"]
        for name, key in (("pool", "pool"), ("after dedup", "kept"), ("curated", "curated"))
        if f"curation/distractor_share_{key}" in scores
    }
    if shares:
        arrow = " \u2192 "
        shown = arrow.join(format_value(value, "share") for value in shares.values())
        rows.append(["distractor share: " + arrow.join(shares), shown])
    if "curation/unplanted_removed_share" in scores:
        unplanted = scores["curation/unplanted_removed"]
        rows.append(
            [
                "pool's own images removed (an original counts when its copy was kept instead)",
                f"{int(unplanted)} ({format_value(scores['curation/unplanted_removed_share'], 'share')})",
            ]
        )
    blocks: list = [Table(["measured against the planted ground truth", "value"], rows)]
    if shares:
        blocks.append(
            Picture("distractor_share", figures.distractor_shares(shares), "Out-of-domain distractors along curation")
        )
    return blocks


def _family(image_id: str, truth: dict[str, dict[str, Any]]) -> str:
    """A planted pool duplicate belongs to its original's family; any other image is its own family."""
    row = truth.get(image_id)
    return row["original_id"] if row is not None and row["kind"] == "pool_duplicate" else image_id


def _caption(member: dict[str, Any], truth: dict[str, dict[str, Any]], originals: set[str]) -> str:
    row = truth.get(member["id"])
    if row is None:
        role = "original" if member["id"] in originals else ("pool image" if truth else Path(member["id"]).name)
    elif row["kind"] == "distractor":
        role = "distractor"
    else:
        kind = "copy" if row["kind"] == "pool_duplicate" else "test copy"
        role = f"{kind}\n" + "\n".join(row["edit"].split("+"))
    return f"KEPT\n{role}" if member["kept"] else role


def _thumbnail(path: str | None) -> np.ndarray | None:
    if path is None or not Path(path).is_file():
        return None
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def split_groups(groups: list[list[dict[str, Any]]], truth: dict[str, dict[str, Any]]) -> tuple[list, list]:
    """Duplicate groups that hold one family (an original and its planted copies) and groups that merge
    different images, each largest first."""
    right, wrong = [], []
    for group in sorted(groups, key=len, reverse=True):
        families = {_family(member["id"], truth) for member in group}
        (right if len(families) == 1 else wrong).append(group)
    return right, wrong


def choose_groups(right: list, wrong: list, count: int) -> list[tuple[list[dict[str, Any]], str]]:
    """``count`` groups to draw, mistakes beside successes: up to half are wrong merges when there are any,
    and either kind fills the rows the other cannot."""
    n_wrong = min(len(wrong), count // 2)
    n_right = min(len(right), count - n_wrong)
    n_wrong = min(len(wrong), count - n_right)
    return [(group, "planted copies") for group in right[:n_right]] + [
        (group, "wrong merge") for group in wrong[:n_wrong]
    ]


def _duplicate_groups(curation: Curation, params: ReportParams) -> list:
    truth = curation.truth
    if not truth:
        if curation.dedup_plot is None:
            return [Text("Duplicate groups are drawn with `--prepare` (the pool manifest names the images).")]
        caption = "Duplicate groups as `dinov2 dedup` drew them (kept image framed in red)"
        return [Picture("duplicate_groups", curation.dedup_plot.read_bytes(), caption)]
    originals = {row["original_id"] for row in truth.values() if row["kind"] == "pool_duplicate"}
    right, wrong = split_groups(curation.groups, truth)
    chosen = choose_groups(right, wrong, params.duplicate_groups)
    rows = []
    for group, verdict in chosen:
        shown = group[: params.images_per_group]
        more = f"\n(+{len(group) - len(shown)} more)" if len(group) > len(shown) else ""
        cells = [
            figures.Cell(_thumbnail(curation.paths.get(m["id"])), _caption(m, truth, originals), m["kept"])
            for m in shown
        ]
        rows.append((f"{len(group)} images\n{verdict}{more}", cells))
    holds, merges = ("holds" if len(right) == 1 else "hold"), ("merges" if len(wrong) == 1 else "merge")
    caption = (
        f"{len(rows)} of {len(curation.groups)} duplicate groups ({len(right)} {holds} one original and its planted "
        f"copies, {len(wrong)} {merges} different images); the kept image is framed in red, captions give the "
        "planted edits"
    )
    return [Picture("duplicate_groups", figures.image_rows(rows), caption)]


def _students(metrics: dict[str, Any]) -> list[str]:
    names = {key.rpartition("/")[0] for key in metrics if key.endswith(f"/{KNN_KEY}")}
    return sorted(names - {"teacher"})


def _training(inputs: ReportInputs, headlines: list[Headline]) -> Section:
    section = Section("Training")
    runs = {
        stage: TrainingRun.read(folder)
        for stage, folder in (("pretrain", inputs.pretrain), ("distill", inputs.distill))
        if folder is not None
    }
    if not runs:
        section.blocks.append(Text("Not reported: give `--pretrain` and `--distill`."))
        return section
    titles = {"pretrain": "pretraining", "distill": "distillation"}
    table, curves, knn_rows, notes = [], [], [], []
    for stage, run in runs.items():
        metrics = run.metrics
        iterations = metrics.get("iteration")
        loss = metrics.get("total_loss")
        table.append(
            [
                titles[stage],
                f"`{run.recipe_name}`",
                DASH if iterations is None else format_value(iterations, "count"),
                DASH if loss is None else format_value(loss, "loss"),
            ]
        )
        if iterations is not None:
            headlines.append(Headline(stage, "iterations", f"{stage}/iteration", iterations, "count"))
        if loss is not None:
            headlines.append(Headline(stage, "final total loss", f"{stage}/total_loss", loss, "loss"))
        if run.history is None:
            notes.append(f"`{run.folder}` has no `plots/train.csv`: no loss curve for {titles[stage]}.")
        else:
            png = figures.loss_curves(run.history, f"{titles[stage]} ({run.recipe_name})")
            curves.append(Picture(f"loss_{stage}", png, f"{titles[stage].capitalize()} losses per iteration"))
        models = [("", "teacher")] if stage == "pretrain" else [(f"{name}/", name) for name in _students(metrics)]
        if stage == "distill" and f"teacher/{KNN_KEY}" in metrics:
            models.append(("teacher/", "teacher (frozen)"))
        for prefix, model in models:
            init, end = metrics.get(f"{prefix}{KNN_KEY}_init"), metrics.get(f"{prefix}{KNN_KEY}")
            if init is None and end is None:
                continue
            knn_rows.append((f"{titles[stage]}: {model}", init, end))
            key = f"{stage}/{prefix}{KNN_KEY}"
            if init is not None and not prefix.startswith("teacher"):
                headlines.append(Headline(stage, f"{model} kNN top-1 at init", f"{key}_init", init, "share"))
            if end is not None:
                headlines.append(Headline(stage, f"{model} kNN top-1 at the end", key, end, "share"))
    section.blocks.append(Table(["run", "recipe", "iterations", "final total loss"], table))
    section.blocks += [Text(note) for note in notes]
    if curves:
        section.blocks.append(Gallery(curves))
    if knn_rows:

        def shown(value: float | None) -> str:
            return DASH if value is None else format_value(value, "share")

        rows = [
            [label, shown(init), shown(end), DASH if None in (init, end) else f"{100 * (end - init):+.1f} pts"]
            for label, init, end in knn_rows
        ]
        section.blocks.append(Table(["model (kNN top-1, k=20, on the run's kNN set)", "init", "end", "change"], rows))
        section.blocks.append(Picture("knn_init_vs_end", figures.knn_change(knn_rows), "kNN top-1 from init to end"))
    return section


def _evaluation(evaluations: list[Evaluation], headlines: list[Headline]) -> Section:
    from dinov2.eval.suite import RAW_PIXELS

    section = Section("Evaluation")
    if not evaluations:
        section.blocks.append(Text("Not reported: give `--evaluation NAME=DIR[:METRICS.json]` once per model."))
        return section
    columns = [key for key in EVALUATION_COLUMNS if any(key in e.metrics for e in evaluations)]
    datasets = sorted({e.dataset for e in evaluations})
    one_dataset = len(datasets) == 1
    best = {key: max(e.metrics[key] for e in evaluations if key in e.metrics) for key in columns}
    rows = []
    for evaluation in evaluations:
        cells = [evaluation.name, f"`{Path(evaluation.backbone).name}`"]
        cells += [] if one_dataset else [evaluation.dataset]
        for key in columns:
            value = evaluation.metrics.get(key)
            text = DASH if value is None else format_value(value, "share")
            cells.append(f"**{text}**" if value is not None and value == best[key] and len(evaluations) > 1 else text)
        rows.append(cells)
        for key in EVALUATION_HEADLINES:
            if key in evaluation.metrics:
                label = f"{evaluation.name}: {EVALUATION_COLUMNS[key]}"
                headlines.append(
                    Headline("evaluate", label, f"evaluate/{evaluation.name}/{key}", evaluation.metrics[key], "share")
                )
    header = ["model", "backbone", *([] if one_dataset else ["dataset"]), *(EVALUATION_COLUMNS[k] for k in columns)]
    where = f"on `{datasets[0]}`" if one_dataset else "on the datasets named per row"
    section.blocks.append(Text(f"Frozen features {where}; the best value of each column in bold. {DASH}: not run."))
    section.blocks.append(Table(header, rows))
    section.blocks.append(Text(_raw_pixel_verdict(evaluations, columns, RAW_PIXELS)))
    for picture, title in PICTURE_TITLES.items():
        shown = [e for e in evaluations if picture in e.pictures]
        if not shown:
            continue
        section.blocks.append(Text(f"**{title}.**"))
        pictures = [Picture(f"{picture}_{e.name}", e.pictures[picture].read_bytes(), e.name) for e in shown]
        section.blocks.append(Gallery(pictures))
        absent = [e.name for e in evaluations if picture not in e.pictures]
        if absent:
            section.blocks.append(Text(f"No such picture for {', '.join(absent)} (no patch features or not run)."))
    return section


def _raw_pixel_verdict(evaluations: list[Evaluation], columns: list[str], raw_pixels: str) -> str:
    """Where the raw-pixel baseline beats or ties every learned model, said plainly."""
    baselines = [e for e in evaluations if e.backbone == raw_pixels]
    learned = [e for e in evaluations if e.backbone != raw_pixels]
    if not baselines:
        return f"No raw-pixel baseline given (`--evaluation NAME=DIR` of `dinov2 evaluate --backbone {raw_pixels}`)."
    if not learned:
        return "Only raw-pixel baselines given: no ViT to compare with."
    baseline = baselines[0]
    wins, losses = [], []
    for key in columns:
        if key not in baseline.metrics or not any(key in e.metrics for e in learned):
            continue
        leader = max((e for e in learned if key in e.metrics), key=lambda e: e.metrics[key])
        pixels, best = baseline.metrics[key], leader.metrics[key]
        scores = f"{format_value(pixels, 'share')} vs {format_value(best, 'share')} for {leader.name}"
        (wins if pixels >= best else losses).append(f"{EVALUATION_COLUMNS[key]} ({scores})")
    if wins:
        text = f"**Raw pixels beat or tie every other model on {', '.join(wins)}.**"
        return text + (f" The ViT features lead on {', '.join(losses)}." if losses else "")
    if losses:
        return f"Raw pixels win on no metric: the best ViT leads on {', '.join(losses)}."
    return "Raw pixels and the ViTs share no metric to compare."
