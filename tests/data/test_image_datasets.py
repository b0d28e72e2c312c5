import logging
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.datasets import ImageFolderDataset, ManifestDataset


def test_a_fashion_mnist_folder_has_ten_classes_and_its_grey_images_read_as_rgb(image_folder):
    dataset = ImageFolderDataset(image_folder(20, 10) / "test")
    assert len(dataset) == 100
    assert dataset.classes[:3] == ["ankle_boot", "bag", "coat"] and len(dataset.classes) == 10
    assert Counter(dataset.labels) == {label: 10 for label in range(10)}
    image, label = dataset[0]
    assert image.size == (28, 28) and image.mode == "RGB" and label == 0
    red, green, blue = image.split()
    assert red.tobytes() == green.tobytes() == blue.tobytes() == Image.open(dataset.paths[0]).tobytes()
    assert dataset[99][1] == 9


def test_bad_files_are_skipped_counted_and_logged(folder_with_bad_files, caplog):
    dataset = ImageFolderDataset(folder_with_bad_files)
    assert [p.name for p in dataset.paths] == [
        "astronaut.jpg",
        "coffee.png",
        "chelsea.jpg",
        "not_an_image.jpg",
        "truncated.jpg",
    ]  # fmt: skip  (README.txt is not an image file and is not listed)
    assert dataset.labels == [0, 0, 1, 1, 1] and dataset.classes == ["cats", "dogs"]
    with caplog.at_level(logging.WARNING):
        samples = [dataset[i] for i in range(len(dataset))]
    assert [s is None for s in samples] == [False, False, False, True, True]
    assert len(dataset.skipped) == 2
    assert [path.rsplit("/", 1)[-1] for path in dataset.skipped.paths] == ["not_an_image.jpg", "truncated.jpg"]
    assert "truncated.jpg" in caplog.text and "not_an_image.jpg" in caplog.text


def test_flat_folder_is_unlabelled(tmp_path, photos):
    for i, photo in enumerate(photos[:3]):
        photo.resize((20, 20)).save(tmp_path / f"{i}.png")
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 3 and dataset.labels == [-1, -1, -1] and dataset.classes == []


def test_transform_gets_the_generator(folder_with_bad_files):
    augmentation = DataAugmentationDINO(local_crops_number=1, global_crops_size=16, local_crops_size=8)
    dataset = ImageFolderDataset(folder_with_bad_files, transform=augmentation)
    first = dataset.load(2, generator=torch.Generator().manual_seed(1))
    again = dataset.load(2, generator=torch.Generator().manual_seed(1))
    assert first[1] == 1 and torch.equal(first[0]["global_crops"][1], again[0]["global_crops"][1])
    assert dataset.load(4, generator=torch.Generator().manual_seed(1)) is None
    with pytest.raises(IndexError, match="index 5 out of range for a dataset of 5 images"):
        dataset[5]


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*missing"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path / "texts")


def write_manifest(destination, /, **columns) -> None:
    pq.write_table(pa.table(columns), destination)


def test_manifest_with_relative_absolute_and_missing_paths(tmp_path, folder_with_bad_files):
    manifest = tmp_path / "manifest.parquet"
    write_manifest(
        manifest,
        id=["a", "b", "c", "d"],
        path=[
            "images/cats/astronaut.jpg",  # relative to the manifest's folder
            str(folder_with_bad_files / "dogs" / "chelsea.jpg"),
            "images/dogs/truncated.jpg",
            "images/gone.jpg",
        ],
        label=[3, None, 1, 2],
    )
    dataset = ManifestDataset(manifest, index_dir=tmp_path / "index")
    assert len(dataset) == 4
    assert dataset.path_at(0) == tmp_path / "images/cats/astronaut.jpg"
    assert dataset.path_at(1) == folder_with_bad_files / "dogs" / "chelsea.jpg"
    assert [dataset.label_at(i) for i in range(4)] == [3, -1, 1, 2]
    image, label = dataset[0]
    assert image.size == (64, 48) and label == 3
    assert dataset[1][1] == -1
    assert dataset[2] is None and dataset[3] is None and len(dataset.skipped) == 2


def test_manifest_root_and_string_labels(tmp_path, folder_with_bad_files):
    manifest = tmp_path / "elsewhere" / "m.parquet"
    manifest.parent.mkdir()
    write_manifest(manifest, id=[1, 2, 3], path=["cats/coffee.png", "dogs/chelsea.jpg", "cats/astronaut.jpg"],
                   label=["cat", "dog", "cat"])  # fmt: skip
    dataset = ManifestDataset(manifest, root=folder_with_bad_files, index_dir=tmp_path / "index")
    assert dataset.classes == ["cat", "dog"] and [dataset.label_at(i) for i in range(3)] == [0, 1, 0]
    assert isinstance(dataset[1][0], Image.Image)


def test_manifest_without_labels_is_unlabelled(tmp_path, folder_with_bad_files):
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest, id=[0], path=[str(folder_with_bad_files / "cats" / "coffee.png")], split=["train"])
    assert ManifestDataset(manifest, index_dir=tmp_path / "index").label_at(0) == -1


def test_a_manifest_is_indexed_once_and_reindexed_when_it_changes(tmp_path, folder_with_bad_files):
    import pickle

    manifest, index_dir = tmp_path / "m.parquet", tmp_path / "index"
    write_manifest(manifest, id=[0, 1], path=["cats/coffee.png", "dogs/chelsea.jpg"])
    first = ManifestDataset(manifest, root=folder_with_bad_files, index_dir=index_dir)
    written = first.index_path.stat().st_mtime_ns
    again = ManifestDataset(manifest, root=folder_with_bad_files, index_dir=index_dir)
    assert again.index_path == first.index_path and again.index_path.stat().st_mtime_ns == written
    # what a DataLoader worker started by spawn receives: the index's path, mapped again there
    assert b"chelsea" not in pickle.dumps(first)
    copy = pickle.loads(pickle.dumps(first))
    assert copy.path_at(1) == folder_with_bad_files / "dogs" / "chelsea.jpg" and len(copy) == 2

    write_manifest(manifest, id=[0, 1, 2], path=["cats/coffee.png", "dogs/chelsea.jpg", "cats/astronaut.jpg"])
    changed = ManifestDataset(manifest, root=folder_with_bad_files, index_dir=index_dir)
    assert changed.index_path != first.index_path and len(changed) == 3
    assert sorted(p.suffix for p in index_dir.iterdir()) == [".arrow", ".arrow", ".lock", ".lock"]


def test_manifest_errors_name_the_problem(tmp_path):
    index_dir = tmp_path / "index"
    with pytest.raises(FileNotFoundError, match="manifest not found: .*nope.parquet"):
        ManifestDataset(tmp_path / "nope.parquet", index_dir=index_dir)
    no_path = tmp_path / "no_path.parquet"
    write_manifest(no_path, id=[1], file=["x.jpg"])
    with pytest.raises(ValueError, match="lacks column\\(s\\) path \\(it has: id, file\\)"):
        ManifestDataset(no_path, index_dir=index_dir)
    empty = tmp_path / "empty.parquet"
    write_manifest(empty, id=pa.array([], pa.int64()), path=pa.array([], pa.string()))
    with pytest.raises(ValueError, match="lists no images"):
        ManifestDataset(empty, index_dir=index_dir)
    null_path = tmp_path / "null_path.parquet"
    write_manifest(null_path, id=[1, 2], path=["a.jpg", None])
    with pytest.raises(ValueError, match="empty values in column 'path'"):
        ManifestDataset(null_path, index_dir=index_dir)
    empty_path = tmp_path / "empty_path.parquet"
    write_manifest(empty_path, id=[1, 2], path=["a.jpg", ""])
    with pytest.raises(ValueError, match="empty values in column 'path'"):
        ManifestDataset(empty_path, index_dir=index_dir)
    assert not list(index_dir.glob("*.arrow")) and not list(index_dir.glob(".*"))  # no index left half-written


def test_class_is_the_first_level_folder_at_any_depth(tmp_path, photos):
    (tmp_path / "b_class" / "deep" / "deeper").mkdir(parents=True)
    (tmp_path / "a_class").mkdir()
    photos[0].resize((16, 16)).save(tmp_path / "b_class" / "deep" / "deeper" / "x.jpg")
    photos[1].resize((16, 16)).save(tmp_path / "a_class" / "y.png")
    photos[2].resize((16, 16)).save(tmp_path / "loose.bmp")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["a_class", "b_class"]
    assert {p.name: label for p, label in zip(dataset.paths, dataset.labels, strict=True)} == {
        "y.png": 0, "x.jpg": 1, "loose.bmp": -1,
    }  # fmt: skip
