"""Fashion-MNIST on this machine: where it is, how to get it, and image folders cut from it.

Fashion-MNIST (Zalando, MIT licence) is the project's embedded real-image data: 60,000 train and
10,000 test grey 28x28 images of ten clothing classes. `make install` provides it (`make data` reruns
that step): Debian's `dataset-fashion-mnist` package where apt-get can be used, else torchvision's
download. The readers here are torchvision's, so the files sit where `torchvision.datasets.FashionMNIST`
looks for them: `<root>/FashionMNIST/raw/<name>`, uncompressed.

Run as `python -m dinov2.data.fashion_mnist` to provide the data (what `make data` does).
"""

import gzip
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dinov2.configuration.settings import Settings, variable

FOLDER_VARIABLE = variable(Settings, "fashion_mnist")

logger = logging.getLogger(__name__)

# Filesystem-safe names, in label order (torchvision's are "T-shirt/top", ..., "Ankle boot").
FASHION_MNIST_CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

# The repository's own copy (git-ignored `data/`): where the install step puts the files.
LOCAL_ROOT = Path(__file__).resolve().parents[2] / "data" / "fashion-mnist"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IMAGES_PER_CLASS = {"train": 6000, "test": 1000}


def _raw_folder(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _is_complete(root: Path) -> bool:
    return all((_raw_folder(root) / name).is_file() for name in RAW_FILES)


def _decompress(archives: Path, root: Path) -> None:
    """Write the uncompressed idx files under `root`; each appears under its final name only when whole."""
    raw = _raw_folder(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        target = raw / name
        if target.is_file():
            continue
        with tempfile.NamedTemporaryFile(dir=raw, prefix=f".{name}.", delete=False) as partial:
            with gzip.open(archives / f"{name}.gz") as source:
                shutil.copyfileobj(source, partial)
        os.chmod(partial.name, 0o644)  # a temporary file is private; the data is for every user
        os.replace(partial.name, target)


def fashion_mnist_root(*, local_root: Path = LOCAL_ROOT, debian_folder: Path = DEBIAN_FOLDER) -> Path:
    """The root to pass to `torchvision.datasets.FashionMNIST(root=..., download=False)`.

    Looked for in order: the folder named by $DINOV2_FASHION_MNIST, the repository's `data/fashion-mnist`,
    then Debian's package files (`/usr/share/datasets/fashion-mnist/*.gz`), which are decompressed once
    into the repository's folder.
    """
    chosen = Settings.read().fashion_mnist
    if chosen:
        # A folder the user named is the answer or an error: never silently another copy.
        if not _is_complete(Path(chosen)):
            raise FileNotFoundError(
                f"{FOLDER_VARIABLE}={chosen} does not hold Fashion-MNIST: expected the uncompressed files "
                f"{', '.join(RAW_FILES)} in {_raw_folder(Path(chosen))}"
            )
        return Path(chosen)
    if _is_complete(local_root):
        return local_root
    if all((debian_folder / f"{name}.gz").is_file() for name in RAW_FILES):
        _decompress(debian_folder, local_root)
        return local_root
    raise FileNotFoundError(
        f"Fashion-MNIST not found: looked in ${FOLDER_VARIABLE} (unset), {_raw_folder(local_root)} and "
        f"{debian_folder}/*.gz; `make install` (or `make data`) provides it"
    )


def load_fashion_mnist(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of the train (60,000) or test (10,000) split."""
    from torchvision.datasets import FashionMNIST

    dataset = FashionMNIST(root=fashion_mnist_root(), train=train, download=False)
    return dataset.data.numpy(), dataset.targets.numpy().astype(np.int64)


def write_image_folder(out: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """Write `<out>/{train,test}/<class>/<split>_<index>.png`: grey 28x28 PNGs, class-balanced.

    Each split keeps the first `*_per_class` images of every class in an order shuffled by `seed`;
    `<index>` is the image's index in its Fashion-MNIST split, so a file can be traced back. The folder
    is written under a temporary name and renamed when complete; `out` must not exist yet.
    """
    out = Path(out)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        if not 0 <= count <= IMAGES_PER_CLASS[split]:
            raise ValueError(f"{split}_per_class={count}: Fashion-MNIST has 0 to {IMAGES_PER_CLASS[split]} per class")
    if out.exists():
        raise FileExistsError(f"{out} already exists: write the image folder to a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for name in FASHION_MNIST_CLASSES:
                (partial / split / name).mkdir(parents=True)
            if count == 0:
                continue
            images, labels = load_fashion_mnist(train=split == "train")
            order = np.random.default_rng(seed).permutation(len(labels))
            for label, name in enumerate(FASHION_MNIST_CLASSES):
                for index in order[labels[order] == label][:count]:
                    Image.fromarray(images[index]).save(partial / split / name / f"{split}_{index}.png")
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _apt_get_install() -> bool:
    """Install Debian's package when this is a root shell with apt-get; False when that is not possible or fails."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", DEBIAN_PACKAGE]):
        logger.info("running %s", " ".join(command))
        if subprocess.run(command, env=environment).returncode != 0:
            logger.warning("%s failed; trying torchvision's download", " ".join(command))
            return False
    return True


def provide_fashion_mnist() -> Path:
    """Make Fashion-MNIST available (Debian package, else torchvision's download) and return its root."""
    try:
        return fashion_mnist_root()
    except FileNotFoundError:
        if Settings.read().fashion_mnist:
            raise
    if not (DEBIAN_FOLDER / f"{RAW_FILES[0]}.gz").is_file() and _apt_get_install():
        return fashion_mnist_root()
    from torchvision.datasets import FashionMNIST

    logger.info("downloading Fashion-MNIST with torchvision into %s", LOCAL_ROOT)
    FashionMNIST(root=LOCAL_ROOT, train=True, download=True)
    FashionMNIST(root=LOCAL_ROOT, train=False, download=True)
    return fashion_mnist_root()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        root = provide_fashion_mnist()
    except (OSError, RuntimeError) as error:  # a missing file, a failed command, a failed download
        sys.exit(f"error: could not provide Fashion-MNIST: {error}")
    print(f"Fashion-MNIST ready in {_raw_folder(root)}")
