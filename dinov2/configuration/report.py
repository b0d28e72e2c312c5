"""The ``report`` section of params.yaml: how much of each stage the page draws."""

from pydantic import Field

from dinov2.configuration import Section


class ReportParams(Section):
    duplicate_groups: int = Field(6, ge=0, description="Duplicate groups drawn as image rows (0: none).")
    images_per_group: int = Field(6, ge=2, description="Images drawn per duplicate group, the kept one first.")
