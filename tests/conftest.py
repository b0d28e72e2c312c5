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
from collections.abc import Iterator, Sequence  # noqa: E402
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def unused_port():
    """``free_port``: a function returning a TCP port on 127.0.0.1 that nothing listens on (a fixture, so that the
    conftest files below and the tests share this one function without importing a conftest module)."""
    return free_port


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
    port = free_port()
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


PYTHON_MODULE = (sys.executable, "-m")  # how the `dinov2` command runs when no other launcher is named


def dinov2_command(*args: str, launcher: Sequence[str] = PYTHON_MODULE) -> list[str]:
    """``python -m dinov2 ARGS``, or ``LAUNCHER dinov2 ARGS`` for a launcher that takes a module
    (``python -m torch.distributed.run ... -m``, ``deepspeed ... --module``)."""
    return [*launcher, "dinov2", *args]


@pytest.fixture(scope="session")
def run_dinov2():
    """Runs the `dinov2` command as a user does, in a process of its own, and waits for it:
    ``run_dinov2(*args, cwd=None, env=None, timeout=600, check=False, launcher=PYTHON_MODULE)`` returns the
    ``CompletedProcess`` with its output as text. ``check``: the command must exit 0 (the failure shows the command
    and the ends of its output). ``launcher``: see ``dinov2_command``."""

    def run(
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 600,
        check: bool = False,
        launcher: Sequence[str] = PYTHON_MODULE,
    ) -> subprocess.CompletedProcess:
        command = dinov2_command(*args, launcher=launcher)
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        return result

    return run


@pytest.fixture(scope="session")
def start_dinov2():
    """Starts ``python -m dinov2 ARGS`` and returns at once, for a test that watches, kills or waits for the process:
    ``start_dinov2(*args, cwd=None, env=None, output=True)`` returns the ``Popen``, its stdout and stderr on pipes
    as text (read them with ``communicate``), or discarded with ``output=False`` (a run nobody reads must not block
    on a full pipe)."""

    def start(
        *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, output: bool = True
    ) -> subprocess.Popen:
        stream = subprocess.PIPE if output else subprocess.DEVNULL
        return subprocess.Popen(dinov2_command(*args), cwd=cwd, env=env, stdout=stream, stderr=stream, text=True)

    return start


# The smallest default data that still plants every kind of copy: 40 Fashion-MNIST pool images + 6 planted copies
# of them + 4 of test images + 3 digits + 2 photos = 55 pool images; 2 seed, 1 eval-train and 2 eval-test images
# per class.
SMALL_DEFAULT_DATA = dict(
    seed_per_class=2,
    pool_images=40,
    eval_train_per_class=1,
    eval_test_per_class=2,
    pool_duplicates=6,
    test_copies=4,
    distractor_digits=3,
    distractor_photos=2,
)


@pytest.fixture
def small_default_sizes() -> dict[str, int]:
    """The ``prepare.default_data`` sizes of ``small_default_data`` (a copy: change it freely)."""
    return dict(SMALL_DEFAULT_DATA)


@pytest.fixture(scope="session")
def small_default_data(tmp_path_factory) -> tuple[Path, dict]:
    """The default data at the small sizes, built once per session by ``build_default_data``: (its folder, the
    metrics it returned). Shared: read it, never write into it (its manifests name its files by absolute path, so a
    test that needs a folder of its own builds one)."""
    from dinov2.configuration.curation import DefaultData
    from dinov2.demo_data.build import build_default_data

    out = tmp_path_factory.mktemp("small_default_data") / "prepare"
    return out, build_default_data(out, DefaultData(**SMALL_DEFAULT_DATA))
