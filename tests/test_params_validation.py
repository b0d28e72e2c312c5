"""A misconfigured params file stops a stage before any work: exit code 2, one line naming the problem, no output."""

from pathlib import Path

import pytest

from dinov2.configuration.params import Params

# An unknown section's error lists exactly the sections of the params schema, in its order (which sections those are,
# and that dvc.yaml tracks each of them, is tested in test_configuration_sources.py).
KNOWN = f"known sections: {', '.join(Params.model_fields)}"


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def only_the_params_file_is_left(folder: Path, params: str = "params.yaml") -> bool:
    return sorted(p.name for p in folder.iterdir()) == [params]


def test_an_unknown_section_is_named_with_the_known_ones_by_the_real_process(tmp_path, run_dinov2):
    (tmp_path / "params.yaml").write_text("prepare:\n  labels_from_folders: true\ndedupe:\n  k: 8\n")
    result = run_dinov2("prepare-default", "--out", "prepare", "--params", "params.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == f"error: params.yaml: unknown section 'dedupe'; {KNOWN}\n"
    assert only_the_params_file_is_left(tmp_path)


@pytest.mark.parametrize(
    "command",
    [
        ["embed", "--manifest", "manifest.parquet", "--out", "embeddings"],
        ["dedup", "--pool", "embeddings", "--out", "dedup"],
        ["evaluate", "--backbone", "raw_pixels", "--out", "report", "--metrics", "metrics.json"],
        ["train-descriptor", "--manifest", "manifest.parquet", "--out", "descriptor"],
    ],
    ids=["embed", "dedup", "evaluate", "train-descriptor"],
)
def test_every_stage_refuses_a_file_with_unknown_sections(command, workdir, cli_error):
    (workdir / "params.yaml").write_text("embed: {}\nretreive: {}\ntrain: {}\n")
    out = cli_error(command)
    assert out == f"error: params.yaml: unknown sections 'retreive', 'train'; {KNOWN}\n"
    assert only_the_params_file_is_left(workdir)


def test_an_unknown_key_is_named_with_its_section(workdir, cli_error):
    (workdir / "params.yaml").write_text("prepare:\n  default_data:\n    pool_image: 100\n")
    out = cli_error(["prepare-default", "--out", "prepare"])
    assert out == "error: params.yaml [prepare]: unknown key 'default_data.pool_image'\n"
    assert only_the_params_file_is_left(workdir)


@pytest.mark.parametrize(
    "section, message",
    [
        (
            "prepare:\n  default_data:\n    seed_per_class: 0\n",
            "params.yaml [prepare]: 'default_data.seed_per_class': Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "prepare:\n  default_data:\n    pool_images: 60000\n",
            "params.yaml [prepare]: 'default_data': Value error, pool_images = 60000 exceeds the 58500 train images "
            "left (got {'pool_images': 60000})",
        ),
        (
            "dedup:\n  relative_threshold: 1.5\n",
            "params.yaml [dedup]: 'relative_threshold': Value error, a cosine threshold must lie in [0, 1], got 1.5 "
            "(got 1.5)",
        ),
    ],
    ids=["below-minimum", "more-than-fashion-mnist-holds", "threshold-above-one"],
)
def test_an_out_of_range_value_is_named_with_its_section(section, message, workdir, cli_error):
    (workdir / "params.yaml").write_text(section)
    stage = section.partition(":")[0]
    command = ["prepare-default", "--out", "out"] if stage == "prepare" else ["dedup", "--pool", "emb", "--out", "out"]
    assert cli_error(command) == f"error: {message}\n"
    assert only_the_params_file_is_left(workdir)


def test_a_params_file_that_was_named_but_is_missing_is_an_error(workdir, cli_error):
    (workdir / "params.yaml").write_text("prepare: {}\n")
    out = cli_error(["prepare-default", "--out", "out", "--params", "tuned.yaml"])
    assert out == "error: configuration file not found: tuned.yaml\n"
    out = cli_error(["retrieve", "--pool", "e", "--kept", "k.parquet", "--out", "out", "--params", "tuned.yaml"])
    assert out == "error: configuration file not found: tuned.yaml\n"
    assert only_the_params_file_is_left(workdir)
