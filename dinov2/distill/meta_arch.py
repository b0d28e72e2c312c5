"""Distillation: a frozen teacher (backbone + DINO/iBOT heads) and one or more students.

Per step the teacher runs ONCE on the two global crops; its CLS targets (centering or
Sinkhorn-Knopp, as in pretraining) and its targets for every patch token feed every student. A
student sees all crops, unmasked, without stochastic depth (unless its section asks for some):
- DINO loss on the CLS token of every crop, scaled exactly as in pretraining (global crop A against
  the teacher's crop B and vice versa; local crops against both);
- iBOT loss on ALL patch tokens of the two global crops (per-image mean, then mean over images),
  which needs the student's and the teacher's token grids to coincide;
- KoLeo on the student's global CLS tokens, as in pretraining.
Each student's heads take the teacher's prototype counts (the targets live in the teacher's
prototype space); each student has an EMA copy, updated with the teacher-momentum schedule, and
that EMA is the final model.

The teacher is held outside the module tree: DeepSpeed neither partitions nor checkpoints it (it
is reloaded from its source on resume), and no optimizer can touch it.
"""

import copy
from typing import Any

import torch
from torch import nn

from dinov2.configuration.recipes import DistillRecipe
from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.train.collapse import target_statistics
from dinov2.train.param_groups import param_groups
from dinov2.train.ssl_meta_arch import N_GLOBAL_CROPS, build_backbone


class DistillMetaArch(nn.Module):
    stage = "distill"

    def __init__(self, recipe: DistillRecipe, teacher: nn.ModuleDict):
        super().__init__()
        self.recipe = recipe
        teacher.requires_grad_(False)
        self._frozen = [teacher.eval()]  # a list, so that it is not registered as a submodule
        self.ibot_head_name = "ibot_head" if "ibot_head" in teacher else "dino_head"
        dino_prototypes = teacher["dino_head"].last_layer.weight_v.shape[0]
        ibot_prototypes = teacher[self.ibot_head_name].last_layer.weight_v.shape[0]
        students = {}
        for name, section in recipe.student_sections().items():
            backbone = build_backbone(recipe, section.drop_path_rate, section)
            heads = {"dino_head": self._head(backbone.embed_dim, dino_prototypes, recipe.dino)}
            if self.ibot_head_name == "ibot_head":
                heads["ibot_head"] = self._head(backbone.embed_dim, ibot_prototypes, recipe.ibot)
            students[name] = nn.ModuleDict({"backbone": backbone, **heads})
        self.students = nn.ModuleDict(students)
        self.student_emas = copy.deepcopy(self.students)
        self.student_emas.requires_grad_(False)
        self.dino_loss = DINOLoss(dino_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes)
        self.koleo_loss = KoLeoLoss()

    @staticmethod
    def _head(embed_dim: int, prototypes: int, section) -> DINOHead:
        return DINOHead(
            embed_dim, prototypes, nlayers=section.head_nlayers, hidden_dim=section.head_hidden_dim,
            bottleneck_dim=section.head_bottleneck_dim,
        )  # fmt: skip

    @property
    def teacher(self) -> nn.ModuleDict:
        return self._frozen[0]

    def _apply(self, fn, recurse: bool = True):
        # device and dtype moves (``.to(device)``) reach the teacher too
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> "DistillMetaArch":
        super().train(mode)
        self.student_emas.eval()
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS targets (2, B, K) with crop B first so that student crop A pairs with B, and targets for
        every patch token of both crops (2B * n_patches, K)."""
        output = self.teacher.backbone(global_crops, is_training=True)
        cls_a, cls_b = output["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls_bottleneck = self.teacher.dino_head.bottleneck(torch.cat((cls_b, cls_a)))
        cls_logits = self.teacher.dino_head.last_layer(cls_bottleneck)
        ibot_head = self.teacher[self.ibot_head_name]
        patch_bottleneck = ibot_head.bottleneck(output["x_norm_patchtokens"].flatten(0, 1))
        patch_logits = ibot_head.last_layer(patch_bottleneck)
        if self.recipe.train.centering == "centering":
            cls_targets = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_targets = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.ibot_patch_loss.update_center(patch_logits)
        else:
            cls_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            n_patches = torch.tensor([patch_logits.shape[0]], device=patch_logits.device)
            patch_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp, n_patches)
        n_prototypes = patch_targets.shape[-1]
        self.collapse_statistics = {
            **target_statistics("dino", cls_bottleneck, cls_targets),
            **target_statistics("ibot", patch_bottleneck, patch_targets.reshape(-1, n_prototypes)),
        }
        return cls_targets.view(N_GLOBAL_CROPS, -1, cls_targets.shape[-1]), patch_targets.reshape(-1, n_prototypes)

    def forward(self, batch: dict[str, Any], teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        recipe = self.recipe
        global_crops = batch["collated_global_crops"]
        cls_targets, patch_targets = self.teacher_targets(global_crops, teacher_temp)
        n_local = recipe.crops.local_crops_number
        n_terms = (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS + max(n_local * N_GLOBAL_CROPS, 1)
        crops = [global_crops] + ([batch["collated_local_crops"]] if n_local > 0 else [])
        parts: dict[str, torch.Tensor] = {}
        total = global_crops.new_zeros(())
        for name, student in self.students.items():
            outputs = student.backbone(crops, masks=[None] * len(crops), is_training=True)
            global_output = outputs[0]
            global_cls = global_output["x_norm_clstoken"]
            if n_local > 0:
                local_logits = student.dino_head(outputs[1]["x_norm_clstoken"])
                local_loss = self.dino_loss(list(local_logits.chunk(n_local)), list(cls_targets)) / n_terms
                parts[f"{name}/dino_local_crops_loss"] = local_loss
                total = total + recipe.dino.loss_weight * local_loss
            global_logits = student.dino_head(global_cls)
            global_loss = self.dino_loss([global_logits], [cls_targets.flatten(0, 1)]) * 2 / n_terms
            parts[f"{name}/dino_global_crops_loss"] = global_loss
            total = total + recipe.dino.loss_weight * global_loss
            if recipe.dino.koleo_loss_weight > 0:
                koleo = recipe.dino.koleo_loss_weight * sum(
                    self.koleo_loss(crop_cls) for crop_cls in global_cls.chunk(N_GLOBAL_CROPS)
                )
                parts[f"{name}/koleo_loss"] = koleo
                total = total + koleo
            if recipe.ibot.loss_weight > 0:
                patches = global_output["x_norm_patchtokens"]
                if patches.shape[1] * patches.shape[0] != patch_targets.shape[0]:
                    raise ValueError(
                        f"student {name!r} has {patches.shape[1]} patch tokens per crop, the teacher "
                        f"{patch_targets.shape[0] // patches.shape[0]}: iBOT needs the same token grid"
                    )
                patch_logits = student[self.ibot_head_name](patches.flatten(0, 1))
                ibot = self.ibot_patch_loss.forward(
                    patch_logits.view(*patches.shape[:2], -1),
                    patch_targets.view(*patches.shape[:2], -1),
                    torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device),
                )
                parts[f"{name}/ibot_loss"] = ibot
                total = total + recipe.ibot.loss_weight * ibot
        parts.update({f"collapse/{key}": value for key, value in self.collapse_statistics.items()})
        return total, parts

    def optimizer_groups(self) -> list[dict]:
        optim = self.recipe.optim
        groups = []
        for student in self.students.values():
            groups += param_groups(student, student.backbone.n_blocks, optim.layerwise_decay, optim.patch_embed_lr_mult)
        for group in groups:
            group.pop("member_names")
        return groups

    def clip_units(self) -> list[nn.Module]:
        return [part for student in self.students.values() for part in student.values()]

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.students[name], self.student_emas[name]) for name in self.students]

    def ema_state(self) -> dict[str, nn.Module]:
        return {"student_emas": self.student_emas, "dino_loss": self.dino_loss, "ibot_patch_loss": self.ibot_patch_loss}

    def exports(self) -> dict[str, nn.ModuleDict]:
        return {f"students/{name}": ema for name, ema in self.student_emas.items()}

    def knn_backbones(self) -> dict[str, nn.Module]:
        return {
            "teacher/": self.teacher.backbone,
            **{f"{name}/": ema.backbone for name, ema in self.student_emas.items()},
        }
