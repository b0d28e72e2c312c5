"""The MLflow model registry of backbones: each evaluated export becomes a version, and ``champion`` follows the
best one by a chosen metric."""

from pathlib import Path

from dinov2.tracking import Tracker


def register_backbone(
    tracker: Tracker, backbone_path: str | Path, name: str, metric: str, value: float
) -> dict[str, str | bool]:
    """Log a backbone as an MLflow model of the tracker's run, register it as a new version of ``name``
    with the alias ``candidate``, and move ``champion`` to it when ``value`` of ``metric`` (higher is
    better) beats the current champion's, or when there is none."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from dinov2.hub import load_backbone

    model = load_backbone(backbone_path).eval()
    # pickled: loading it needs this package installed (mlflow.pytorch.load_model("models:/NAME@champion"))
    info = mlflow.pytorch.log_model(
        model, name="backbone", serialization_format="pickle", pip_requirements=[f"torch=={torch.__version__}"]
    )
    version = mlflow.register_model(info.model_uri, name, tags={metric: str(value), "run_id": tracker.run_id})
    client = MlflowClient()
    client.set_registered_model_alias(name, "candidate", version.version)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
        best = float(champion.tags.get(metric, "-inf"))
    except mlflow.exceptions.MlflowException:
        champion, best = None, float("-inf")
    promoted = value > best
    if promoted:
        client.set_registered_model_alias(name, "champion", version.version)
    tracker.set_tags({"dinov2.registered": f"{name}/{version.version}", "dinov2.champion": str(promoted).lower()})
    return {"name": name, "version": str(version.version), "champion": promoted}
