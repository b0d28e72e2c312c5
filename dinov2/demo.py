"""The end-to-end check a newcomer runs first: a backbone embeds real photos, and its exports reload.

``dinov2 demo`` (``make check-backbone``) builds a hub backbone (random weights unless ``weights`` points
at a checkpoint: nothing is downloaded here), embeds a folder of images or the photos bundled with
scikit-image, writes L2-normalised fp16 embeddings, their cosine-similarity matrix and a
PCA-of-patch-features picture, exports the backbone as safetensors (hub and timm layouts), reloads the
export and checks it gives the same features.
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinov2.atomic import output_folder, write_json
from dinov2.data.images import SkippedImages, list_images, try_read_rgb
from dinov2.data.transforms import make_eval_transform
from dinov2.demo_data.bundled import photo
from dinov2.eval.patch_pca import patch_pca_picture
from dinov2.hub import create, load_backbone, save_backbone, save_timm
from dinov2.hub.export import count_parameters

logger = logging.getLogger(__name__)

BUNDLED_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field")


def bundled_photos() -> list[tuple[str, Image.Image]]:
    """Real photographs that ship inside scikit-image, so the demo needs no download."""
    return [(name, photo(name)) for name in BUNDLED_PHOTOS]


def folder_photos(folder: Path, skipped: SkippedImages) -> list[tuple[str, Image.Image]]:
    photos = []
    for path in list_images(folder):
        image = try_read_rgb(path, skipped)
        if image is not None:
            photos.append((str(path.relative_to(folder)), image))
    if not photos:
        raise ValueError(f"none of the images under {folder} could be read ({len(skipped)} unreadable)")
    return photos


def run_demo(
    out: Path,
    model_name: str = "dinov2_vits14",
    weights: str | None = None,
    images: Path | None = None,
    crop_size: int = 224,
    batch_size: int = 8,
) -> dict:
    model = create(model_name, pretrained=weights is not None, **({"weights": weights} if weights else {}))
    model.eval()
    if crop_size % model.patch_size:
        raise ValueError(f"crop size {crop_size} is not a multiple of the patch size {model.patch_size}")
    skipped = SkippedImages()
    photos = folder_photos(images, skipped) if images else bundled_photos()
    transform = make_eval_transform(resize_size=crop_size * 256 // 224, crop_size=crop_size)
    pixels = torch.stack([transform(image) for _, image in photos])

    start = time.perf_counter()
    cls_tokens, patch_tokens = [], []
    with torch.inference_mode():
        for chunk in pixels.split(batch_size):
            features = model.forward_features(chunk)
            cls_tokens.append(features["x_norm_clstoken"])
            patch_tokens.append(features["x_norm_patchtokens"])
    seconds = time.perf_counter() - start
    cls = F.normalize(torch.cat(cls_tokens), dim=-1)
    patches = torch.cat(patch_tokens)

    with output_folder(out) as partial:
        np.save(partial / "embeddings.npy", cls.numpy().astype(np.float16))
        (partial / "ids.txt").write_text("".join(f"{name}\n" for name, _ in photos))
        np.savetxt(partial / "cosine_similarity.csv", (cls @ cls.T).numpy(), delimiter=",", fmt="%.4f")
        patch_pca_picture(patches, crop_size // model.patch_size).save(partial / "patch_pca.png")

        save_backbone(model, partial / "backbone.safetensors", metadata={"hub_name": model_name})
        save_timm(model, partial / "backbone_timm.safetensors")
        reloaded = load_backbone(partial / "backbone.safetensors").eval()
        with torch.inference_mode():
            reloaded_cls = F.normalize(reloaded(pixels[:batch_size]), dim=-1)
        max_difference = float((reloaded_cls - cls[:batch_size]).abs().max())

        summary = {
            "model": model_name,
            "weights": weights or "random init (pass --weights for a checkpoint)",
            "parameters": count_parameters(model),
            "images": len(photos),
            "unreadable_images": len(skipped),
            "unreadable_paths": skipped.paths,
            "crop_size": crop_size,
            "embedding_dim": cls.shape[1],
            "images_per_second": round(len(photos) / seconds, 2),
            "reload_max_abs_difference": max_difference,
        }
        write_json(summary, partial / "summary.json", sort_keys=False)
        if max_difference > 1e-5:
            raise RuntimeError(f"the exported backbone gives different features (max difference {max_difference})")
    return summary
