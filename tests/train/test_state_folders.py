"""Where a run keeps its checkpoints when they must outlive its output folder (``--checkpoints``): one folder per
recipe and inputs, found again by the same run and never by a changed one."""

from dinov2.configuration.recipes import load_recipe
from dinov2.train.checkpoints import state_folder


def test_the_same_recipe_and_inputs_find_the_same_folder_and_any_change_another(tmp_path):
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    (images / "a" / "1.png").write_bytes(b"\x89PNG one")
    manifest = tmp_path / "curated.parquet"
    manifest.write_bytes(b"PAR1 rows")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "backbone.safetensors").write_bytes(b"weights 1")
    recipe = load_recipe("cpu_tiny")
    root = tmp_path / "checkpoints"

    folder = state_folder(root, recipe, manifest, [str(teacher)])
    assert folder.parent == root and folder.name.startswith("cpu_tiny-")
    assert state_folder(root, load_recipe("cpu_tiny"), manifest, [str(teacher)]) == folder

    changed_recipe = load_recipe("cpu_tiny", ["optim.base_lr=0.01"])
    assert state_folder(root, changed_recipe, manifest, [str(teacher)]) != folder
    manifest.write_bytes(b"PAR1 other rows")  # same size, other content: a manifest is digested by its bytes
    assert state_folder(root, recipe, manifest, [str(teacher)]) != folder
    manifest.write_bytes(b"PAR1 rows")
    (teacher / "backbone.safetensors").write_bytes(b"weights 2")  # a retrained teacher of the same shapes
    assert state_folder(root, recipe, manifest, [str(teacher)]) != folder
    (teacher / "backbone.safetensors").write_bytes(b"weights 1")
    assert state_folder(root, recipe, manifest, [str(teacher)]) == folder

    # an image folder as data is digested by its files' names and sizes
    by_folder = state_folder(root, recipe, images, [])
    (images / "a" / "2.png").write_bytes(b"\x89PNG two")
    assert state_folder(root, recipe, images, []) != by_folder
