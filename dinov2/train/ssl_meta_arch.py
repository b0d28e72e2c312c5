"""Student and teacher, and the DINOv2 loss assembled from them.

Student and teacher are identical ``ModuleDict``s (backbone, dino_head, optional ibot_head): the EMA
is one loop over paired parameters and the teacher starts as a copy of the student. The teacher sees
only the two global crops and never drops paths. Loss scaling follows the reference: with n_local
local crops there are 2 global and 2 * n_local local (student, teacher) terms; the local DINO loss is
divided by their sum, the global one (A paired with B, B with A) counts twice; KoLeo is summed over the
two global crops; the iBOT loss is the mean over images of the mean over their masked patches.
"""

from typing import Any

import torch
from torch import nn

from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import DinoVisionTransformer, build_vit
from dinov2.train.config import Recipe

N_GLOBAL_CROPS = 2


def build_backbone(recipe: Recipe, drop_path_rate: float) -> DinoVisionTransformer:
    student = recipe.student
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
        return DinoVisionTransformer(
            embed_dim=student.embed_dim, depth=student.depth, num_heads=student.num_heads, **options
        )
    return build_vit(student.arch, **options)


def _heads(recipe: Recipe, embed_dim: int) -> dict[str, nn.Module]:
    dino, ibot = recipe.dino, recipe.ibot
    heads = {
        "dino_head": DINOHead(
            embed_dim, dino.head_n_prototypes, nlayers=dino.head_nlayers,
            hidden_dim=dino.head_hidden_dim, bottleneck_dim=dino.head_bottleneck_dim,
        )
    }  # fmt: skip
    if ibot.loss_weight > 0 and ibot.separate_head:
        heads["ibot_head"] = DINOHead(
            embed_dim, ibot.head_n_prototypes, nlayers=ibot.head_nlayers,
            hidden_dim=ibot.head_hidden_dim, bottleneck_dim=ibot.head_bottleneck_dim,
        )  # fmt: skip
    return heads


class SSLMetaArch(nn.Module):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        student_backbone = build_backbone(recipe, recipe.student.drop_path_rate)
        teacher_backbone = build_backbone(recipe, 0.0)
        embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": student_backbone, **_heads(recipe, embed_dim)})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, **_heads(recipe, embed_dim)})
        self.teacher.load_state_dict(self.student.state_dict())
        for parameter in self.teacher.parameters():
            parameter.requires_grad = False
        self.do_ibot = recipe.ibot.loss_weight > 0
        self.ibot_head_name = "ibot_head" if "ibot_head" in self.student else "dino_head"
        ibot_out_dim = recipe.ibot.head_n_prototypes if recipe.ibot.separate_head else recipe.dino.head_n_prototypes
        self.dino_loss = DINOLoss(recipe.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_out_dim)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher probabilities for the CLS tokens (2, B, K) — crop B first so A pairs with B — and
        for the masked patch tokens (n_masked, K)."""
        output = self.teacher.backbone(batch["collated_global_crops"], is_training=True)
        cls_a, cls_b = output["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls_logits = self.teacher.dino_head(torch.cat((cls_b, cls_a)))
        patch_logits = None
        if self.do_ibot:
            patches = output["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
            patch_logits = self.teacher[self.ibot_head_name](patches)
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
        return total, parts
