from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar_subset(cifar10_root, tmp_path_factory):
    """A class-balanced slice of the CIFAR-10 copy (symlinks, ImageFolder layout): the first
    ``n_train`` / ``n_test`` images of every class in sorted file order."""
    made: dict[tuple[int, int], Path] = {}

    def build(n_train: int, n_test: int) -> Path:
        if (n_train, n_test) in made:
            return made[(n_train, n_test)]
        root = tmp_path_factory.mktemp(f"cifar_{n_train}_{n_test}")
        for split, count in (("train", n_train), ("test", n_test)):
            for class_dir in sorted((cifar10_root / split).iterdir()):
                target = root / split / class_dir.name
                target.mkdir(parents=True)
                for image in sorted(class_dir.iterdir())[:count]:
                    (target / image.name).symlink_to(image)
        made[(n_train, n_test)] = root
        return root

    return build
