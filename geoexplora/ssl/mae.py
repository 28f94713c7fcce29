"""The MAE objective: mask 75 % of the patch tokens, reconstruct their pixels.

Recipe section 2, MAE sources (values in :data:`geoexplora.defaults.MAE`): the encoder sees
only the visible tokens; a decoder reconstructs the (per-patch normalised) pixels of the masked
ones. When the source checkpoint carries MAE's decoder (``decoder_*`` keys, kept by the model
layer in ``GeoViT.mae_decoder_state``) it is reused and LoRA-tuned (rank 8 on q, v; its norms
train too); otherwise a new light decoder is trained in full.

Tokens follow the GeoViT layout (frame, spectral group, patch); the target of token
``(t, g, n)`` is patch ``n`` of frame ``t`` in the bands of group ``g``, in model-normalised
units. Nodata pixels are left out of the loss. The random masking comes from per-sample noise
drawn in the data workers (:class:`MaeViews`), so it resumes exactly and is independent of the
number of processes.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoexplora.defaults import AUGMENT, MAE, AugmentDefaults, MaeDefaults
from geoexplora.ssl.augment import ViewSpec, draw_view, render_views, stack_views

MAE_CROP_SCALE = (0.2, 1.0)  # MAE's RandomResizedCrop scale


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position table ``(height*width, dim)``."""
    if dim % 4:
        raise ValueError(f"decoder width {dim} must be a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )

    def encode(pos):
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(xs), encode(ys)], dim=1).float()


@torch.no_grad()
def mean_patch_baseline(
    target: torch.Tensor, valid: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """The reconstruction error of predicting, for every masked patch, the mean masked patch of
    its image (the best constant guess): a decoder that has learnt nothing about the visible
    patches scores about this, so ``loss_mae / mae_baseline`` below 1 shows real learning."""
    weight = (masked.unsqueeze(-1) * valid).float()
    mean = (target * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
    err = ((target - mean) ** 2 * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    return (err * masked).sum() / masked.sum().clamp(min=1)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)``, MAE's order (channel fastest)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MaeDecoder(nn.Module):
    """MAE's decoder with MAE's parameter names (so a source decoder loads as is), plus a
    learned embedding per (frame, group) slot when tokens come from several of them."""

    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int,
        depth: int,
        heads: int,
        pred_dim: int,
        grid: tuple[int, int],
        slots: int = 1,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed",
            torch.cat([torch.zeros(1, decoder_dim), sincos_2d(decoder_dim, *grid)]).unsqueeze(0),
        )
        self.grid = tuple(grid)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    decoder_dim,
                    heads,
                    mlp_ratio=4.0,
                    qkv_bias=True,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for _ in range(depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, pred_dim)
        self.slot_embed = nn.Parameter(torch.zeros(slots, decoder_dim)) if slots > 1 else None
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_source(
        cls, state: dict[str, torch.Tensor], embed_dim: int, pred_dim: int, slots: int
    ) -> tuple[MaeDecoder, bool]:
        """The source's decoder; (decoder, whether its pixel predictor was reused). MAE's
        decoders use 32-wide attention heads (512 wide, 16 heads)."""
        dim = state["decoder_embed.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
        pos = state["decoder_pos_embed"]
        side = math.isqrt(pos.shape[1] - 1)
        decoder = cls(embed_dim, dim, depth, max(1, dim // 32), pred_dim, (side, side), slots)
        own = decoder.state_dict()
        reuse_pred = tuple(state.get("decoder_pred.weight", torch.empty(0)).shape) == tuple(
            own["decoder_pred.weight"].shape
        )
        wanted = {
            k: v
            for k, v in state.items()
            if k in own and (reuse_pred or not k.startswith("decoder_pred."))
        }
        wanted["mask_token"] = state["mask_token"].reshape(own["mask_token"].shape)
        missing = decoder.load_state_dict(wanted, strict=False).missing_keys
        unexpected_missing = [
            k for k in missing if not k.startswith(("decoder_pred.", "slot_embed"))
        ]
        if unexpected_missing:
            raise ValueError(f"MAE decoder weights incomplete: {unexpected_missing[:4]}")
        return decoder, reuse_pred

    def position(self, height: int, width: int) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(
            self.decoder_pos_embed,
            new_size=(height, width),
            old_size=self.grid,
            num_prefix_tokens=1,
        )

    def forward(
        self,
        encoded: torch.Tensor,
        ids_restore: torch.Tensor,
        prefix: int,
        grid: tuple[int, int],
        slots: int,
    ) -> torch.Tensor:
        """``encoded`` (B, P + kept, D) -> predictions (B, L, pred_dim) for all L tokens."""
        x = self.decoder_embed(encoded)
        b, total = ids_restore.shape
        kept = x.shape[1] - prefix
        patches = torch.cat([x[:, prefix:], self.mask_token.expand(b, total - kept, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        pos = self.position(*grid)  # (1, 1 + N, Dd)
        n = grid[0] * grid[1]
        patches = patches.reshape(b, slots, n, -1) + pos[:, 1:].unsqueeze(1)
        if self.slot_embed is not None:
            patches = patches + self.slot_embed.view(1, slots, 1, -1)
        head = x[:, :prefix].clone()
        head[:, :1] = head[:, :1] + pos[:, :1]
        x = torch.cat([head, patches.reshape(b, slots * n, -1)], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]


class MaeViews:
    """Per sample: one crop (MAE's random resized crop + flips/rotations, no photometric
    jitter) and the masking noise of its tokens."""

    def __init__(self, size: int, num_tokens: int, aug: AugmentDefaults = AUGMENT):
        self.spec = ViewSpec(size, MAE_CROP_SCALE, blur_p=0.0)
        self.aug = dataclasses.replace(aug, jitter_p=0.0, grayscale_p=0.0)
        self.num_tokens = num_tokens

    def __call__(self, rng: np.random.Generator, image: np.ndarray) -> dict:
        _, c, h, w = image.shape
        return {
            "view": stack_views([draw_view(rng, h, w, c, self.spec, self.aug)]),
            "noise": torch.from_numpy(rng.random(self.num_tokens).astype(np.float32)),
        }


class MaeObjective(nn.Module):
    """The engine's objective for MAE sources. ``backbone``: a GeoViT parameterised by
    ``apply_explora``; its ``mae_decoder_state`` decides between the source decoder (LoRA-tuned)
    and a new one."""

    def __init__(
        self,
        backbone: nn.Module,
        img_size: int,
        settings: MaeDefaults = MAE,
        lora_alpha: float = 1.0,
    ):
        super().__init__()
        self.settings = settings
        self.img_size = img_size
        self.backbone = backbone
        patch = backbone.patch_size
        groups = backbone.config["spectral_groups"]
        self.groups = [list(g) for g in groups]
        pred_dim = patch * patch * max(len(g) for g in groups)
        slots = backbone.num_frames * len(groups)
        source = getattr(backbone, "mae_decoder_state", None) or {}
        self.reused_pred = False
        if source:
            decoder, self.reused_pred = MaeDecoder.from_source(
                source, backbone.embed_dim, pred_dim, slots
            )
            self.decoder_source = "source_lora"
            self._lora_tune(decoder, settings.decoder_lora_rank, lora_alpha)
        else:
            dim = min(settings.decoder_dim, backbone.embed_dim)
            grid = backbone.grid_size(img_size, img_size)
            decoder = MaeDecoder(
                backbone.embed_dim,
                dim,
                settings.decoder_depth,
                max(1, dim // 32),
                pred_dim,
                grid,
                slots,
            )
            self.decoder_source = "new"
        self.decoder = decoder

    def _lora_tune(self, decoder: MaeDecoder, rank: int, alpha: float) -> None:
        """Freeze the source decoder; LoRA on q, v of its blocks; train norms and new parts."""
        from peft import LoraConfig, inject_adapter_in_model

        from geoexplora.models.explora import SplitQKV

        targets = []
        for i, block in enumerate(decoder.decoder_blocks):
            block.attn.qkv = SplitQKV(block.attn.qkv)
            targets += [f"decoder_blocks.{i}.attn.qkv.q", f"decoder_blocks.{i}.attn.qkv.v"]
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, bias="none"), decoder
        )
        decoder.requires_grad_(False)
        for name, param in decoder.named_parameters():
            if "lora_" in name or (name.startswith("decoder_pred.") and not self.reused_pred):
                param.requires_grad_(True)
        for module in decoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
        if decoder.slot_embed is not None:
            decoder.slot_embed.requires_grad_(True)

    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token pixel targets ``(B, L, p*p*Cmax)`` in model-normalised units and their
        validity (False for nodata and for the padding of smaller groups)."""
        patch = self.backbone.patch_size
        z = self.backbone.normalise(images.float())
        valid = torch.isfinite(images)
        outs, masks = [], []
        width = patch * patch * max(len(g) for g in self.groups)
        for t in range(images.shape[1]):
            for group in self.groups:
                target = patchify(z[:, t, group], patch)
                ok = patchify(valid[:, t, group].float(), patch) > 0.5
                pad = width - target.shape[-1]
                outs.append(F.pad(target, (0, pad)))
                masks.append(F.pad(ok, (0, pad), value=False))
        return torch.cat(outs, dim=1), torch.cat(masks, dim=1)

    def grad_norm_groups(self) -> dict[str, list[nn.Parameter]]:
        """The log's gradient-norm groups (:mod:`geoexplora.ssl.groups`); the decoder is the
        ``head``."""
        from geoexplora.ssl.groups import grad_groups

        return grad_groups(self.backbone, self.decoder)

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        vit = self.backbone
        params = {k: v[:, 0] for k, v in batch["view"].items()}
        images = render_views(batch["image"], params, self.img_size)
        b = images.shape[0]
        tokens = vit.embed(images, batch.get("days"))
        p = vit.num_prefix_tokens
        total = tokens.shape[1] - p
        keep = max(1, int(total * (1 - self.settings.mask_ratio)))
        ids_shuffle = torch.argsort(batch["noise"], dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        visible = torch.gather(
            tokens[:, p:], 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, tokens.shape[2])
        )
        encoded = vit.encode(torch.cat([tokens[:, :p], visible], dim=1))
        grid = vit.grid_size(self.img_size, self.img_size)
        slots = total // (grid[0] * grid[1])
        pred = self.decoder(encoded, ids_restore, p, grid, slots).float()

        target, valid = self.targets(images)
        if self.settings.norm_pix_loss:
            count = valid.sum(-1, keepdim=True).clamp(min=1)
            mean = (target * valid).sum(-1, keepdim=True) / count
            var = (((target - mean) * valid) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
            target = (target - mean) / (var + 1e-6).sqrt()
        err = ((pred - target) ** 2 * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        masked = torch.ones(b, total, device=images.device)
        masked[:, :keep] = 0
        masked = torch.gather(masked, 1, ids_restore) * valid.any(-1)
        loss = (err * masked).sum() / masked.sum().clamp(min=1)
        baseline = mean_patch_baseline(target, valid, masked)
        return {
            "loss": loss,
            "loss_mae": loss,
            "mae_baseline": baseline,
            "mae_vs_baseline": loss.detach() / baseline.clamp(min=1e-12),
        }
