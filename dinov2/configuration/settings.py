"""The environment a process runs in, read in one place: typed, validated, named by its variables.

``Settings()`` reads the environment when it is built (cheap: build one where it is needed, so a test's
or a launcher's change of the environment is seen). A bad value is an error that names the variable.

Launcher variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``) are torch.distributed's
protocol, not settings, and are read where the process group is made.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dinov2.configuration import ConfigError

REPOSITORY = Path(__file__).resolve().parents[2]


def variable(schema: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field is read from."""
    alias = schema.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"{schema.model_config.get('env_prefix', '')}{field}".upper()


def _read(schema: type[BaseSettings]) -> BaseSettings:
    try:
        return schema()
    except ValidationError as error:
        problems = []
        for item in error.errors():
            name = str(item["loc"][0]) if item["loc"] else "?"
            if name in schema.model_fields:  # a field read through the prefix, not an alias
                name = variable(schema, name)
            problems.append(f"{name}={item.get('input')!r}: {item['msg']}")
        raise ConfigError("; ".join(problems)) from None


class Settings(BaseSettings):
    """What a stage command reads from its environment."""

    model_config = SettingsConfigDict(extra="ignore")

    tracking: Literal["on", "off"] = Field(
        "on", validation_alias="DINOV2_TRACKING", description="off: no MLflow at all in this process"
    )
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias="MLFLOW_TRACKING_URI", description="unset: a SQLite store under outputs/mlflow/"
    )
    pipeline_run_id: str | None = Field(
        None, validation_alias="DINOV2_PIPELINE_RUN_ID", description="set by `dinov2 pipeline`: runs become children"
    )
    prefect_flow_run_id: str | None = Field(
        None, validation_alias="PREFECT__FLOW_RUN_ID", description="set by Prefect for the processes it launches"
    )
    dvc_stage: str | None = Field(None, validation_alias="DVC_STAGE", description="set by DVC for a stage command")
    fashion_mnist: Path | None = Field(
        None, validation_alias="DINOV2_FASHION_MNIST", description="a folder that holds Fashion-MNIST"
    )

    @field_validator("tracking", mode="before")
    @classmethod
    def _on_or_off(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def read(cls) -> "Settings":
        return _read(cls)  # type: ignore[return-value]


class ServiceSettings(BaseSettings):
    """The local services of ``make up``: where they listen and where they keep their state."""

    model_config = SettingsConfigDict(extra="ignore", env_prefix="DINOV2_")

    services_host: str = Field("127.0.0.1", description="address the servers bind")
    prefect_port: int = Field(4200, gt=0, lt=65536)
    mlflow_port: int = Field(5000, gt=0, lt=65536)
    services_dir: Path = Field(REPOSITORY / "outputs" / "services", description="state, logs and pids")
    work_pools: str = Field("local,gpu-cluster", description="comma-separated Prefect work pools, one worker each")

    @field_validator("work_pools")
    @classmethod
    def _names_a_pool(cls, value: str) -> str:
        if not [pool for pool in value.split(",") if pool]:
            raise ValueError("names no work pool")
        return value

    @classmethod
    def read(cls) -> "ServiceSettings":
        return _read(cls)  # type: ignore[return-value]

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(pool for pool in self.work_pools.split(",") if pool)

    @property
    def state_dir(self) -> Path:
        return self.services_dir.resolve()

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.services_host}:{self.prefect_port}/api"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{self.services_host}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.services_host}:{self.mlflow_port}"

    @property
    def client_environment(self) -> dict[str, str]:
        """What a shell, a worker and the flow runs it starts need to reach these services."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}
