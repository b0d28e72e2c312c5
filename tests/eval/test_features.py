"""Feature extraction over real images: what comes out, what is skipped, and when the cache is reused."""

import pytest
import torch

from dinov2.data.transforms import make_eval_transform
from dinov2.eval.datasets import LabelledImageFolder, check_same_classes
from dinov2.eval.features import (
    FeatureCache,
    class_token,
    extract,
    extract_features,
    model_fingerprint,
    probe_tokens,
)


@pytest.fixture
def photo_folder(tmp_path, photos):
    """Four real photos in two classes, plus one corrupt file in class 'b'."""
    tmp_path = tmp_path / "photos"
    for index, image in enumerate(photos):
        folder = tmp_path / ("a" if index < 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image.resize((40, 40)).save(folder / f"{index}.png")
    (tmp_path / "b" / "9_corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return tmp_path


def test_features_are_the_models_normed_cls_token_in_dataset_order(photo_folder, tiny_vit):
    model = tiny_vit()
    transform = make_eval_transform(resize_size=32, crop_size=32)
    dataset = LabelledImageFolder(photo_folder, transform)
    features, labels = extract_features(model, dataset, batch_size=3)
    assert features.dtype == torch.float32 and features.shape == (4, 64)
    assert labels.tolist() == [0, 0, 1, 1]
    readable = torch.stack([dataset[i][0] for i in range(4)])
    torch.testing.assert_close(features, model(readable))
    assert len(dataset.skipped) == 1 and dataset.skipped.paths[0].endswith("9_corrupt.jpg")


def test_probe_tokens_hold_the_last_blocks_cls_and_the_mean_patch_token(photo_batch, tiny_vit):
    model = tiny_vit(depth=4)
    images = photo_batch(32)
    tokens = probe_tokens(model, images)
    features = model.forward_features(images)
    assert tokens.shape == (4, 5 * 64)
    torch.testing.assert_close(tokens[:, 3 * 64 : 4 * 64], features["x_norm_clstoken"])
    torch.testing.assert_close(tokens[:, 4 * 64 :], features["x_norm_patchtokens"].mean(dim=1))
    # A 2-block model stores the CLS of both blocks only.
    assert probe_tokens(tiny_vit(depth=2), images).shape == (4, 3 * 64)


def test_cache_reuses_features_until_weights_data_or_transform_change(photo_folder, tiny_vit, tmp_path):
    model = tiny_vit()
    transform = make_eval_transform(resize_size=32, crop_size=32)
    dataset = LabelledImageFolder(photo_folder, transform)
    cache = FeatureCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return extract(model, dataset, class_token)

    first = cache.load_or_extract(model_fingerprint(model), dataset, repr(transform), "cls", compute)
    again = cache.load_or_extract(model_fingerprint(model), dataset, repr(transform), "cls", compute)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(again.features, first.features)
    assert again.labels.tolist() == first.labels.tolist() and again.skipped == 1

    other_model = tiny_vit()
    with torch.no_grad():
        other_model.norm.bias.add_(1.0)
    other_transform = make_eval_transform(resize_size=36, crop_size=32)
    cache.load_or_extract(model_fingerprint(other_model), dataset, repr(transform), "cls", compute)
    cache.load_or_extract(model_fingerprint(model), dataset, repr(other_transform), "cls", compute)
    (photo_folder / "a" / "0.png").write_bytes((photo_folder / "b" / "2.png").read_bytes())
    changed = LabelledImageFolder(photo_folder, transform)
    cache.load_or_extract(model_fingerprint(model), changed, repr(transform), "cls", compute)
    assert len(calls) == 4
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_a_folder_without_class_subfolders_is_refused_as_missing_labels(tmp_path, photos):
    photos[0].save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="labels missing .* 1 images lie directly in it"):
        LabelledImageFolder(tmp_path)


def test_splits_with_different_classes_are_refused_naming_them(tmp_path, photos):
    for split, classes in (("train", ("cat", "dog", "owl")), ("test", ("cat", "dog"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            photos[0].save(tmp_path / split / name / "x.png")
    with pytest.raises(ValueError, match=r"class mismatch .*3 classes.*2 classes.*only in train \['owl'\]"):
        check_same_classes(LabelledImageFolder(tmp_path / "train"), LabelledImageFolder(tmp_path / "test"))
