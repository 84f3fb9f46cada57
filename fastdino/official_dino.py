"""The official DINO training step (Caron et al. 2021), restated as the baseline of fastdino's benchmarks.

What is restated, from facebookresearch/dino:
- vision_transformer.py: `VisionTransformer` with the explicit softmax(q kᵀ) attention, per-sample `DropPath`
  (every image is computed, dropped ones are multiplied by 0), `interpolate_pos_encoding` (bicubic, on every
  forward at a resolution other than the native one), and `DINOHead` (MLP, L2 normalisation, a last layer
  wrapped in `nn.utils.weight_norm`).
- utils.py: `trunc_normal_` (the inverse-CDF sampler of torch 1.x, so a seed gives the official initial weights;
  today's `nn.init.trunc_normal_` rejection-samples and draws others), `MultiCropWrapper` (the backbone once per
  run of same-resolution crops, then the head once), `clip_gradients` (per tensor, one `.item()` per parameter),
  `cancel_gradients_last_layer`, `get_params_groups`, `cosine_scheduler`.
- main_dino.py: `DINOLoss` (a Python loop over the 2 x (V - 1) teacher/student crop pairs), the building part of
  `train_dino` (`build`), and the body of `train_one_epoch`'s loop (`train_step`): schedules, fp16 autocast +
  GradScaler, the finiteness check, clipping, last-layer cancelling, the optimizer step, the per-parameter EMA
  loop, `torch.cuda.synchronize()` and the logged `loss.item()`.

Changed, without changing the math or the work of a step:
- One process. The student is not wrapped in DDP (with one rank its all-reduce is the only cost left out, which
  favours the baseline) and `DINOLoss.update_center` all-reduces only when torch.distributed is initialised.
- `torch.cuda.amp.autocast` / `torch.cuda.amp.GradScaler` are spelled `torch.autocast(device, torch.float16)` /
  `torch.amp.GradScaler(device)`, of which the old names are deprecated aliases; `.cuda()` is `.to(device)`.
- A non-finite loss raises FloatingPointError instead of `sys.exit(1)`; the MetricLogger's smoothing and
  printing are left out, its host reads of the loss, lr and weight decay are kept.
- `Args` holds main_dino.py's argparse defaults; `img_size` (fixed at 224 there), `model_kwargs` (embed_dim,
  depth, num_heads) and `head_kwargs` (nlayers, hidden_dim, bottleneck_dim) are added for tiny test models.
- `optimizer.zero_grad()` keeps today's default (set_to_none=True) rather than torch 1.x's zero filling. Every
  trainable parameter gets a gradient in every backward, so AdamW updates the same parameters either way.
- Left out as they do not touch a ViT step: the XCiT and torchvision architectures (and MultiCropWrapper's
  unpacking of XCiT's tuple output), SyncBatchNorm and the teacher's DDP wrapper (only with a BatchNorm head; on one
  process SyncBatchNorm is BatchNorm), constructor arguments left at their defaults (`qk_scale`, `act_layer`,
  `out_features`, `num_classes`), `cudnn.benchmark`, seeding, and the returned per-tensor norms of
  `clip_gradients`, which train_one_epoch does not log.

Used by benchmarks/bench_e2e.py, quality_run.py and the step model (engine/estimate.py);
tests/test_official_baseline.py checks that its loss, its features and a whole step agree with fastdino's.
"""
import math
import warnings
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------- utils.py


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """utils.trunc_normal_: the inverse-CDF method of torch 1.x; today's nn.init.trunc_normal_ rejection-samples,
    so it draws other weights from the same seed."""
    def norm_cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        lower, upper = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
        tensor.uniform_(2 * lower - 1, 2 * upper - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
        return tensor


# ------------------------------------------------------------------------------------- vision_transformer.py


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()  # binarize
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    """Stochastic depth per sample, in the main path of a residual block."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with the attention matrix built explicitly (what fastdino never does)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, H, N, hd)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N - 1, D)


class VisionTransformer(nn.Module):
    """The official ViT: CLS token, learned position embeddings, `forward` = final-norm CLS features (B, D)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()  # num_classes=0, as DINO builds it
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        # the official code adds 0.1 to avoid floating point error in the interpolation (dino issue #8)
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, N, D)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0]


ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def vit(arch: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """vision_transformer.py's vit_tiny / vit_small / vit_base (kwargs may override embed_dim, depth, num_heads)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; the official code has {sorted(ARCHS)}")
    return VisionTransformer(patch_size=patch_size, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **{**ARCHS[arch], **kwargs})


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated; the official code uses it
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# ------------------------------------------------------------------------------------------------- utils.py


class MultiCropWrapper(nn.Module):
    """The backbone once per run of consecutive same-resolution crops, then the head once on all features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]),
            return_counts=True,
        )[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx: end_idx]))
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)  # (V*B, K)


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """Clip each parameter's gradient to norm `clip` on its own; two host syncs per parameter."""
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())  # host sync
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:  # host sync
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def get_params_groups(model: nn.Module) -> list[dict]:
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:  # biases and norms are not regularized
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# --------------------------------------------------------------------------------------------- main_dino.py


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a warm-up for the teacher temperature: too high a temperature makes training unstable at the beginning
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        """Cross-entropy between the softmax outputs of the teacher and the student networks."""
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)

        # teacher centering and sharpening
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)

        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:  # skip the pairs where student and teacher see the same view
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


@dataclass
class Args:
    """main_dino.py's command-line defaults (plus img_size and model_kwargs, see the module docstring)."""

    arch: str = "vit_small"
    patch_size: int = 16
    out_dim: int = 65536
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996
    use_bn_in_head: bool = False
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    use_fp16: bool = True
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    batch_size_per_gpu: int = 64
    epochs: int = 100
    freeze_last_layer: int = 1
    lr: float = 0.0005
    warmup_epochs: int = 10
    min_lr: float = 1e-6
    drop_path_rate: float = 0.1
    local_crops_number: int = 8
    img_size: int = 224
    model_kwargs: dict = field(default_factory=dict)
    head_kwargs: dict = field(default_factory=dict)


def args_from_config(cfg, *, use_fp16: bool) -> Args:
    """main_dino.py arguments with the values of a fastdino TrainConfig (one process, data.batch_size per GPU)."""
    m, h, o, lo, d = cfg.model, cfg.head, cfg.optim, cfg.loss, cfg.data
    sizes = {k: getattr(m, k) for k in ("embed_dim", "depth", "num_heads") if getattr(m, k) is not None}
    return Args(
        arch=m.arch, patch_size=m.patch_size, out_dim=h.out_dim, norm_last_layer=h.norm_last_layer,
        momentum_teacher=o.teacher_momentum, use_bn_in_head=h.use_bn, warmup_teacher_temp=lo.warmup_teacher_temp,
        teacher_temp=lo.teacher_temp, warmup_teacher_temp_epochs=round(lo.warmup_teacher_temp_epochs),
        use_fp16=use_fp16, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end, clip_grad=o.clip_grad,
        batch_size_per_gpu=d.batch_size, epochs=cfg.epochs, freeze_last_layer=round(o.freeze_last_layer_epochs),
        lr=o.base_lr, warmup_epochs=round(o.warmup_epochs), min_lr=o.min_lr, drop_path_rate=m.drop_path_rate,
        local_crops_number=d.local_crops_number, img_size=m.img_size, model_kwargs=sizes,
        head_kwargs=dict(nlayers=h.nlayers, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim))


@dataclass
class OfficialDINO:
    """What train_dino builds and train_one_epoch uses."""

    student: MultiCropWrapper
    teacher: MultiCropWrapper
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    fp16_scaler: torch.amp.GradScaler | None
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray
    args: Args
    device: torch.device


def build(args: Args, niter_per_ep: int, device: torch.device | str) -> OfficialDINO:
    """train_dino from "building student and teacher networks" to "init schedulers", on one device."""
    device = torch.device(device)
    student = vit(args.arch, args.patch_size, img_size=args.img_size, drop_path_rate=args.drop_path_rate,
                  **args.model_kwargs)
    teacher = vit(args.arch, args.patch_size, img_size=args.img_size, **args.model_kwargs)
    embed_dim = student.embed_dim
    student = MultiCropWrapper(student, DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                                                 norm_last_layer=args.norm_last_layer, **args.head_kwargs))
    teacher = MultiCropWrapper(teacher, DINOHead(embed_dim, args.out_dim, args.use_bn_in_head, **args.head_kwargs))
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())  # teacher and student start with the same weights
    for p in teacher.parameters():
        p.requires_grad = False  # no backpropagation through the teacher

    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(device)
    optimizer = torch.optim.AdamW(get_params_groups(student))
    fp16_scaler = torch.amp.GradScaler(device.type) if args.use_fp16 else None
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    lr_schedule = cosine_scheduler(args.lr * (args.batch_size_per_gpu * world_size) / 256.0,  # linear scaling rule
                                   args.min_lr, args.epochs, niter_per_ep, warmup_epochs=args.warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep)
    momentum_schedule = cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_ep)
    return OfficialDINO(student, teacher, dino_loss, optimizer, fp16_scaler, lr_schedule, wd_schedule,
                        momentum_schedule, args, device)


def train_step(run: OfficialDINO, images: list[torch.Tensor], it: int, epoch: int) -> float:
    """One iteration of train_one_epoch at global iteration `it` of epoch `epoch`; returns the logged loss."""
    args, student, teacher, optimizer, fp16_scaler = run.args, run.student, run.teacher, run.optimizer, run.fp16_scaler
    # update weight decay and learning rate according to their schedule
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = run.lr_schedule[it]
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = run.wd_schedule[it]

    images = [im.to(run.device, non_blocking=True) for im in images]
    # teacher and student forward passes + compute dino loss
    with torch.autocast(run.device.type, dtype=torch.float16, enabled=fp16_scaler is not None):
        teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
        student_output = student(images)
        loss = run.dino_loss(student_output, teacher_output, epoch)

    if not math.isfinite(loss.item()):  # host sync
        raise FloatingPointError(f"Loss is {loss.item()}, stopping training")

    # student update
    optimizer.zero_grad()
    if fp16_scaler is None:
        loss.backward()
        if args.clip_grad:
            clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        optimizer.step()
    else:
        fp16_scaler.scale(loss).backward()
        if args.clip_grad:
            fp16_scaler.unscale_(optimizer)  # unscale the gradients of the optimizer's parameters in place
            clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        fp16_scaler.step(optimizer)  # host sync (found_inf)
        fp16_scaler.update()

    # EMA update for the teacher
    with torch.no_grad():
        m = run.momentum_schedule[it]  # momentum parameter
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)

    # logging
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return loss.item()  # host sync: metric_logger.update(loss=loss.item())
