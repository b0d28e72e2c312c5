"""Training recipes: the schema of pretraining and distillation runs, and the YAML recipes built on it.

The schema's defaults are the reference's recipe (ssl_default_config.yaml), and a recipe file states only
what it changes (``configs/recipes/vitg14.yaml`` is a dozen lines). A recipe may build on another one with
``base: NAME`` (``distill_cpu_tiny`` on ``cpu_tiny``). Resolution order: schema defaults <- base recipes <-
the recipe <- a params.yaml section <- ``--set`` overrides, validated as a whole; an unknown or bad key is
an error that names it and the files it may come from. ``dinov2 config pretrain --recipe NAME`` prints the result.

Key names follow the reference's where it has them, so recipes port over; differences:
``train.batch_size`` is the GLOBAL batch (the sampler and the lr scaling use it, so a run resumes on any
world size), ``train.iterations_per_epoch`` replaces OFFICIAL_EPOCH_LENGTH, and ``deepspeed`` /
``checkpoint`` / ``data`` sections replace the FSDP settings.
"""

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, model_validator

from dinov2.configuration import ConfigError, Section, merge, read_yaml, validate

RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipes"
DEFAULT_RECIPE = "default"  # the schema's defaults, no file

Pair = tuple[float, float]


class DinoSection(Section):
    loss_weight: float = Field(1.0, ge=0)
    head_n_prototypes: int = Field(65536, gt=0)
    head_bottleneck_dim: int = Field(256, gt=0)
    head_nlayers: int = Field(3, ge=1)
    head_hidden_dim: int = Field(2048, gt=0)
    koleo_loss_weight: float = Field(0.1, ge=0)


class IbotSection(Section):
    loss_weight: float = Field(1.0, ge=0)
    mask_sample_probability: float = Field(0.5, ge=0, le=1)
    mask_ratio_min_max: Pair = (0.1, 0.5)
    separate_head: bool = False
    head_n_prototypes: int = Field(65536, gt=0)
    head_bottleneck_dim: int = Field(256, gt=0)
    head_nlayers: int = Field(3, ge=1)
    head_hidden_dim: int = Field(2048, gt=0)


class TrainSection(Section):
    batch_size: int = Field(1024, gt=0, description="global batch size over all ranks")
    iterations_per_epoch: int = Field(1250, gt=0)
    seed: int = 0
    num_workers: int = Field(8, ge=0)
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    activation_checkpointing: bool = Field(
        False, description="trained blocks recompute their activations in the backward pass (less memory, more compute)"
    )
    compile: bool = Field(False, description="torch.compile every transformer block (student and teacher)")


class StudentSection(Section):
    arch: str = "vit_large"
    patch_size: int = Field(16, gt=0)
    img_size: int = Field(224, gt=0, description="size of the learned position-embedding grid")
    drop_path_rate: float = Field(0.3, ge=0, lt=1)
    drop_path_uniform: bool = True
    layerscale: float | None = 1.0e-5
    ffn_layer: Literal["mlp", "swiglu", "swiglufused"] = "mlp"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = Field(0, ge=0)
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    # tiny architectures for CPU runs; only read when arch is "custom"
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    pretrained_weights: str | None = Field(
        None,
        description="distillation students: start the backbone from these weights (a .safetensors export or a "
        "checkpoint path/URL); pretraining starts from a backbone with init.source",
    )


class TeacherSection(Section):
    momentum_teacher: float = Field(0.992, ge=0, le=1)
    final_momentum_teacher: float = Field(1.0, ge=0, le=1)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp_epochs: float = Field(30, ge=0)


class OptimSection(Section):
    epochs: int = Field(100, gt=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    base_lr: float = Field(0.004, gt=0, description="learning rate for a global batch of 1024")
    warmup_epochs: float = Field(10, ge=0)
    min_lr: float = Field(1.0e-6, ge=0)
    clip_grad: float = Field(3.0, ge=0)
    freeze_last_layer_epochs: float = Field(1, ge=0)
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_1024", "none"] = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = Field(0.2, ge=0)
    layerwise_decay: float = Field(0.9, gt=0, le=1)
    adamw_beta1: float = Field(0.9, ge=0, lt=1)
    adamw_beta2: float = Field(0.999, ge=0, lt=1)
    adamw_implementation: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto", description="torch AdamW kernel; auto: fused on CUDA, torch's default elsewhere"
    )


class CropsSection(Section):
    global_crops_scale: Pair = (0.32, 1.0)
    local_crops_number: int = Field(8, ge=0)
    local_crops_scale: Pair = (0.05, 0.32)
    global_crops_size: int = Field(224, gt=0)
    local_crops_size: int = Field(96, gt=0)
    blur_probabilities: Literal["intended", "reference"] = "intended"


class DeepSpeedSection(Section):
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="cpu: the optimizer state in CPU memory, stepped by DeepSpeed's CPU Adam (ZeRO-1/2/3)"
    )
    precision: Literal["auto", "fp32", "autocast_bf16", "deepspeed_bf16"] = Field(
        "auto",
        description="auto: autocast_bf16 on CUDA, fp32 on CPU; autocast_bf16: fp32 weights, bf16 matmuls; "
        "deepspeed_bf16: DeepSpeed's bf16 mode (bf16 weights, gradients and communication, fp32 master "
        "weights in the optimizer) with the EMAs kept in fp32",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedSection":
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO-0 has no optimizer state to offload)")
        return self


class CheckpointSection(Section):
    every_n_iterations: int = Field(1250, gt=0)
    keep_last: int = Field(2, ge=1)
    export_every_n_iterations: int = Field(12500, gt=0, description="teacher backbone + heads as safetensors")


class EvaluationSection(Section):
    knn_every_n_iterations: int = Field(
        0, ge=0, description="kNN of the final models every N iterations; 0: at the start and the end only"
    )
    knn_dataset: str | None = Field(None, description="ImageFolder root with train/ and test/ for kNN")
    knn_max_train_images: int = Field(10000, gt=0)
    knn_max_test_images: int = Field(2000, gt=0)


class MonitorSection(Section):
    """The collapse monitor (dinov2/train/collapse.py): when the teacher's targets stay uniform or its
    bottleneck outputs stay identical for ``window`` iterations, warn (and stop if ``stop``)."""

    window: int = Field(50, ge=1, description="consecutive collapsed iterations before the warning")
    grace_iterations: int = Field(50, ge=0, description="iterations not judged (initialisation looks collapsed)")
    entropy_threshold: float = Field(0.98, gt=0, le=1, description="target entropy / ln K at or above: collapsed")
    cosine_threshold: float = Field(0.99, gt=0, le=1, description="bottleneck mean cosine at or above: collapsed")
    stop: bool = Field(False, description="stop the run (exit code 4) instead of warning")


class HeadFittingSection(Section):
    """Heads for a backbone that has none (released backbones): DINO + iBOT heads trained against the
    frozen backbone's own targets, with the recipe's schedules compressed into ``iterations``."""

    iterations: int = Field(
        1000, ge=0,
        description="0: no head fitting; a distillation teacher without heads is then refused, and a pretraining "
        "init source without heads starts with random heads",
    )  # fmt: skip
    base_lr: float | None = Field(None, gt=0, description="lr for a batch of 1024; the recipe's when unset")
    momentum_teacher: float | None = Field(
        None, ge=0, le=1,
        description="the heads' EMA momentum at the start of fitting (cosine to teacher.final_momentum_teacher); "
        "the recipe's teacher.momentum_teacher when unset",
    )  # fmt: skip


SOURCE_KINDS = (
    "a run's teacher folder (backbone.safetensors + heads.safetensors), a .safetensors backbone, a Hugging Face "
    "DINOv2 folder, a torch.hub name (dinov2_vitb14) or a .pth checkpoint path/URL"
)


class InitSection(Section):
    """Continued pretraining: the student (and so the teacher, its EMA, which starts equal) starts from a trained
    backbone; its DINO/iBOT heads come with it (a run's teacher folder) or are fitted first on the frozen backbone
    (``head_fitting``)."""

    source: str | None = Field(None, description=f"the backbone to continue from: {SOURCE_KINDS}")
    weights: str | None = Field(
        None, description="for a hub-name source: checkpoint path/URL, or LVD142M (the released weights)"
    )
    head_fitting: HeadFittingSection = Field(default_factory=HeadFittingSection)

    @model_validator(mode="after")
    def _weights_need_a_source(self) -> "InitSection":
        if self.weights is not None and self.source is None:
            raise ValueError("init.weights are the weights of a torch.hub init.source: set init.source too")
        return self


class Recipe(Section):
    name: str = DEFAULT_RECIPE
    dino: DinoSection = Field(default_factory=DinoSection)
    ibot: IbotSection = Field(default_factory=IbotSection)
    train: TrainSection = Field(default_factory=TrainSection)
    student: StudentSection = Field(default_factory=StudentSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    crops: CropsSection = Field(default_factory=CropsSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    init: InitSection = Field(default_factory=InitSection)

    # whether ``student.pretrained_weights`` may be set: distillation students start from a backbone that way;
    # a pretraining run starts from one with ``init`` (which also gives the teacher its heads)
    students_start_from_weights: ClassVar[bool] = False

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        student = self.student
        if student.pretrained_weights and not self.students_start_from_weights:
            raise ValueError(
                "student.pretrained_weights initialises distillation students; to continue pretraining from "
                "a backbone set init.source (its heads are loaded, or fitted first: init.head_fitting)"
            )
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.crops, name)
            if size % student.patch_size:
                raise ValueError(f"crops.{name} {size} is not a multiple of student.patch_size {student.patch_size}")
        if student.img_size % student.patch_size:
            raise ValueError(
                f"student.img_size {student.img_size} is not a multiple of patch_size {student.patch_size}"
            )
        if student.arch == "custom" and None in (student.embed_dim, student.depth, student.num_heads):
            raise ValueError("student.arch 'custom' needs student.embed_dim, student.depth and student.num_heads")
        low, high = self.ibot.mask_ratio_min_max
        if not 0 <= low <= high <= 1:
            raise ValueError(
                f"ibot.mask_ratio_min_max {self.ibot.mask_ratio_min_max} must satisfy 0 <= min <= max <= 1"
            )
        return self

    @property
    def total_iterations(self) -> int:
        return self.optim.epochs * self.train.iterations_per_epoch


class DistillationSection(Section):
    teacher: str | None = Field(None, description=f"the frozen teacher: {SOURCE_KINDS}")
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

    students_start_from_weights: ClassVar[bool] = True

    @model_validator(mode="after")
    def _students_fit_the_crops(self) -> "DistillRecipe":
        if self.init.source is not None:
            raise ValueError(
                "init.source continues pretraining; distillation students start from student.pretrained_weights"
            )
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


RecipeT = TypeVar("RecipeT", bound=Recipe)


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path, or the name of a file in configs/recipes/ (``vitg14`` -> configs/recipes/vitg14.yaml)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    candidate = RECIPE_DIR / f"{recipe}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown recipe {recipe!r}; known recipes: {', '.join(known_recipes())} (or give a .yaml path)"
        )
    return candidate


def known_recipes() -> list[str]:
    return sorted([DEFAULT_RECIPE, *(path.stem for path in RECIPE_DIR.glob("*.yaml"))])


def recipe_delta(recipe: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """A recipe's keys over those of its ``base`` recipes (not yet over the schema's defaults), and the files
    they came from, base first. The recipe is named for its file unless it states a name; ``default`` is the
    schema's defaults alone."""
    if recipe == DEFAULT_RECIPE:
        return {}, []
    path = resolve_recipe_path(recipe)
    if path.resolve() in _seen:
        chain = " -> ".join(p.stem for p in (*_seen, path.resolve()))
        raise ConfigError(f"recipe {path} builds on itself: {chain}")
    data = read_yaml(path)
    base = data.pop("base", None)
    files = [path]
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a recipe name or path, got {base!r}")
        inherited, base_files = recipe_delta(base, (*_seen, path.resolve()))
        inherited.pop("name", None)
        data = merge(inherited, data)
        files = [*base_files, path]
    data.setdefault("name", path.stem)
    return data, files


def parse_override(text: str) -> dict:
    """'optim.base_lr=1e-3' -> {'optim': {'base_lr': 0.001}} (value parsed as YAML)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def load_recipe(
    recipe: str | Path,
    overrides: list[str] | None = None,
    schema: type[RecipeT] = Recipe,
    delta: dict | None = None,
    delta_source: str = "",
) -> RecipeT:
    """Schema defaults <- recipe (over its bases) <- ``delta`` (a params.yaml section) <- command-line
    overrides, validated as a whole against ``schema``; an error names the files the bad key may come from."""
    data, files = recipe_delta(recipe)
    data = merge(data, delta or {})
    for override in overrides or []:
        data = merge(data, parse_override(override))
    source = (
        (" over ".join(str(path) for path in reversed(files)) or "the recipe defaults")
        + (f" with {delta_source}" if delta else "")
        + (f" with overrides {overrides}" if overrides else "")
    )
    return validate(schema, data, source)
