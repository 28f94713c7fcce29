"""The DINOv2 objective: DINO (class token) + iBOT (masked patches) + KoLeo, EMA teacher.

Follows DINOv2's ``SSLMetaArch`` and the ExPLoRA recipe (``docs/recipe.md`` section 2;
values in :data:`geoexplora.defaults.DINOV2`):

* student = the ExPLoRA-parameterised backbone + a :class:`~geoexplora.ssl.heads.DinoHead`
  (shared by DINO and iBOT); teacher = an EMA of *all* student parameters. The frozen ones never
  change, so the teacher shares them with the student (same tensors) and only the trainable ones
  are copied and averaged: the teacher costs the memory of the trainable parameters only;
* multi-crop: global crops (iBOT-masked with probability 0.5, block-wise, ratio U(0.1, 0.5))
  and local crops, rendered on the device from parameters drawn per sample
  (:class:`DinoV2Views`); the teacher sees the unmasked global crops;
* teacher targets by Sinkhorn-Knopp (or running-mean centring), teacher temperature warm-up,
  cosine EMA momentum; the prototypes (weight-normalised, trainable gain) have their own lr
  schedule, 0 for the first steps (:class:`LastLayerSchedules`, DINOv2's ``last_layer_lr``);
* two gradient clips, the backbone's and the head's (``clip_groups``), as DINOv2 clips each
  student module.

Batch statistics that span samples (Sinkhorn sums, centres) are all-reduced across ranks, so N
processes compute what one process with the global batch would; KoLeo (nearest neighbours) is,
as in DINOv2, per rank.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoexplora.defaults import AUGMENT, DINOV2, AugmentDefaults, DinoHeadSize, DinoV2Defaults
from geoexplora.ssl.augment import ViewSpec, draw_view, render_views, stack_views
from geoexplora.ssl.heads import DinoHead
from geoexplora.train.engine import Schedules, cosine

# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op in one process)."""
    if _world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------
# Losses (pure functions)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets ``(N, K)``: rows sum to 1, prototypes used
    equally over the whole (all-ranks) batch."""
    logits = logits.float()
    shift = logits.max() if logits.numel() else logits.new_zeros(())
    shift = _all_reduce_max(shift)
    q = torch.exp((logits - shift) / temperature).t()  # (K, N)
    count = _all_reduce_(torch.tensor(float(q.shape[1]), device=q.device))
    k = q.shape[0]
    q = q / _all_reduce_(q.sum())
    for _ in range(iterations):
        q = q / _all_reduce_(q.sum(dim=1, keepdim=True))
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / count
    return (q * count).t()


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@torch.no_grad()
def centred_softmax(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax((logits.float() - center) / temperature, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> None:
    """Running mean of the teacher's logits over the all-ranks batch, in place."""
    total = _all_reduce_(logits.float().sum(dim=0, keepdim=True))
    count = _all_reduce_(torch.tensor(float(logits.shape[0]), device=logits.device))
    if count > 0:
        center.mul_(momentum).add_(total / count, alpha=1 - momentum)


def cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-row ``-sum(t * log_softmax(s / temperature))``."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(-1)


def dino_loss(
    s_logits: torch.Tensor, t_probs: torch.Tensor, b: int, n_global: int, student_temp: float
) -> torch.Tensor:
    """DINO's term: every student crop (view-major, ``b`` images a view) against every teacher
    (global) crop but itself, the mean cross-entropy."""
    n_views = s_logits.shape[0] // b
    terms = [
        cross_entropy(s_logits[sv * b : (sv + 1) * b], t_probs[tv * b : (tv + 1) * b], student_temp)
        for sv in range(n_views)
        for tv in range(n_global)
        if sv != tv
    ]
    return torch.stack(terms).mean(dim=0).mean()


@torch.no_grad()
def prototype_max_mass(teacher_probs: torch.Tensor) -> torch.Tensor:
    """The largest share of the teacher targets' probability mass one prototype gets over the
    (all-ranks) batch: ``max_k mean_n t_nk``. 1/K when the targets spread evenly over the
    prototypes, 1.0 when one prototype takes everything (collapse). Sinkhorn-Knopp's targets
    are balanced over the batch by construction (about 1/K; their failure mode is uniform rows,
    which ``teacher_entropy`` near ln K shows); running-mean centring can collapse this way."""
    mass = _all_reduce_(teacher_probs.float().sum(0))
    count = _all_reduce_(torch.tensor(float(teacher_probs.shape[0]), device=teacher_probs.device))
    return (mass / count.clamp(min=1)).max()


@torch.no_grad()
def dino_diagnostics(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float, n_global: int
) -> dict[str, torch.Tensor]:
    """What the DINO loss is made of, to tell learning from stalling.

    The cross-entropy ``H(t, s)`` splits into the teacher's entropy ``H(t)`` (what no student
    can beat) and ``KL(t || s)`` (what the student can still learn): ``kl_dino`` is
    ``loss_dino - teacher_entropy`` as every teacher crop is used equally often. A teacher
    entropy near ``ln K`` means uniform (collapsed) targets; ``view_agreement`` is the fraction
    of images whose two first global crops get the same teacher prototype (1.0 when both
    crops are one image, near ``1/K`` for random targets).
    """
    s_probs = F.softmax(student_logits.float() / student_temp, dim=-1)
    teacher_entropy = -(teacher_probs * teacher_probs.clamp(min=1e-12).log()).sum(-1).mean()
    student_entropy = -(s_probs * s_probs.clamp(min=1e-12).log()).sum(-1).mean()
    out = {
        "teacher_entropy": teacher_entropy,
        "student_entropy": student_entropy,
        "uniform_entropy": torch.tensor(math.log(student_logits.shape[-1])),
    }
    if n_global >= 2:
        first, second = teacher_probs.argmax(-1).chunk(n_global)[:2]
        out["view_agreement"] = (first == second).float().mean()
    return out


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (DINOv2): ``-mean log`` distance to the nearest neighbour of each row of
    the L2-normalised batch; pushes features apart (uniform spread)."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def block_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    count: int,
    min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """``(height*width,)`` bool with exactly ``count`` True: random rectangles as DINOv2's
    ``MaskingGenerator`` places them, topped up with random patches."""
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    max_patches = max(min_patches, count // 2)
    for _ in range(10 * count):
        missing = count - int(mask.sum())
        if missing <= 0:
            break
        target = rng.uniform(min(min_patches, missing), min(max_patches, missing) + 1e-9)
        ratio = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(target * ratio))
        w = round(math.sqrt(target / ratio))
        if not (0 < h <= height and 0 < w <= width):
            continue
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        patch = mask[top : top + h, left : left + w]
        new = int((~patch).sum())
        if 0 < new <= missing:
            patch[:] = True
    flat = mask.reshape(-1)
    missing = count - int(flat.sum())
    if missing > 0:
        flat[rng.choice(np.flatnonzero(~flat), size=missing, replace=False)] = True
    return flat


# ---------------------------------------------------------------------------------------------
# Data side: per-sample crops and masks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSizes:
    """Multi-crop sizes in pixels (multiples of the patch size)."""

    global_size: int
    local_size: int

    @classmethod
    def for_patch(cls, patch: int, settings: DinoV2Defaults = DINOV2) -> CropSizes:
        return cls(settings.global_crop_patches * patch, settings.local_crop_patches * patch)


class DinoV2Views:
    """Draws, for one sample, the parameters of its global and local crops and the iBOT masks
    of its global crops (``{"global": {...}, "local": {...}, "masks": (V, N) bool}``)."""

    def __init__(
        self,
        patch_size: int,
        crops: CropSizes,
        settings: DinoV2Defaults = DINOV2,
        aug: AugmentDefaults = AUGMENT,
    ):
        for name, size in (("global", crops.global_size), ("local", crops.local_size)):
            if size % patch_size:
                raise ValueError(
                    f"{name} crop size {size} is not a multiple of the patch size {patch_size}"
                )
        self.settings, self.aug, self.crops = settings, aug, crops
        self.grid = crops.global_size // patch_size

        def nth(values, i):  # per global crop; the last value for any further crops
            return values[min(i, len(values) - 1)]

        self.global_specs = [
            ViewSpec(
                crops.global_size,
                settings.global_crops_scale,
                nth(aug.blur_p_global, i),
                solarize_p=nth(aug.solarize_p_global, i),
            )
            for i in range(settings.global_crops)
        ]
        self.local_spec = ViewSpec(
            crops.local_size,
            settings.local_crops_scale,
            aug.blur_p_local,
            solarize_p=aug.solarize_p_local,
        )

    def __call__(self, rng: np.random.Generator, image: np.ndarray) -> dict:
        _, c, h, w = image.shape
        s = self.settings
        out = {
            "global": stack_views(
                [draw_view(rng, h, w, c, spec, self.aug) for spec in self.global_specs]
            )
        }
        if s.local_crops:
            out["local"] = stack_views(
                [draw_view(rng, h, w, c, self.local_spec, self.aug) for _ in range(s.local_crops)]
            )
        n = self.grid * self.grid
        masks = np.zeros((s.global_crops, n), dtype=bool)
        for v in range(s.global_crops):
            if rng.random() < s.mask_probability:
                count = int(n * rng.uniform(*s.mask_ratio))
                masks[v] = block_mask(rng, self.grid, self.grid, count)
        out["masks"] = torch.from_numpy(masks)
        return out


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


@dataclass
class LastLayerSchedules(Schedules):
    """The engine's schedules, with DINOv2's ``last_layer_lr``: optimiser groups that carry
    ``frozen_until`` (the prototypes') get lr 0 before that step, then the main schedule. Their
    AdamW moments keep accumulating meanwhile, as in DINOv2 (a zero lr, not dropped
    gradients)."""

    def apply(self, optimizer, step: int) -> tuple[float, float]:
        lr, wd = super().apply(optimizer, step)
        for group in optimizer.param_groups:
            if step < group.get("frozen_until", 0):
                group["lr"] = 0.0
        return lr, wd


def share_frozen_parameters(teacher: nn.Module, student: nn.Module) -> None:
    """Point ``teacher``'s parameters at ``student``'s where the student's are frozen (they are
    equal and stay equal); the teacher's own copies of the trainable ones stay separate."""
    for name, param in student.named_parameters():
        if not param.requires_grad:
            parent, _, attr = name.rpartition(".")
            setattr(teacher.get_submodule(parent) if parent else teacher, attr, param)


class DinoV2Objective(nn.Module):
    """The engine's objective (see :mod:`geoexplora.train.engine`) for DINOv2 sources.

    ``backbone``: a GeoViT already parameterised by ``apply_explora`` (or fully trainable for a
    full-parameter comparison). ``total_steps`` sets the schedules (momentum, teacher
    temperature, last-layer freeze).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_size: DinoHeadSize,
        crops: CropSizes,
        total_steps: int,
        settings: DinoV2Defaults = DINOV2,
        rgb: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        self.settings = settings
        self.rgb = rgb  # indices of red, green, blue: RGB colour ops (else spectral analogues)
        self.crops = crops
        self.total_steps = total_steps
        self.student = nn.ModuleDict(
            {
                "backbone": backbone,
                "head": DinoHead(
                    backbone.embed_dim,
                    head_size.prototypes,
                    head_size.hidden,
                    head_size.bottleneck,
                    trainable_gain=settings.prototype_gain_trainable,
                ),
            }
        )
        teacher = copy.deepcopy(self.student)
        teacher.requires_grad_(False)
        share_frozen_parameters(teacher, self.student)
        self.teacher = teacher.eval()
        names = dict(self.teacher.named_parameters(remove_duplicate=False))
        self._ema_pairs = [
            (p, names[n]) for n, p in self.student.named_parameters() if p.requires_grad
        ]
        k = head_size.prototypes
        self.register_buffer("dino_center", torch.zeros(1, k))
        self.register_buffer("ibot_center", torch.zeros(1, k))
        self.freeze_last_layer_steps = min(
            settings.freeze_last_layer_steps,
            round(settings.freeze_last_layer_fraction * total_steps),
        )

    # -- schedules ---------------------------------------------------------------------------
    def teacher_temp(self, step: int) -> float:
        start, end = self.settings.teacher_temp
        warmup = int(self.settings.teacher_temp_warmup_fraction * self.total_steps)
        return end if step >= warmup else start + (end - start) * step / warmup

    def momentum(self, step: int) -> float:
        start, end = self.settings.momentum
        return cosine(step, self.total_steps, start, end)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no drop-path in the teacher (DINOv2 builds it without)
        return self

    # -- forward -----------------------------------------------------------------------------
    def _targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.settings.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.settings.sinkhorn_iterations)
        probs = centred_softmax(logits, center, temp)
        update_center(center, logits, self.settings.center_momentum)
        return probs

    @torch.no_grad()
    def _reference_kl(self, s_logits, t_logits, temp, kl, b, n_global) -> torch.Tensor:
        """``kl_dino`` against the targets at the *final* teacher temperature: while the
        temperature warms up the targets soften by themselves and ``kl_dino`` falls without
        any learning; this one moves only when the student (or the teacher's EMA) does. The
        "not learning" rule watches it."""
        end = self.settings.teacher_temp[1]
        if temp == end:
            return kl
        if self.settings.centering == "sinkhorn_knopp":
            ref = sinkhorn_knopp(t_logits, end, self.settings.sinkhorn_iterations)
        else:
            ref = centred_softmax(t_logits, self.dino_center, end)
        entropy = -(ref * ref.clamp(min=1e-12).log()).sum(-1).mean()
        return dino_loss(s_logits, ref, b, n_global, self.settings.student_temp) - entropy

    def _views(self, images: torch.Tensor, params: dict, size: int) -> torch.Tensor:
        """All views, view-major: ``(V*B, T, C, size, size)``."""
        n_views = params["theta"].shape[1]
        return torch.cat(
            [
                render_views(images, {k: v[:, i] for k, v in params.items()}, size, rgb=self.rgb)
                for i in range(n_views)
            ]
        )

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        s = self.settings
        images = batch["image"]
        b = images.shape[0]
        days = batch.get("days")
        n_global = batch["global"]["theta"].shape[1]
        student, teacher = self.student["backbone"], self.teacher["backbone"]
        student_head = self.student["head"]
        p = student.num_prefix_tokens
        temp = self.teacher_temp(step)

        global_crops = self._views(images, batch["global"], self.crops.global_size)
        global_days = days.repeat(n_global, 1) if days is not None else None
        masks = batch["masks"].transpose(0, 1).reshape(n_global * b, -1)  # view-major
        tokens_per_position = global_crops.shape[1] * student.num_groups
        token_mask = masks.repeat(1, tokens_per_position)  # frame-major, group, patch

        with torch.no_grad():
            t_out = teacher.encode(teacher.embed(global_crops, global_days))
            t_cls_logits = self.teacher["head"](t_out[:, 0])
            t_patch_logits = self.teacher["head"](t_out[:, p:][token_mask])
            t_cls = self._targets(t_cls_logits, self.dino_center, temp)
            t_patch = self._targets(t_patch_logits, self.ibot_center, temp)

        s_out = student.encode(student.embed(global_crops, global_days, patch_mask=token_mask))
        s_global_cls = s_out[:, 0]
        s_logits = [student_head(s_global_cls)]
        if "local" in batch:
            n_local = batch["local"]["theta"].shape[1]
            local_crops = self._views(images, batch["local"], self.crops.local_size)
            local_days = days.repeat(n_local, 1) if days is not None else None
            s_local = student.encode(student.embed(local_crops, local_days))
            s_logits.append(student_head(s_local[:, 0]))
        s_logits = torch.cat(s_logits).float()

        loss_dino = dino_loss(s_logits, t_cls, b, n_global, s.student_temp)

        # iBOT: masked patch tokens, each masked image weighing the same; the mean over the
        # masked images of all ranks (the rank's share scaled by the world size, as DDP averages
        # gradients), times the masking probability: DINOv2's scale (it masks exactly that
        # fraction of each batch and divides by all global crops) without the noise of a
        # varying number of masked images per batch.
        s_patch_logits = student_head(s_out[:, p:][token_mask])
        per_token = cross_entropy(s_patch_logits, t_patch, s.student_temp)
        weights = (1.0 / token_mask.sum(dim=1).clamp(min=1)).unsqueeze(1).expand_as(token_mask)
        masked_images = _all_reduce_(token_mask.any(dim=1).sum().float())
        loss_ibot = (
            (per_token * weights[token_mask]).sum()
            * s.mask_probability
            * _world_size()
            / masked_images.clamp(min=1)
        )

        loss_koleo = torch.stack([koleo(c) for c in s_global_cls.chunk(n_global)]).sum()
        loss = s.dino_weight * loss_dino + s.ibot_weight * loss_ibot + s.koleo_weight * loss_koleo
        diagnostics = dino_diagnostics(s_logits, t_cls, s.student_temp, n_global)
        diagnostics["kl_dino"] = loss_dino.detach() - diagnostics["teacher_entropy"]
        diagnostics["kl_dino_ref"] = self._reference_kl(
            s_logits.detach(), t_cls_logits, temp, diagnostics["kl_dino"], b, n_global
        )
        diagnostics["prototype_max_mass"] = prototype_max_mass(t_cls)
        return {
            "loss": loss,
            "loss_dino": loss_dino,
            "loss_ibot": loss_ibot,
            "loss_koleo": loss_koleo,
            **diagnostics,
            "teacher_temp": torch.tensor(temp),
            "momentum": torch.tensor(self.momentum(step)),
        }

    # -- engine hooks ------------------------------------------------------------------------
    def grad_norm_groups(self) -> dict[str, list[nn.Parameter]]:
        """The log's gradient-norm groups (:mod:`geoexplora.ssl.groups`)."""
        from geoexplora.ssl.groups import grad_groups

        return grad_groups(self.student["backbone"], self.student["head"])

    def clip_groups(self) -> dict[str, list[nn.Parameter]] | None:
        """Clipped separately, as DINOv2 clips each student module (backbone, head) at 3.0;
        None (one joint clip) when ``settings.separate_clips`` is off."""
        if not self.settings.separate_clips:
            return None
        return {
            name: [p for p in module.parameters() if p.requires_grad]
            for name, module in self.student.items()
        }

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototypes (direction and gain): DINOv2 gives them their own lr schedule, the
        main one at 0 for the first ``freeze_last_layer_steps`` steps (``adapt`` puts them in
        their own optimiser groups; see :class:`LastLayerSchedules`)."""
        return [p for p in self.student["head"].last_layer.parameters() if p.requires_grad]

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        m = self.momentum(step)
        for student_param, teacher_param in self._ema_pairs:
            teacher_param.mul_(m).add_(student_param.detach(), alpha=1 - m)
