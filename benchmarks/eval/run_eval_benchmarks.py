"""Figures of the eval suite on the CIFAR-10 JPEG copy, on this machine.

1. Raw-pixel kNN over the full split (50k train, 10k test; the raw-pixel protocol: flatten RGB,
   subtract the train mean image, L2-normalise, cosine, k=20, T=0.07): expected 45.8% +- 1.
2. The full suite (knn, linear, logreg, retrieval, segmentation proxy) of a random-init tiny ViT
   (width 64, 2 blocks, patch 4, 32 px) on a 10k-image slice
   (800 train + 200 test images per class by default), beside raw pixels on the same slice.

Usage: python benchmarks/eval/run_eval_benchmarks.py --cifar /path/to/cifar10 [--per-class 800 200]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dinov2.configuration.evaluation import EvaluateParams
from dinov2.eval.features import model_fingerprint
from dinov2.eval.suite import Backbone, load_evaluated_backbone, run_suite
from dinov2.models import DinoVisionTransformer


def slice_folder(cifar: Path, target: Path, n_train: int, n_test: int) -> Path:
    for split, count in (("train", n_train), ("test", n_test)):
        for class_dir in sorted((cifar / split).iterdir()):
            (target / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / split / class_dir.name / image.name).symlink_to(image)
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cifar", type=Path, required=True)
    parser.add_argument("--per-class", type=int, nargs=2, default=(800, 200), help="train and test images per class")
    args = parser.parse_args()
    torch.manual_seed(0)
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        common = dict(resize_size=32, crop_size=32, cache_dir=Path(scratch) / "cache", batch_size=256)
        full = EvaluateParams(train_dir=args.cifar / "train", test_dir=args.cifar / "test", evaluations=["knn"],
                              knn={"ks": [20]}, **common)  # fmt: skip
        start = time.perf_counter()
        pixels = run_suite(full, load_evaluated_backbone("raw_pixels"))
        figures["raw_pixel_knn_top1_k20_full_cifar10"] = pixels.metrics["knn_top1_k20"]
        figures["raw_pixel_knn_seconds"] = time.perf_counter() - start

        root = slice_folder(args.cifar, Path(scratch) / "slice", *args.per_class)
        suite = EvaluateParams(train_dir=root / "train", test_dir=root / "test",
                               logreg={"n_c": 12, "max_iter": 300}, linear={"epochs": 5},
                               segmentation={"n_train_mosaics": 1000, "n_test_mosaics": 200, "epochs": 5},
                               **common)  # fmt: skip
        model = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=1e-5)
        for name, backbone in (
            ("tiny_vit_random_init", Backbone("tiny", model.eval(), model_fingerprint(model))),
            ("raw_pixels", load_evaluated_backbone("raw_pixels")),
        ):
            start = time.perf_counter()
            result = run_suite(suite, backbone)
            figures[f"suite_{name}_seconds"] = time.perf_counter() - start
            figures[f"suite_{name}_stage_seconds"] = result.seconds
            figures[f"suite_{name}_metrics"] = result.metrics
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
