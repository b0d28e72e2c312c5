import os

# No telemetry from any tool during tests.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Class-balanced Fashion-MNIST ImageFolder trees (`<root>/{train,test}/<class>/*.png`, grey 28x28),
    the first `train_per_class` / `test_per_class` of every class in a seeded order; written once per size."""
    from dinov2.data.fashion_mnist import write_image_folder

    made: dict[tuple[int, int], Path] = {}

    def build(train_per_class: int, test_per_class: int) -> Path:
        if (train_per_class, test_per_class) not in made:
            out = tmp_path_factory.mktemp("fashion_mnist") / f"{train_per_class}_{test_per_class}"
            made[(train_per_class, test_per_class)] = write_image_folder(out, train_per_class, test_per_class)
        return made[(train_per_class, test_per_class)]

    return build


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (SQLite store, artifacts served from a folder), started as
    `make up` starts it (``flows.services.mlflow_server_program``); yields its URI."""
    from flows.services import mlflow_server_program

    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    program = mlflow_server_program(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), "127.0.0.1", port)
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        program.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **program.environment},
    )  # fmt: skip
    try:
        _wait_for_http(f"{uri}/health", process, timeout=90)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch) -> str:
    """Point this test's MLflow client (and the processes it starts) at the real server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture
def cli(monkeypatch, capsys):
    """Runs ``dinov2 ARGS`` in this process, as its console script does, and expects it to exit with
    ``exit_code`` (0: done, 2: bad input). Returns what it printed."""
    from dinov2.cli import run

    def run_cli(args: list[str], exit_code: int = 0) -> str:
        monkeypatch.setattr(sys, "argv", ["dinov2", *args])
        with pytest.raises(SystemExit) as exit_status:
            run()
        assert (exit_status.value.code or 0) == exit_code, capsys.readouterr().out[-3000:]
        return capsys.readouterr().out

    return run_cli


@pytest.fixture
def cli_error(cli):
    """``cli`` for a command that must exit 2 (bad input)."""
    return lambda args: cli(args, exit_code=2)
