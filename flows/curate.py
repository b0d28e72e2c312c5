"""The ``curate`` flow: the curation stages of the DVC pipeline (prepare, the copy descriptor's training,
the two embeddings, dedup, retrieve), which turn an image collection into the curated pretraining manifest."""

from prefect import flow

from flows.pipeline import repro

CURATION_STAGES = ("prepare", "descriptor", "embed", "embed_retrieval", "dedup", "retrieve")


@flow(name="curate")
def curate(stages: list[str] | None = None, retries: int = 1, repository: str | None = None) -> dict[str, dict]:
    """``dvc repro`` of the curation stages in order (or of the listed ``stages``) in ``repository``
    (default: the working directory)."""
    return repro(list(stages or CURATION_STAGES), retries, repository)
