from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def folder_with_bad_files(tmp_path, photos) -> Path:
    """Two classes of real photos plus a truncated JPEG, a text file named .jpg and a README.txt.

    Listed images, in order: cats/astronaut.jpg, cats/coffee.png, dogs/chelsea.jpg,
    dogs/not_an_image.jpg (text), dogs/truncated.jpg (first 300 bytes of a real JPEG).
    """
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    small = [photo.resize((64, 48), Image.BICUBIC) for photo in photos]
    small[0].save(root / "cats" / "astronaut.jpg", quality=90)
    small[1].save(root / "cats" / "coffee.png")
    small[2].save(root / "dogs" / "chelsea.jpg", quality=90)
    (root / "dogs" / "not_an_image.jpg").write_text("this is a text file with an image suffix\n")
    small[3].save(tmp_path / "rocket.jpg", quality=90)
    (root / "dogs" / "truncated.jpg").write_bytes((tmp_path / "rocket.jpg").read_bytes()[:300])
    (root / "README.txt").write_text("not an image and not listed\n")
    return root
