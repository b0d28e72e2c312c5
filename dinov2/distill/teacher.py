"""The frozen distillation teacher: a trained backbone of any kind ``dinov2.train.sources`` reads (a run's
``teacher/`` folder, a ``.safetensors`` backbone, a Hugging Face folder, a torch.hub name with weights, a
``.pth`` path or URL), under the names distillation uses; its errors start with ``teacher``."""

from dinov2.train.sources import HEAD_NAMES, BackboneSource, HeadShape, SourceError, load_source

TeacherError = SourceError
TeacherSpec = BackboneSource
load_teacher = load_source

__all__ = ["HEAD_NAMES", "HeadShape", "TeacherError", "TeacherSpec", "inspect_teacher", "load_teacher"]


def inspect_teacher(source: str | None, weights: str | None = None) -> BackboneSource:
    """What the teacher is, from headers and shapes only; errors name the source."""
    from dinov2.train.sources import inspect_source

    if not source:
        raise TeacherError("no teacher: set distillation.teacher in the recipe or pass --teacher")
    return inspect_source(source, weights, role="teacher")
