"""The ``evaluate`` section of params.yaml: which evaluations run, on which data, with which knobs."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from dinov2.configuration import Section

Evaluation = Literal["knn", "linear", "logreg", "retrieval", "segmentation", "depth"]


class KnnParams(Section):
    ks: list[int] = [10, 20, 100, 200]
    temperature: float = Field(0.07, gt=0)


class LinearParams(Section):
    n_last_blocks: list[int] = [1, 4]
    avgpool: list[bool] = [False, True]
    # the reference's grid: 13 rates from 1e-5 to 0.1, each scaled by batch_size / 256
    learning_rates: list[float] = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)


class LogRegParams(Section):
    c_min_exp: float = -6.0
    c_max_exp: float = 5.0
    n_c: int = Field(45, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    max_iter: int = Field(1000, ge=1)


class RetrievalParams(Section):
    ks: list[int] = [1, 5, 10]
    n_instance_queries: int = Field(500, ge=1)


class SegmentationParams(Section):
    """Without ``root``, the 2x2-mosaic PROXY set built from the classification folders."""

    root: Path | None = None
    n_train_mosaics: int = Field(2000, ge=2)
    n_test_mosaics: int = Field(500, ge=1)
    size: int = Field(448, ge=1)  # image side for ADE-style folders
    epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-3, gt=0)


class DepthParams(Section):
    """NYU-style folders ``<root>/{train,test}/{images,depth}``; the eval is skipped without a root."""

    root: Path | None = None
    size: int = Field(448, ge=1)
    depth_scale: float = Field(1000.0, gt=0)
    epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-3, gt=0)


class EvaluateParams(Section):
    dataset: str = Field("eval", pattern=r"^[A-Za-z0-9_.-]+$", description="the name in metric keys")
    train_dir: Path = Field(Path("outputs/prepare/eval/train"), description="ImageFolder: <class>/<image>")
    test_dir: Path = Field(Path("outputs/prepare/eval/test"), description="the pipeline's evaluation splits by default")
    evaluations: list[Evaluation] = ["knn", "linear", "logreg", "retrieval", "segmentation"]
    resize_size: int = Field(256, ge=1)
    crop_size: int = Field(224, ge=1)
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    device: str = "cpu"
    seed: int = 0
    cache_dir: Path = Path("outputs/cache/evaluate")  # outside the output folder, which a run replaces
    # `dinov2 evaluate --register-as NAME`: the metric (higher is better) that decides the champion alias
    champion_metric: str = "knn_top1_k20"
    knn: KnnParams = KnnParams()
    linear: LinearParams = LinearParams()
    logreg: LogRegParams = LogRegParams()
    retrieval: RetrievalParams = RetrievalParams()
    segmentation: SegmentationParams = SegmentationParams()
    depth: DepthParams = DepthParams()
