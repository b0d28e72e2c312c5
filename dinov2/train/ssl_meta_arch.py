"""Student and teacher, and the DINOv2 loss assembled from them.

Student and teacher are identical ``ModuleDict``s (backbone, dino_head, optional ibot_head): the EMA
is one loop over paired parameters and the teacher starts as a copy of the student. The teacher sees
only the two global crops and never drops paths. Loss scaling follows the reference: with n_local
local crops there are 2 global and 2 * n_local local (student, teacher) terms; the local DINO loss is
divided by their sum, the global one (A paired with B, B with A) counts twice; KoLeo is summed over the
two global crops; the iBOT loss is the mean over images of the mean over their masked patches.
"""

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinov2.configuration.recipes import Recipe, StudentSection
from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import DinoVisionTransformer, build_vit
from dinov2.train.collapse import target_statistics
from dinov2.train.param_groups import param_groups

N_GLOBAL_CROPS = 2


def build_backbone(
    recipe: Recipe, drop_path_rate: float, student: StudentSection | None = None
) -> DinoVisionTransformer:
    """The backbone a student section describes (``recipe.student`` by default), initialised from
    ``pretrained_weights`` when set (distillation students: a .safetensors from an export, or a checkpoint
    path/URL)."""
    student = student or recipe.student
    options = dict(
        img_size=student.img_size,
        patch_size=student.patch_size,
        init_values=student.layerscale,
        ffn_layer=student.ffn_layer,
        qkv_bias=student.qkv_bias,
        proj_bias=student.proj_bias,
        ffn_bias=student.ffn_bias,
        num_register_tokens=student.num_register_tokens,
        interpolate_antialias=student.interpolate_antialias,
        interpolate_offset=student.interpolate_offset,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=student.drop_path_uniform,
    )
    if student.arch == "custom":
        backbone = DinoVisionTransformer(
            embed_dim=student.embed_dim, depth=student.depth, num_heads=student.num_heads, **options
        )
    else:
        backbone = build_vit(student.arch, **options)
    if student.pretrained_weights:
        load_pretrained(backbone, student.pretrained_weights)
    return backbone


def load_pretrained(backbone: DinoVisionTransformer, source: str) -> None:
    """Strictly load backbone weights: our safetensors exports, a Hugging Face DINOv2 folder, or any checkpoint
    the hub loader reads."""
    from dinov2.hub.checkpoints import load_backbone_weights, load_state_dict_strict, to_backbone_keys
    from dinov2.hub.export import is_backbone_file, load_backbone

    if Path(source).is_dir() and is_backbone_file(source):
        load_state_dict_strict(backbone, load_backbone(source).state_dict(), str(source))
    elif str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        if not Path(source).is_file():
            raise FileNotFoundError(f"student.pretrained_weights: {source} does not exist")
        load_state_dict_strict(backbone, to_backbone_keys(load_file(str(source))), str(source))
    else:
        load_backbone_weights(backbone, source)


def build_heads(recipe: Recipe, embed_dim: int, dino_prototypes: int | None = None, ibot_prototypes: int | None = None):
    """DINO head (+ a separate iBOT head when the recipe asks for one) sized by the recipe; the
    prototype counts can be imposed (a distilled student takes its teacher's)."""
    dino, ibot = recipe.dino, recipe.ibot
    heads = {
        "dino_head": DINOHead(
            embed_dim, dino_prototypes or dino.head_n_prototypes, nlayers=dino.head_nlayers,
            hidden_dim=dino.head_hidden_dim, bottleneck_dim=dino.head_bottleneck_dim,
        )
    }  # fmt: skip
    if ibot.loss_weight > 0 and ibot.separate_head:
        heads["ibot_head"] = DINOHead(
            embed_dim, ibot_prototypes or ibot.head_n_prototypes, nlayers=ibot.head_nlayers,
            hidden_dim=ibot.head_hidden_dim, bottleneck_dim=ibot.head_bottleneck_dim,
        )  # fmt: skip
    return heads


class SSLMetaArch(nn.Module):
    """The pretraining objective. With ``frozen_backbone`` (a trained backbone whose heads are lost, as
    in the released checkpoints) only the heads train, against targets of that same backbone: the
    head-fitting phase that gives a headless backbone the heads a distillation teacher or a continued
    pretraining run needs. With ``initial`` (``ModuleDict(backbone[, dino_head, ibot_head])``, continued
    pretraining) the student starts from those weights, strictly loaded, and the teacher, its EMA, equal to it."""

    stage = "pretrain"

    def __init__(
        self,
        recipe: Recipe,
        frozen_backbone: DinoVisionTransformer | None = None,
        initial: nn.ModuleDict | None = None,
        initial_source: str = "init.source",
    ):
        super().__init__()
        self.recipe = recipe
        if frozen_backbone is None:
            student_backbone = build_backbone(recipe, recipe.student.drop_path_rate)
            teacher_backbone = build_backbone(recipe, 0.0)
        else:
            student_backbone, teacher_backbone = frozen_backbone, copy.deepcopy(frozen_backbone)
            student_backbone.requires_grad_(False)
        embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": student_backbone, **build_heads(recipe, embed_dim)})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, **build_heads(recipe, embed_dim)})
        if initial is not None:
            from dinov2.hub.checkpoints import load_state_dict_strict

            for name, module in initial.items():
                load_state_dict_strict(self.student[name], module.state_dict(), f"{initial_source} ({name})")
        self.teacher.load_state_dict(self.student.state_dict())
        for parameter in self.teacher.parameters():
            parameter.requires_grad = False
        self.trained = [name for name, part in self.student.items() if any(p.requires_grad for p in part.parameters())]
        self.do_ibot = recipe.ibot.loss_weight > 0
        self.ibot_head_name = "ibot_head" if "ibot_head" in self.student else "dino_head"
        ibot_out_dim = recipe.ibot.head_n_prototypes if recipe.ibot.separate_head else recipe.dino.head_n_prototypes
        self.dino_loss = DINOLoss(recipe.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_out_dim)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()
        for name, module in self.student.items():
            if name not in self.trained:
                module.eval()
        return self

    def optimizer_groups(self) -> list[dict]:
        groups = param_groups(
            self.student, self.student.backbone.n_blocks, self.recipe.optim.layerwise_decay,
            self.recipe.optim.patch_embed_lr_mult,
        )  # fmt: skip
        for group in groups:
            group.pop("member_names")
        return groups

    def clip_units(self) -> list[nn.Module]:
        return [self.student[name] for name in self.trained]

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.student[name], self.teacher[name]) for name in self.trained]

    def ema_state(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "dino_loss": self.dino_loss, "ibot_patch_loss": self.ibot_patch_loss}

    def exports(self) -> dict[str, nn.ModuleDict]:
        return {"teacher": self.teacher}

    def knn_backbones(self) -> dict[str, nn.Module]:
        return {"": self.teacher.backbone}

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher probabilities for the CLS tokens (2, B, K) — crop B first so A pairs with B — and
        for the masked patch tokens (n_masked, K)."""
        output = self.teacher.backbone(batch["collated_global_crops"], is_training=True)
        cls_a, cls_b = output["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls_bottleneck = self.teacher.dino_head.bottleneck(torch.cat((cls_b, cls_a)))
        cls_logits = self.teacher.dino_head.last_layer(cls_bottleneck)
        patch_logits = None
        if self.do_ibot:
            patches = output["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
            patch_bottleneck = self.teacher[self.ibot_head_name].bottleneck(patches)
            patch_logits = self.teacher[self.ibot_head_name].last_layer(patch_bottleneck)
        if self.recipe.train.centering == "centering":
            cls_targets = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_targets = None
            if patch_logits is not None:
                patch_targets = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
                self.ibot_patch_loss.update_center(patch_logits)
        else:
            cls_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_targets = None
            if patch_logits is not None:
                patch_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    patch_logits, teacher_temp, batch["n_masked_patches"]
                )
        self.collapse_statistics = target_statistics("dino", cls_bottleneck, cls_targets)
        if patch_targets is not None and len(patch_logits):
            self.collapse_statistics.update(target_statistics("ibot", patch_bottleneck, patch_targets))
        return cls_targets.view(N_GLOBAL_CROPS, -1, cls_targets.shape[-1]), patch_targets

    def forward(self, batch: dict[str, Any], teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss to back-propagate, and its parts for logging."""
        recipe = self.recipe
        n_local = recipe.crops.local_crops_number
        cls_targets, patch_targets = self.teacher_targets(batch, teacher_temp)
        n_terms = (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS + max(n_local * N_GLOBAL_CROPS, 1)
        masks = batch["collated_masks"]

        crops = [batch["collated_global_crops"]]
        crop_masks = [masks if self.do_ibot else None]
        if n_local > 0:
            crops.append(batch["collated_local_crops"])
            crop_masks.append(None)
        outputs = self.student.backbone(crops, masks=crop_masks, is_training=True)
        global_output = outputs[0]
        global_cls = global_output["x_norm_clstoken"]
        parts: dict[str, torch.Tensor] = {}
        total = global_cls.new_zeros(())

        if n_local > 0:
            local_logits = self.student.dino_head(outputs[1]["x_norm_clstoken"])
            local_loss = self.dino_loss(list(local_logits.chunk(n_local)), list(cls_targets)) / n_terms
            parts["dino_local_crops_loss"] = local_loss
            total = total + recipe.dino.loss_weight * local_loss

        global_logits = self.student.dino_head(global_cls)
        global_loss = self.dino_loss([global_logits], [cls_targets.flatten(0, 1)]) * 2 / n_terms
        parts["dino_global_crops_loss"] = global_loss
        total = total + recipe.dino.loss_weight * global_loss

        if recipe.dino.koleo_loss_weight > 0:
            koleo = recipe.dino.koleo_loss_weight * sum(self.koleo_loss(c) for c in global_cls.chunk(N_GLOBAL_CROPS))
            parts["koleo_loss"] = koleo
            total = total + koleo

        if self.do_ibot:
            student_patches = global_output["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
            patch_logits = self.student[self.ibot_head_name](student_patches)
            ibot = self.ibot_patch_loss.forward_masked(
                patch_logits, patch_targets, student_masks_flat=masks, masks_weight=batch["masks_weight"]
            )
            parts["ibot_loss"] = ibot
            total = total + recipe.ibot.loss_weight * ibot
        parts.update({f"collapse/{key}": value for key, value in self.collapse_statistics.items()})
        return total, parts
