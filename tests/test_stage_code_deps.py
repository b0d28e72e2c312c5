"""dvc.yaml lists, as each stage's code deps, exactly the project files its command imports: an edit to one of
them makes `dvc status` report the stage changed, an edit to a file only another stage runs does not."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2.code_deps import as_paths, command_modules, update

REPOSITORY = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def test_dvc_yaml_lists_the_code_each_stage_command_imports():
    assert update(REPOSITORY / "dvc.yaml", check=True) == [], "run `python -m dinov2.code_deps` to rewrite them"
    dedup = as_paths(command_modules("dedup"))
    assert {"dinov2/curation/dedup.py", "dinov2/copydetect/verify.py", "dinov2/configuration"} <= set(dedup)
    # what dedup never runs: the training engine, the report, the embedders (embed's)
    assert not [path for path in dedup if path.startswith(("dinov2/train/train", "dinov2/report/page"))]
    assert "dinov2/curation/embedders.py" not in dedup


@pytest.fixture(scope="module")
def committed_pipeline(tmp_path_factory) -> Path:
    """A copy of the repository's pipeline and code in a git + DVC repository, every stage recorded in dvc.lock
    over placeholder data (`dvc commit`), so that `dvc status` answers for code edits alone."""
    root = tmp_path_factory.mktemp("pipeline")
    for name in ("dinov2", "configs"):
        shutil.copytree(REPOSITORY / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPOSITORY / name, root / name)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True)
    placeholders = """
from pathlib import Path
from dvc.repo import Repo
for stage in Repo(".").index.stages:
    for out in stage.outs:
        Path(out.def_path).mkdir(parents=True, exist_ok=True)
    for dep in stage.deps:
        path = Path(dep.def_path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("") if path.suffix else path.mkdir()
"""
    subprocess.run([sys.executable, "-c", placeholders], cwd=root, check=True)
    subprocess.run([DVC, "commit", "--force", "-q"], cwd=root, check=True)
    return root


def changed_stages(root: Path) -> list[str]:
    result = subprocess.run([DVC, "status", "--json"], cwd=root, capture_output=True, text=True, check=True)
    return sorted(json.loads(result.stdout))


@pytest.mark.parametrize(
    ("module", "stages"),
    [
        ("dinov2/curation/dedup.py", ["dedup"]),  # dedup's own module
        ("dinov2/report/page.py", ["report"]),  # a module only the report runs
        ("dinov2/copydetect/edits.py", ["descriptor", "prepare", "report"]),  # planting, training views, scoring
    ],
)
def test_an_edit_to_a_module_marks_exactly_the_stages_that_import_it(committed_pipeline, module, stages):
    assert changed_stages(committed_pipeline) == []
    path = committed_pipeline / module
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        assert changed_stages(committed_pipeline) == stages
    finally:
        path.write_text(original)
