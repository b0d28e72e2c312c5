import os

# No telemetry from any tool during tests.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dinov2.models import DinoVisionTransformer  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def tiny_vit():
    """A CPU-sized DINOv2 ViT: width 64, 2 blocks, patch 4, trained at 32 px (8x8 grid)."""

    def build(**overrides) -> DinoVisionTransformer:
        torch.manual_seed(0)
        options = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=1e-5)
        options.update(overrides)
        return DinoVisionTransformer(**options).eval()

    return build


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs bundled with scikit-image (no download)."""
    import skimage.data

    names = ("astronaut", "coffee", "chelsea", "rocket")
    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names]


@pytest.fixture(scope="session")
def photo_batch(photos):
    """The photos resized to 32x32 and scaled to [-1, 1]: a (4, 3, 32, 32) batch of real images."""

    def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
        array = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def batch(size: int = 32) -> torch.Tensor:
        return torch.stack([to_tensor(image, size) for image in photos])

    return batch
