"""The distillation recipe: the pretraining recipe plus a ``distillation`` section.

Everything the two share means the same (schedules, crops, optimiser, DeepSpeed, checkpoints); the
``student`` section is the base every distilled student starts from, and
``distillation.students`` names each student with the keys where it differs (one run can distil
ViT-S and ViT-B from one teacher).
"""

from typing import Any

from pydantic import Field, model_validator

from dinov2.configuration import ConfigError, Section, merge, validate
from dinov2.train.config import Recipe, StudentSection


class HeadFittingSection(Section):
    """Heads for a teacher that has none (released backbones): DINO + iBOT heads trained against the
    frozen backbone's own targets, with the recipe's schedules compressed into ``iterations``."""

    iterations: int = Field(1000, ge=0, description="0: no head fitting; a teacher without heads is then an error")
    base_lr: float | None = Field(None, gt=0, description="lr for a batch of 1024; the recipe's when unset")


class DistillationSection(Section):
    teacher: str | None = Field(
        None,
        description="a run's teacher folder (backbone.safetensors + heads.safetensors), a .safetensors backbone, "
        "a torch.hub name (dinov2_vitg14) or a .pth checkpoint path/URL",
    )
    teacher_weights: str | None = Field(
        None, description="for a hub-name teacher: checkpoint path/URL, or LVD142M (the released weights)"
    )
    students: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"student": {}}, description="name -> keys of `student` that differ"
    )
    head_fitting: HeadFittingSection = Field(default_factory=HeadFittingSection)

    @model_validator(mode="after")
    def _named_students(self) -> "DistillationSection":
        if not self.students:
            raise ValueError("distillation.students must name at least one student")
        for name in self.students:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"student name {name!r} must be letters, digits, '_' or '-' (it names a folder)")
        return self


class DistillRecipe(Recipe):
    distillation: DistillationSection = Field(default_factory=DistillationSection)

    @model_validator(mode="after")
    def _students_fit_the_crops(self) -> "DistillRecipe":
        for name, student in self.student_sections().items():
            for crops in ("global_crops_size", "local_crops_size"):
                size = getattr(self.crops, crops)
                if size % student.patch_size:
                    raise ValueError(
                        f"crops.{crops} {size} is not a multiple of student {name!r}'s patch_size {student.patch_size}"
                    )
        return self

    def student_sections(self) -> dict[str, StudentSection]:
        """Every student's full section: ``student`` with its own keys merged over it, validated."""
        base = self.student.model_dump()
        sections = {}
        for name, delta in self.distillation.students.items():
            try:
                sections[name] = validate(StudentSection, merge(base, delta), f"distillation.students.{name}")
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return sections
