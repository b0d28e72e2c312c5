"""The curation sections of params.yaml: ``prepare``, ``descriptor``, ``embed``, ``dedup`` and ``retrieve``."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dinov2.configuration import Section
from dinov2.configuration.views import parse_views
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, IMAGES_PER_CLASS
from dinov2.demo_data.bundled import DISTRACTOR_PHOTOS, FASHION_MNIST, MNIST_DIGITS

# Images over this many pixels are decoded at a reduced size when they are JPEGs, else skipped: a guard against
# decompression bombs in a crawled pool, the default of every max_pixels key.
DEFAULT_MAX_PIXELS = 40_000_000


def _range(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"a range must be (low, high) with low <= high, got {list(value)}")
    return value


class CopyEditRanges(Section):
    """The edits of a copy and the ranges their strengths are drawn from (``dinov2/copydetect/edits.py``)."""

    edits_per_copy: tuple[int, int] = Field(
        (1, 3), description="How many edits of different kinds, among crop, rotate, flip, brightness, jpeg (5: all)."
    )
    crop_kept: tuple[float, float] = Field((0.80, 0.95), description="Fraction of each side a crop keeps.")
    rotation_degrees: float = Field(10.0, ge=0, le=180, description="Largest rotation, either way.")
    brightness: tuple[float, float] = Field((0.75, 1.25), description="Brightness factor.")
    contrast: tuple[float, float] | None = Field(None, description="A contrast factor with the brightness; none.")
    jpeg_quality: tuple[int, int] = Field((40, 90), description="Lowest and highest JPEG quality.")

    _ranges = field_validator("crop_kept", "brightness", "contrast", "jpeg_quality")(
        lambda value: value if value is None else _range(value)
    )

    @field_validator("edits_per_copy")
    @classmethod
    def _counts(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 5:
            raise ValueError(f"edits_per_copy must satisfy 1 <= low <= high <= 5, got {list(value)}")
        return value


# Stronger than the copies the demo data plants: every edit at once, wider ranges.
STRONG_COPIES = {
    "edits_per_copy": (5, 5), "crop_kept": (0.70, 0.95), "rotation_degrees": 12.0, "brightness": (0.7, 1.3),
    "contrast": (0.7, 1.3), "jpeg_quality": (50, 50),
}  # fmt: skip


class DefaultData(Section):
    """What ``dinov2 prepare-default`` cuts the pipeline's data from, and the sizes it cuts (``dinov2/demo_data/``).

    The checks here need no file; an image folder is checked against the sizes when the stage opens it.
    """

    source: str = Field(
        FASHION_MNIST,
        min_length=1,
        description="fashion_mnist, or the path of an image folder holding train/<class>/ and test/<class>/ "
        "(relative: to the working directory).",
    )
    seed: int = Field(0, description="Seed of every draw: which images go where, which copies, which edits.")
    seed_per_class: int = Field(50, ge=1, description="Labelled seed images per class (from train).")
    pool_images: int = Field(5000, ge=1, description="The source's own train images in the uncurated pool.")
    eval_train_per_class: int = Field(100, ge=1, description="Labelled train images per class for kNN / linear.")
    eval_test_per_class: int = Field(100, ge=1, description="Test images per class.")
    near_twin_correlation: float | None = Field(
        0.95,
        ge=-1,
        le=1,
        description="A source image whose grey pixels correlate this well (mirrored or not) with those of a pool "
        "or an evaluation test image is left out of the pool: a duplicate nobody planted; null keeps them.",
    )
    pool_duplicates: int = Field(250, ge=0, description="Edited copies of pool images planted in the pool.")
    test_copies: int = Field(150, ge=0, description="Edited copies of evaluation test images planted in the pool.")
    distractor_digits: int = Field(500, ge=0, le=MNIST_DIGITS, description="MNIST digits planted in the pool.")
    distractor_photos: int = Field(20, ge=0, le=len(DISTRACTOR_PHOTOS), description="Photos planted in the pool.")
    edits: CopyEditRanges = Field(default_factory=CopyEditRanges, description="The edits of the planted copies.")

    @model_validator(mode="after")
    def _fits_the_source(self) -> "DefaultData":
        if self.source == FASHION_MNIST:
            self._fits_fashion_mnist()
        if self.pool_duplicates > self.pool_images:
            raise ValueError(f"pool_duplicates = {self.pool_duplicates} exceeds pool_images = {self.pool_images}")
        return self

    def _fits_fashion_mnist(self) -> None:
        classes = len(FASHION_MNIST_CLASSES)
        per_class = self.seed_per_class + self.eval_train_per_class
        if per_class > IMAGES_PER_CLASS["train"]:
            raise ValueError(
                f"seed_per_class + eval_train_per_class = {per_class} exceeds the "
                f"{IMAGES_PER_CLASS['train']} train images of a class"
            )
        train_left = classes * (IMAGES_PER_CLASS["train"] - per_class)
        if self.pool_images > train_left:
            raise ValueError(f"pool_images = {self.pool_images} exceeds the {train_left} train images left")
        if self.eval_test_per_class > IMAGES_PER_CLASS["test"]:
            raise ValueError(
                f"eval_test_per_class = {self.eval_test_per_class} exceeds the {IMAGES_PER_CLASS['test']} test "
                "images of a class"
            )
        if self.test_copies > classes * self.eval_test_per_class:
            raise ValueError(
                f"test_copies = {self.test_copies} exceeds the {classes * self.eval_test_per_class} test images"
            )


class PrepareParams(Section):
    labels_from_folders: bool = Field(True, description="Label = name of the image's parent folder.")
    max_pixels: int | None = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Larger JPEGs are checked at 1/2-1/8 scale, other larger images recorded as unreadable.",
    )
    default_data: DefaultData = Field(default_factory=DefaultData)


class EmbedParams(Section):
    model: str = Field(
        "copy_descriptor",
        description="copy_descriptor, raw_pixels, a hub name, a .safetensors, torchhub:repo:name, descriptor:DIR, "
        "sscd:FILE_OR_URL",
    )
    weights: str | None = None
    crop_size: int = Field(224, ge=1)
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(10_000, ge=1, description="Images per .npy shard (the unit of resume); no memory cost.")
    num_workers: int = Field(2, ge=0, description="DataLoader processes that decode images; 0 decodes in-process.")
    max_pixels: int | None = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Larger JPEGs are decoded at 1/2-1/8 scale, other larger images skipped (unreadable.parquet).",
    )
    device: str | None = Field(None, description="cpu, cuda, cuda:1; the GPU when there is one if unset.")
    # Query-side augmentation of copy detection (views.py): each image of an EVALUATION manifest is also
    # embedded as these crops, and relative dedup removes pool images near any of them, so cropped
    # copies of eval images are caught without lowering the threshold. Pool and seed sets get no views.
    eval_views: list[str] = Field(
        default_factory=lambda: ["centre_crop:0.9", "centre_crop:0.8"],
        description="centre_crop:F, corner_crops:F (four views), mirror; [] for the paper's single view.",
    )
    # Dedup thresholds measured for THIS model (e.g. the paper's self 0.6 / relative 0.45 for SSCD loaded through
    # torchhub:): recorded in embeddings.json as calibrated for it. Unset, a backbone records the paper's SSCD
    # values as calibrated for SSCD, and dedup refuses them for any other model.
    calibrated_thresholds: dict[Literal["self", "relative"], float] | None = None

    @field_validator("eval_views")
    @classmethod
    def _views_parse(cls, value: list[str]) -> list[str]:
        parse_views(value)
        return value

    @field_validator("calibrated_thresholds")
    @classmethod
    def _both_cosines(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if set(value) != {"self", "relative"}:
                raise ValueError(f"give both 'self' and 'relative', got {', '.join(sorted(value)) or 'neither'}")
            for threshold in value.values():
                _cosine(threshold)
        return value


def _cosine(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"a cosine threshold must lie in [0, 1], got {value}")
    return value


class VerifyParams(Section):
    """Pixel verification of the descriptor's candidate pairs (verify.py): with it, dedup's thresholds pick the
    candidates and a pair links two images only when their aligned pixels correlate this well."""

    threshold: float = Field(0.98, ge=-1, le=1, description="Aligned pixel correlation a candidate pair must reach.")
    relative_threshold: float | None = Field(
        None, ge=-1, le=1, description="The same for pool-evaluation pairs (relative dedup); null: threshold."
    )
    distinct_threshold: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="A pool-evaluation pair scoring this much also holds when it is a distinct match: the best "
        "pair of both its images, ahead of each one's next-best by distinct_margin; null: no such rule.",
    )
    distinct_margin: float = Field(0.1, gt=0, le=2, description="The lead a distinct match has over each rival.")
    side: int = Field(28, ge=8, le=256, description="Side of the grey thumbnails compared, in pixels.")
    steps: int = Field(48, ge=2, description="Gradient steps of each alignment (half on blurred images).")
    learning_rate: float = Field(0.05, gt=0, description="Adam's step size in the alignment.")
    max_log_scale: float = Field(
        0.35, ge=0, description="Largest zoom, as its log, either way (0.35: 1.42x, a crop keeping 70% of each side)."
    )
    max_rotation: float = Field(0.3, ge=0, le=3.15, description="Largest rotation in radians (0.3: about 17 degrees).")
    max_shift: float = Field(0.4, ge=0, le=1, description="Largest shift, as a fraction of half the side.")
    batch_pairs: int = Field(256, ge=1, description="Pairs aligned at once (memory grows with it).")

    @model_validator(mode="after")
    def _distinct_below_threshold(self) -> "VerifyParams":
        relative = self.threshold if self.relative_threshold is None else self.relative_threshold
        if self.distinct_threshold is not None and self.distinct_threshold >= relative:
            raise ValueError(
                f"distinct_threshold ({self.distinct_threshold}) must be below the threshold of pool-evaluation "
                f"pairs ({relative}): a pair at that score holds without the distinct-match rule"
            )
        return self


class IndexParams(Section):
    """The nearest-neighbour index (``dinov2/curation/index.py``): exact, or IVF-PQ for large pools."""

    kind: Literal["auto", "flat", "ivfpq"] = Field("auto", description="auto: flat up to exact_limit vectors.")
    placement: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: a GPU when there is one.")
    exact_limit: int = Field(200_000, ge=1, description="Largest pool searched exactly when kind is auto.")
    nprobe: int = Field(
        64, ge=1, description="IVF-PQ: cells probed per query; fewer is faster but misses near-threshold copies."
    )
    training_points_per_list: int = Field(64, ge=39, description="IVF-PQ: k-means training sample per list.")


class DedupParams(Section):
    k: int = Field(64, ge=2, description="Neighbours per image in the k-NN graph.")
    # None: the embedder's own threshold (0.6 / 0.45 for backbones as in the paper, 0.825 / 0.75 for the
    # copy descriptor), recorded in embeddings.json by the embed stage.
    self_threshold: float | None = None
    relative_threshold: float | None = None
    index: IndexParams = Field(default_factory=IndexParams)
    use_eval_views: bool = Field(True, description="Relative dedup also matches the eval images' extra views.")
    report_groups: int = Field(8, ge=0, description="Duplicate groups drawn in the PNG grid.")
    verify: VerifyParams | None = Field(None, description="Pixel verification of candidate pairs; null: none.")
    # Sanity checks (dedup.py): a threshold calibrated for another model than the embedder, or one duplicate
    # group holding more than max_group_share of the pool (groups of up to group_guard_min_images pass).
    max_group_share: float = Field(0.05, gt=0, le=1, description="Largest duplicate group, as a share of the pool.")
    group_guard_min_images: int = Field(
        10, ge=1, description="Groups of up to this many images never trip max_group_share (a few copies are common)."
    )
    guards: Literal["error", "warn"] = Field("error", description="What a failed sanity check does.")

    _check = field_validator("self_threshold", "relative_threshold")(_cosine)


class SeedRetrieval(Section):
    """How one seed dataset retrieves pool images (the paper's Table 15 per dataset)."""

    mode: Literal["sample", "cluster"]
    k: int = Field(4, ge=1, description="sample mode: nearest pool images per seed image.")
    min_seed_images: int = Field(3, ge=0, description="cluster mode: a cluster needs MORE seed images than this.")
    images_per_cluster: int = Field(10_000, ge=1)
    max_images: int | None = Field(1_000_000, ge=1, description="cap on the images retrieved for this dataset.")


class BalancedRetrieval(Section):
    clusters_per_level: list[int] = Field(default_factory=lambda: [100, 10])
    resampling_steps: int = Field(10, ge=0)
    resample_size: int = Field(10, ge=1)
    images: int = Field(1000, ge=1, description="budget of the balanced sample.")


class RetrieveParams(Section):
    # The paper retrieves with a semantic embedder (a ViT pretrained on ImageNet-22k), not with the copy detector
    # dedup uses: `dinov2 embed --section retrieve.embedder` embeds the pool and the seed sets with this one.
    embedder: EmbedParams = Field(
        default_factory=EmbedParams, description="The embed settings of the pool and seed embeddings retrieve reads."
    )
    n_clusters: int = Field(100, ge=1, description="k-means clusters of the pool for cluster-based retrieval.")
    kmeans_iterations: int = Field(20, ge=1)
    seed: int = 0
    default: SeedRetrieval = Field(default_factory=lambda: SeedRetrieval(mode="sample"))
    datasets: dict[str, SeedRetrieval] = Field(default_factory=dict, description="per seed source name")
    balanced: BalancedRetrieval | None = None
    report_seeds: int = Field(6, ge=0, description="seed images drawn with their retrieved neighbours.")
    index: IndexParams = Field(default_factory=IndexParams, description="The index of the pool's embeddings.")
    degenerate_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Warn when sample-based retrieval gets fewer distinct images than this share "
        "of seeds x k: the embedder hardly tells the seeds apart.",
    )

    @model_validator(mode="after")
    def _levels_decrease(self) -> "RetrieveParams":
        if self.balanced is not None:
            levels = self.balanced.clusters_per_level
            if not levels or any(b >= a for a, b in zip(levels, levels[1:], strict=False)):
                raise ValueError(f"balanced.clusters_per_level must decrease, got {levels}")
        return self

    def for_dataset(self, source: str) -> SeedRetrieval:
        return self.datasets.get(source, self.default)


class DescriptorEdits(Section):
    """The edits that make the two training views of an image (``dinov2/copydetect/edits.py``)."""

    crop_probability: float = Field(0.9, ge=0, le=1)
    crop_min_kept: float = Field(0.65, gt=0, le=1, description="Smallest fraction of each side a crop keeps.")
    aspect_change: float = Field(1.2, ge=1, description="A crop's width / height ratio changes by up to this factor.")
    rotation_probability: float = Field(0.6, ge=0, le=1)
    rotation_degrees: float = Field(15.0, ge=0, le=180)
    flip_probability: float = Field(0.5, ge=0, le=1)
    colour_probability: float = Field(0.8, ge=0, le=1)
    colour_strength: float = Field(0.3, ge=0, lt=1, description="Brightness, contrast, saturation x [1-s, 1+s].")
    hue_shift: float = Field(0.02, ge=0, le=0.5, description="Largest hue rotation, as a fraction of the circle.")
    grey_probability: float = Field(0.1, ge=0, le=1)
    overlay_probability: float = Field(0.05, ge=0, le=1, description="A line of text or a filled shape.")
    overlay_size: float = Field(0.3, gt=0, le=1, description="Largest overlay, as a fraction of the image side.")
    padding_probability: float = Field(0.05, ge=0, le=1)
    padding_max: float = Field(0.15, ge=0, le=1, description="Widest border, as a fraction of the image side.")
    blur_probability: float = Field(0.1, ge=0, le=1)
    blur_radius: float = Field(1.0, gt=0, description="Largest Gaussian radius, in pixels of the network input.")
    jpeg_probability: float = Field(0.5, ge=0, le=1)
    jpeg_quality: tuple[int, int] = Field((30, 95), description="Lowest and highest JPEG quality.")
    original_view_probability: float = Field(
        0.5, ge=0, le=1, description="The first view is the unedited image (as dedup compares an original and a copy)."
    )

    @field_validator("jpeg_quality")
    @classmethod
    def _quality_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 100:
            raise ValueError(f"jpeg_quality must be two qualities 1 <= low <= high <= 100, got {list(value)}")
        return value


class DescriptorCalibration(Section):
    """How the dedup thresholds of a trained descriptor are measured (``dinov2/copydetect/calibration.py``)."""

    images: int = Field(
        500, ge=2, le=5000, description="Pool images held out of training; each gets one synthetic copy."
    )
    self_precision: float = Field(0.99, gt=0, le=1, description="Precision the self-dedup threshold must reach.")
    relative_false_removal: float = Field(
        0.01, ge=0, lt=1, description="Largest share of other pool images that the held-out images may remove."
    )
    pool_images: int = Field(5000, ge=1, description="Training images scored as the other pool images, at most.")
    copies: dict[str, CopyEditRanges] = Field(
        default_factory=lambda: {"planted": CopyEditRanges(), "strong": CopyEditRanges(**STRONG_COPIES)},
        min_length=1,
        description="The strengths of the held-out copies, by name; copy i has strength i modulo their number.",
    )


class DescriptorNetwork(Section):
    """The trained descriptor's network (``dinov2/copydetect/network.py``), as its folder records it."""

    input_size: int = Field(28, ge=8, description="Images are resized to this square (28: Fashion-MNIST's side).")
    width: int = Field(32, ge=4, description="Channels of the first stage; doubled at every further stage.")
    stages: int = Field(2, ge=1, le=6, description="Each stage after the first halves the resolution.")
    blocks_per_stage: int = Field(2, ge=0, le=8, description="Residual blocks in every stage.")
    dim: int = Field(128, ge=8, description="Size of the descriptor.")
    gem_p: float = Field(3.0, ge=1, description="Exponent of the generalised-mean pooling.")


class DescriptorParams(DescriptorNetwork):
    """``dinov2 train-descriptor``: an SSCD-style copy-detection network trained on the pool, without labels: the
    network's keys, then training's."""

    seed: int = 0
    epochs: int = Field(36, ge=1, description="Passes over the pool.")
    batch_size: int = Field(128, ge=2, description="Images per step (two views each).")
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature (SSCD: 0.05).")
    entropy_weight: float = Field(1.0, ge=0, description="Weight of the entropy (KoLeo) regulariser.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1; the GPU when there is one if unset.")
    num_workers: int = Field(2, ge=0, description="DataLoader processes making the training views.")
    max_pixels: int | None = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger JPEGs are decoded at reduced size.")
    edits: DescriptorEdits = Field(default_factory=DescriptorEdits)
    calibration: DescriptorCalibration = Field(default_factory=DescriptorCalibration)

    @property
    def network(self) -> DescriptorNetwork:
        return DescriptorNetwork(**self.model_dump(include=set(DescriptorNetwork.model_fields)))
