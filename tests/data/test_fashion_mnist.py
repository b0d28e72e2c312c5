"""Fashion-MNIST as the project installs it: the arrays, the image folders cut from it, and where it is looked for."""

import gzip
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FOLDER_VARIABLE,
    RAW_FILES,
    fashion_mnist_root,
    load_fashion_mnist,
    write_image_folder,
)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist(train=False)


def written_indices(folder: Path) -> list[int]:
    return sorted(int(re.fullmatch(r"(?:train|test)_(\d+)\.png", path.name)[1]) for path in folder.iterdir())


def test_the_splits_hold_sixty_and_ten_thousand_images_balanced_over_ten_classes(test_split):
    images, labels = test_split
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int64
    assert Counter(labels.tolist()) == {label: 1000 for label in range(10)}
    train_images, train_labels = load_fashion_mnist(train=True)
    assert train_images.shape == (60_000, 28, 28) and np.bincount(train_labels).tolist() == [6000] * 10
    # the first test item of the published set is an ankle boot (label 9), the second a pullover (2)
    assert FASHION_MNIST_CLASSES[labels[0]] == "ankle_boot" and FASHION_MNIST_CLASSES[labels[1]] == "pullover"


def test_an_image_folder_has_the_requested_images_of_every_class_with_the_array_pixels(tmp_path, test_split):
    out = write_image_folder(tmp_path / "fm", train_per_class=3, test_per_class=2)
    assert out == tmp_path / "fm"
    for split, count in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(FASHION_MNIST_CLASSES)
        assert {name: len(list((out / split / name).iterdir())) for name in FASHION_MNIST_CLASSES} == dict.fromkeys(
            FASHION_MNIST_CLASSES, count
        )
    images, labels = test_split
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        for index in written_indices(out / "test" / name):
            with Image.open(out / "test" / name / f"test_{index}.png") as png:
                assert png.mode == "L" and png.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(png), images[index])
            assert labels[index] == label


def test_the_same_seed_picks_the_same_images_and_more_per_class_extends_the_choice(tmp_path):
    three = write_image_folder(tmp_path / "three", 0, 3, seed=5)
    again = write_image_folder(tmp_path / "again", 0, 3, seed=5)
    five = write_image_folder(tmp_path / "five", 0, 5, seed=5)
    other = write_image_folder(tmp_path / "other", 0, 3, seed=6)
    for name in FASHION_MNIST_CLASSES:
        chosen = written_indices(three / "test" / name)
        assert written_indices(again / "test" / name) == chosen
        assert set(chosen) < set(written_indices(five / "test" / name))  # the first 3 of the same order
    assert any(written_indices(other / "test" / n) != written_indices(three / "test" / n) for n in ("bag", "coat"))
    assert (three / "test" / "bag").is_dir() and not list((three / "train" / "bag").iterdir())


def test_bad_sizes_and_an_existing_folder_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="test_per_class=1001: Fashion-MNIST has 0 to 1000 per class"):
        write_image_folder(tmp_path / "fm", 1, 1001)
    with pytest.raises(ValueError, match="train_per_class=-1"):
        write_image_folder(tmp_path / "fm", -1, 1)
    assert not list(tmp_path.iterdir())
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken already exists"):
        write_image_folder(tmp_path / "taken", 1, 1)


def test_a_failed_write_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv(FOLDER_VARIABLE, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{FOLDER_VARIABLE}=.*nowhere does not hold Fashion-MNIST"):
        write_image_folder(tmp_path / "fm", 2, 2)
    assert not list(tmp_path.iterdir())  # neither the folder nor its temporary twin


def test_missing_data_names_every_place_looked_at_and_the_install_step(tmp_path, monkeypatch):
    monkeypatch.delenv(FOLDER_VARIABLE, raising=False)
    with pytest.raises(FileNotFoundError) as error:
        fashion_mnist_root(local_root=tmp_path / "repo", debian_folder=tmp_path / "debian")
    message = str(error.value)
    assert FOLDER_VARIABLE in message and str(tmp_path / "repo" / "FashionMNIST" / "raw") in message
    assert str(tmp_path / "debian") in message and "make install" in message
    assert "\n" not in message


def test_debian_archives_are_decompressed_once_where_torchvision_reads_them(tmp_path, monkeypatch, test_split):
    installed = fashion_mnist_root() / "FashionMNIST" / "raw"
    debian = tmp_path / "debian"
    debian.mkdir()
    for name in RAW_FILES:  # the package's layout: <name>.gz side by side
        with gzip.open(debian / f"{name}.gz", "wb", compresslevel=1) as archive:
            archive.write((installed / name).read_bytes())
    monkeypatch.delenv(FOLDER_VARIABLE, raising=False)
    root = fashion_mnist_root(local_root=tmp_path / "repo", debian_folder=debian)
    assert root == tmp_path / "repo"
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_FILES)  # no temporary file left behind
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 8 + 10_000
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60_000 * 28 * 28
    for name in RAW_FILES:
        (debian / f"{name}.gz").unlink()  # found in the repository's folder from now on
    assert fashion_mnist_root(local_root=tmp_path / "repo", debian_folder=debian) == root

    from torchvision.datasets import FashionMNIST

    decompressed = FashionMNIST(root=root, train=False, download=False)
    np.testing.assert_array_equal(decompressed.data.numpy(), test_split[0])
    np.testing.assert_array_equal(decompressed.targets.numpy(), test_split[1])
