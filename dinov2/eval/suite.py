"""The evaluation suite of the ``evaluate`` stage: one backbone, one labelled dataset, the evals chosen in params.

Every check that can fail on user input (folders, labels, class lists, checkpoint, sizes) runs before
any feature is extracted. Features come from one cached pass per split (``probe_tokens``: the CLS
of the last blocks and the mean patch token), from which kNN, logistic regression and retrieval
slice the last CLS token and the linear probe its views.

``raw_pixels`` is a baseline "backbone": flattened RGB in [0, 1], centred by the train-set mean
image (the raw-pixel kNN protocol of the benchmarks); the dense evals do not apply to it.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from dinov2.configuration.evaluation import EvaluateParams
from dinov2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_eval_transform
from dinov2.eval import dense
from dinov2.eval.datasets import LabelledImageFolder, check_same_classes
from dinov2.eval.features import Extraction, FeatureCache, extract, model_fingerprint, probe_tokens, stored_blocks
from dinov2.eval.knn import knn_classify
from dinov2.eval.linear import linear_probe, probe_views
from dinov2.eval.logreg import c_grid, logistic_regression
from dinov2.eval.retrieval import retrieval_metrics

logger = logging.getLogger(__name__)

RAW_PIXELS = "raw_pixels"


@dataclass
class Backbone:
    name: str
    model: nn.Module | None  # None for the raw-pixel baseline
    fingerprint: str


def load_evaluated_backbone(backbone: str, weights: str | None = None) -> Backbone:
    """A hub name (random init without ``weights``), a backbone file (``save_backbone``'s safetensors or a Hugging
    Face folder), or raw_pixels."""
    from dinov2.hub import create, load_backbone
    from dinov2.hub.export import is_backbone_file

    if backbone == RAW_PIXELS:
        if weights:
            raise ValueError("raw_pixels takes no weights")
        return Backbone(RAW_PIXELS, None, RAW_PIXELS)
    if is_backbone_file(backbone):
        if weights:
            raise ValueError(f"{backbone} holds its own weights; drop --weights")
        model = load_backbone(backbone)
    else:
        if weights is None:
            logger.warning("no weights given: evaluating a randomly initialised %s", backbone)
        model = create(backbone, pretrained=weights is not None, **({"weights": weights} if weights else {}))
    return Backbone(backbone, model.eval(), model_fingerprint(model))


class AugmentedCopies(torch.utils.data.Dataset):
    """Copy-detection queries: a seeded random augmentation of each chosen image; the label is the
    image's index in its folder (its one relevant gallery item)."""

    def __init__(self, folder: LabelledImageFolder, indices: list[int], transform: v2.Compose, size: int, seed: int):
        self.folder, self.indices, self.transform, self.seed = folder, indices, transform, seed
        self.augment = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.4, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
            ]
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int] | None:
        index = self.indices[position]
        image = self.folder.read(index)
        if image is None:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            copy = self.augment(image)
        return self.transform(copy), index

    @property
    def fingerprint(self) -> str:
        return f"copies|{self.folder.fingerprint}|{self.seed}|{self.indices}|{self.augment}"


@dataclass
class SuiteResult:
    dataset: str
    metrics: dict[str, float] = field(default_factory=dict)  # short keys: knn_top1_k20, linear_top1, ...
    details: dict[str, Any] = field(default_factory=dict)  # grids and curves for the report
    pictures: dict[str, Image.Image] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _pixel_transform(params: EvaluateParams) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(params.resize_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(params.crop_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def _flat_pixels(model: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


def check_inputs(params: EvaluateParams, backbone: Backbone) -> tuple[LabelledImageFolder, LabelledImageFolder]:
    """Everything that can be wrong with the request, found before any extraction."""
    if not params.evaluations:
        raise ValueError("evaluate.evaluations is empty: name at least one of knn, linear, logreg, ...")
    train = LabelledImageFolder(params.train_dir)
    test = LabelledImageFolder(params.test_dir)
    check_same_classes(train, test)
    if "knn" in params.evaluations and max(params.knn.ks) > len(train):
        raise ValueError(f"kNN k={max(params.knn.ks)} exceeds the {len(train)} training images of {train.root}")
    if backbone.model is not None and params.crop_size % backbone.model.patch_size:
        raise ValueError(
            f"crop_size {params.crop_size} is not a multiple of the patch size {backbone.model.patch_size}"
        )
    if "depth" in params.evaluations and params.depth.root is None:
        raise ValueError("the depth eval needs evaluate.depth.root (NYU-style <root>/{train,test}/{images,depth})")
    return train, test


class _Suite:
    """State shared by the evals of one run: the folders, the cached features and the result."""

    def __init__(self, params: EvaluateParams, backbone: Backbone):
        self.params, self.backbone = params, backbone
        self.train_folder, self.test_folder = check_inputs(params, backbone)
        self.result = SuiteResult(params.dataset)
        self.cache = FeatureCache(params.cache_dir)
        self.model = backbone.model
        self.is_pixels = self.model is None
        if self.is_pixels:
            self.transform = _pixel_transform(params)
        else:
            self.transform = make_eval_transform(params.resize_size, params.crop_size)
        self.train_folder.transform = self.test_folder.transform = self.transform
        self.n_stored = 0 if self.is_pixels else stored_blocks(self.model)

    def features_of(
        self, dataset: torch.utils.data.Dataset, split: str, fn=None, kind: str | None = None
    ) -> Extraction:
        fn = fn or (_flat_pixels if self.is_pixels else probe_tokens)
        kind = kind or (RAW_PIXELS if self.is_pixels else f"probe_tokens{self.n_stored}")
        params = self.params

        def compute() -> Extraction:
            return extract(self.model, dataset, fn, params.batch_size, params.num_workers, params.device, split)

        return self.cache.load_or_extract(self.backbone.fingerprint, dataset, repr(self.transform), kind, compute)

    def class_token(self, features: torch.Tensor) -> torch.Tensor:
        """kNN / logreg / retrieval features: the last CLS token, or the mean-centred pixels."""
        if self.is_pixels:
            return features - self.mean_image
        dim = self.model.embed_dim
        return features[:, (self.n_stored - 1) * dim : self.n_stored * dim]

    def run(self) -> SuiteResult:
        params, result = self.params, self.result
        start = time.perf_counter()
        self.train = self.features_of(self.train_folder, "train")
        self.test = self.features_of(self.test_folder, "test")
        result.seconds["features"] = time.perf_counter() - start
        result.details["skipped_images"] = self.train.skipped + self.test.skipped
        self.mean_image = self.train.features.mean(dim=0, keepdim=True) if self.is_pixels else None
        self.train_cls, self.test_cls = self.class_token(self.train.features), self.class_token(self.test.features)
        runners: dict[str, Callable[[], None]] = {
            "knn": self.knn,
            "linear": self.linear,
            "logreg": self.logreg,
            "retrieval": self.retrieval,
            "segmentation": self.segmentation,
            "depth": self.depth,
        }
        for name in params.evaluations:
            if self.is_pixels and name in ("segmentation", "depth"):
                result.notes.append(f"{name}: not applicable to raw pixels (no patch tokens)")
                continue
            logger.info("running %s", name)
            begin = time.perf_counter()
            runners[name]()
            result.seconds[name] = time.perf_counter() - begin
        if not self.is_pixels:
            result.pictures["pca_patches"] = self.pca_picture()
        result.details["feature_cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        return result

    def knn(self) -> None:
        knn = self.params.knn
        scores = knn_classify(
            self.train_cls, self.train.labels, self.test_cls, self.test.labels, knn.ks, knn.temperature
        )
        self.result.metrics.update(scores)
        self.result.details["knn"] = scores

    def linear(self) -> None:
        linear = self.params.linear
        if self.is_pixels:
            views = {"pixels": (0, self.train.features.shape[1])}
        else:
            views = probe_views(self.n_stored, self.model.embed_dim, linear.n_last_blocks, linear.avgpool)
        probe = linear_probe(
            self.train.features,
            self.train.labels,
            self.test.features,
            self.test.labels,
            views,
            learning_rates=linear.learning_rates,
            epochs=linear.epochs,
            batch_size=linear.batch_size,
            val_fraction=linear.val_fraction,
            seed=self.params.seed,
        )
        self.result.metrics["linear_top1"] = probe.test_top1
        self.result.metrics["linear_val_top1"] = probe.val_top1[probe.selected.name]
        self.result.details["linear"] = {
            "selected_view": probe.selected.view,
            "selected_learning_rate": probe.selected.learning_rate,
            "val_top1": probe.val_top1,
            "views": list(views),
            "learning_rates": list(linear.learning_rates),
        }

    def logreg(self) -> None:
        logreg = self.params.logreg
        fit = logistic_regression(
            self.train_cls,
            self.train.labels,
            self.test_cls,
            self.test.labels,
            c_values=c_grid(logreg.c_min_exp, logreg.c_max_exp, logreg.n_c),
            holdout_fraction=logreg.holdout_fraction,
            max_iter=logreg.max_iter,
            seed=self.params.seed,
        )
        self.result.metrics["logreg_top1"] = fit.test_top1
        self.result.metrics["logreg_c"] = fit.selected_c
        self.result.details["logreg"] = {"holdout_top1": fit.holdout_top1, "selected_c": fit.selected_c}

    def retrieval(self) -> None:
        ks, params = self.params.retrieval.ks, self.params
        by_class = retrieval_metrics(self.test_cls, self.test.labels, self.train_cls, self.train.labels, ks)
        self.result.metrics.update({f"retrieval_class_{key}": value for key, value in by_class.items()})
        generator = torch.Generator().manual_seed(params.seed)
        n_queries = min(params.retrieval.n_instance_queries, len(self.test_folder))
        chosen = sorted(torch.randperm(len(self.test_folder), generator=generator)[:n_queries].tolist())
        copies = AugmentedCopies(self.test_folder, chosen, self.transform, params.crop_size, params.seed)
        queries = self.features_of(copies, "copies")
        # Gallery keys are the test images' own indices; unreadable ones are absent from both sides.
        if self.test.skipped:
            gallery_keys = torch.tensor(
                [i for i in range(len(self.test_folder)) if self.test_folder.read(i) is not None]
            )
        else:
            gallery_keys = torch.arange(len(self.test_folder))
        by_instance = retrieval_metrics(
            self.class_token(queries.features), queries.labels, self.test_cls, gallery_keys, ks
        )
        self.result.metrics.update({f"retrieval_instance_{key}": value for key, value in by_instance.items()})

    def segmentation(self) -> None:
        seg, params = self.params.segmentation, self.params
        if seg.root is None:
            tile = params.crop_size
            tiles = make_eval_transform(tile, tile)
            train = dense.MosaicSegmentation(self.train_folder, seg.n_train_mosaics, tiles, tile, params.seed)
            test = dense.MosaicSegmentation(self.test_folder, seg.n_test_mosaics, tiles, tile, params.seed + 1)
            num_classes = len(self.train_folder.classes)
            self.result.notes.append(
                "segmentation: 2x2-mosaic PROXY set built from the classification images (pixel label = the "
                "tile's class); its mIoU is not comparable with ADE20K numbers"
            )
        else:
            transform = make_eval_transform(seg.size, seg.size)
            train = dense.SegmentationFolder(seg.root / "train", transform, seg.size)
            test = dense.SegmentationFolder(seg.root / "test", transform, seg.size)
            num_classes = dense.ADE20K_CLASSES
        train_maps = self.features_of(train, "seg-train", dense.patch_token_map, "patch_map")
        test_maps = self.features_of(test, "seg-test", dense.patch_token_map, "patch_map")
        head = dense.train_segmentation_head(
            train_maps.features,
            train_maps.labels,
            num_classes,
            epochs=seg.epochs,
            learning_rate=seg.learning_rate,
            seed=params.seed,
        )
        predicted = dense.predict(head, test_maps.features, tuple(test_maps.labels.shape[-2:]))
        scores = dense.segmentation_metrics(predicted, test_maps.labels, num_classes)
        self.result.metrics.update({f"segmentation_{key}": value for key, value in scores.items()})
        shown = [test[i] for i in range(min(4, len(test)))]
        images = [item[0] for item in shown if item is not None]
        self.result.pictures["segmentation_overlay"] = segmentation_overlay(images, predicted[: len(images)])

    def depth(self) -> None:
        depth, params = self.params.depth, self.params
        transform = make_eval_transform(depth.size, depth.size)
        train, test = (
            dense.DepthFolder(depth.root / split, transform, depth.size, depth.depth_scale)
            for split in ("train", "test")
        )
        train_maps = self.features_of(train, "depth-train", dense.patch_token_map, "patch_map")
        test_maps = self.features_of(test, "depth-test", dense.patch_token_map, "patch_map")
        head = dense.train_depth_head(
            train_maps.features,
            train_maps.labels,
            epochs=depth.epochs,
            learning_rate=depth.learning_rate,
            seed=params.seed,
        )
        predicted = dense.predict(head, test_maps.features, tuple(test_maps.labels.shape[-2:]))
        scores = dense.depth_metrics(predicted, test_maps.labels)
        self.result.metrics.update({f"depth_{key}": value for key, value in scores.items()})

    def pca_picture(self) -> Image.Image:
        """First three principal components of the patch features of the first test images (paper, fig. 1)."""
        from dinov2.eval.patch_pca import patch_pca_picture

        shown = [self.test_folder[i] for i in range(min(8, len(self.test_folder)))]
        images = torch.stack([item[0] for item in shown if item is not None]).to(self.params.device)
        with torch.no_grad():
            tokens = self.model.forward_features(images)["x_norm_patchtokens"].float().cpu()
        return patch_pca_picture(tokens, self.params.crop_size // self.model.patch_size)


def run_suite(params: EvaluateParams, backbone: Backbone) -> SuiteResult:
    return _Suite(params, backbone).run()


def segmentation_overlay(images: list[torch.Tensor], predicted: torch.Tensor, cell: int = 128) -> Image.Image:
    """Each image beside its predicted label map blended in (one colour per class), one pair per row."""
    import matplotlib

    palette = torch.tensor(matplotlib.colormaps["tab20"].colors, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    rows = []
    for image, labels in zip(images, predicted, strict=True):
        rgb = (image * std + mean).clamp(0, 1)
        colours = palette[labels.clamp_max(10_000) % len(palette)].permute(2, 0, 1)
        pair = torch.cat([rgb, 0.5 * rgb + 0.5 * colours], dim=2)
        rows.append(torch.nn.functional.interpolate(pair[None], size=(cell, 2 * cell), mode="nearest")[0])
    grid = torch.cat(rows, dim=1)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).astype("uint8"))
