"""facebookresearch/dinov2's objective, restated for the tests from its code (CI has no dinov2 checkout): each
function cites the file and lines it restates (dinov2 at /work/upstream/dinov2). Written for one process: where
dinov2 all-reduces, a single process leaves the value as it is. dinov2's code, not fastdino's, is what the
tests compare against; keep these restatements literal.
"""
import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F


# dinov2/loss/ibot_patch_loss.py:30-31 (the fallback `lossfunc` without xformers; its xformers path casts to fp32)
def lossfunc(t, s, temp):
    return torch.sum(t.float() * F.log_softmax(s.float() / temp, dim=-1), dim=-1)


class iBOTPatchLoss:  # noqa: N801
    """dinov2/loss/ibot_patch_loss.py:34-151, without torch.distributed."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center = torch.zeros(1, 1, patch_out_dim)
        self.updated = True

    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):  # :46-56
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        # :62-90 (dist.all_reduce(B) and the other reductions are identities in one process)
        teacher_output = teacher_output.float()
        Q = torch.exp(teacher_output / teacher_temp).t()
        B = n_masked_patches_tensor
        K = Q.shape[0]
        sum_Q = torch.sum(Q)
        Q /= sum_Q
        for _ in range(n_iterations):
            sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
            Q /= sum_of_rows
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):  # :92-103
        t = teacher_patch_tokens
        s = student_patch_tokens
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):  # :105-126
        t = teacher_patch_tokens_masked
        s = student_patch_tokens_masked
        loss = lossfunc(t, s, self.student_temp)
        if masks_weight is None:
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0))
                            .unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat])
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    def update_center(self, teacher_patch_tokens):  # :128-138
        self.updated = False
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        self.async_batch_center = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)

    def apply_center_update(self):  # :140-151
        if self.updated is False:
            _t = self.async_batch_center / self.len_teacher_patch_tokens
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


class KoLeoLoss:
    """dinov2/loss/koleo_loss.py:18-48 (autocast off, and no cast to fp32: dinov2 keeps the input's dtype)."""

    def __init__(self):
        self.pdist = torch.nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):  # noqa: N802  (:25-36)
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def __call__(self, student_output, eps=1e-8):  # :38-48
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        I = self.pairwise_NNs_inner(student_output)  # noqa: E741
        distances = self.pdist(student_output, student_output[I])
        return -torch.log(distances + eps).mean()


class MaskingGenerator:
    """dinov2/data/masking.py:11-86, drawing from the global `random` module as dinov2 does."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):  # :49-71
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):  # :73-86
        mask = np.zeros(shape=(self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def collate_masks(n_crops, mask_ratio_tuple, mask_probability, n_tokens, mask_generator):
    """The masking half of dinov2/data/collate.py:collate_data_and_cast (:10-49) for B = n_crops global crops."""
    B = n_crops
    N = n_tokens
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min = probs[i]
        prob_max = probs[i + 1]
        masks_list.append(torch.BoolTensor(mask_generator(int(N * random.uniform(prob_min, prob_max)))))
        upperbound += int(N * prob_max)
    for i in range(n_samples_masked, B):
        masks_list.append(torch.BoolTensor(mask_generator(0)))
    random.shuffle(masks_list)
    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {"collated_masks": collated_masks, "mask_indices_list": mask_indices_list, "masks_weight": masks_weight,
            "upperbound": upperbound,
            "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long)}


def get_vit_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False):
    """dinov2/utils/param_groups.py:13-48 (without chunked blocks)."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if (".pos_embed" in name or ".patch_embed" in name or ".mask_token" in name or ".cls_token" in name
                or ".register_tokens" in name):
            layer_id = 0
        elif force_is_backbone and ("pos_embed" in name or "patch_embed" in name or "mask_token" in name
                                    or "cls_token" in name or "register_tokens" in name):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def lr_wd_multipliers(model, lr_decay_rate, patch_embed_lr_mult):
    """dinov2/utils/param_groups.py:51-89 on a submodel (the backbone: `blocks` present; a head: n_blocks = 0):
    {name: (lr_multiplier, wd_multiplier)}."""
    n_blocks = len(model.blocks) if hasattr(model, "blocks") else 0
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = get_vit_lr_decay_rate(name, lr_decay_rate, num_layers=n_blocks, force_is_backbone=n_blocks > 0)
        wd = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
        if "patch_embed" in name:
            lr *= patch_embed_lr_mult
        out[name] = (lr, wd)
    return out


def dino_loss(student_output_list, teacher_out_softmaxed_centered_list, student_temp=0.1):
    """dinov2/loss/dino_clstoken_loss.py:63-74."""
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_out_softmaxed_centered_list:
            loss = torch.sum(t * lsm, dim=-1)
            total_loss -= loss.mean()
    return total_loss


def ssl_losses(student_global_logits, student_local_logits, teacher_cls_probs, student_patch_logits,
               teacher_patch_probs, masks, masks_weight, student_global_cls, koleo_weight, ibot_weight,
               n_local_crops):
    """The loss terms of dinov2/train/ssl_meta_arch.py:forward_backward (:147-340) from the heads' outputs:
    teacher_cls_probs (2, B, K) already paired as dinov2 pairs them (its :164, chunks swapped). Returns the terms
    added into loss_accumulator: {"dino_local", "dino_global", "koleo", "ibot"}."""
    n_global_crops = 2
    n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)
    n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
    terms = {}
    terms["dino_local"] = dino_loss(student_local_logits.chunk(n_local_crops), teacher_cls_probs) / (
        n_global_crops_loss_terms + n_local_crops_loss_terms)  # :278-282
    loss_scales = 2
    terms["dino_global"] = (dino_loss([student_global_logits], [teacher_cls_probs.flatten(0, 1)]) * loss_scales
                            / (n_global_crops_loss_terms + n_local_crops_loss_terms))  # :293-304
    koleo = KoLeoLoss()
    terms["koleo"] = koleo_weight * sum(koleo(p) for p in student_global_cls.chunk(2))  # :313-317
    ibot = iBOTPatchLoss(student_patch_logits.shape[-1])
    terms["ibot"] = ibot_weight * (ibot.forward_masked(student_patch_logits, teacher_patch_probs, masks,
                                                       masks_weight=masks_weight)
                                   * loss_scales * (1.0 / n_global_crops))  # :322-340
    return terms


class DINOHead(torch.nn.Module):
    """dinov2/layers/dino_head.py:12-58 (use_bn=False, mlp_bias=True)."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        layers = [torch.nn.Linear(in_dim, hidden_dim), torch.nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [torch.nn.Linear(hidden_dim, hidden_dim), torch.nn.GELU()]
        layers.append(torch.nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = torch.nn.Sequential(*layers)
        with warnings.catch_warnings():  # dinov2 uses the deprecated weight_norm, whose keys its checkpoints have
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = torch.nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
