"""ExPLoRA vs full-parameter extended pre-training: one training step of the same model and batch.

Same ViT-S/14 (random weights: timing only), same 224 px DINOv2 multi-crop batch, same
objective (DINO + iBOT + KoLeo, EMA teacher), one process. Each method runs in its own
subprocess so that peak memory (CUDA allocator peak, or the process's peak RSS on CPU, minus
the RSS after imports) is its own. Prints one JSON line per method, then one with the ratios
(full / ExPLoRA: > 1 means ExPLoRA is cheaper).

    python benchmarks/adapt_step.py [--steps 3] [--batch-size 2] [--local-crops 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(method: str, steps: int, batch_size: int, local_crops: int, device: str) -> dict:
    import dataclasses

    import numpy as np
    import torch

    from geoexplora.defaults import DINOV2, dino_head_size
    from geoexplora.models import apply_explora, build_backbone, parameter_report
    from geoexplora.ssl.dinov2 import CropSizes, DinoV2Objective, DinoV2Views
    from geoexplora.train import engine as E

    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    settings = dataclasses.replace(DINOV2, local_crops=local_crops)
    vit = build_backbone(
        init="vit_small_patch14_dinov2",
        init_weights="random",
        bands=None,
        img_size=224,
        drop_path_rate=settings.drop_path,
    )
    if method == "explora":
        apply_explora(vit)
    else:
        vit.requires_grad_(True)
    report = parameter_report(vit)
    crops = CropSizes.for_patch(vit.patch_size, settings)
    objective = DinoV2Objective(
        vit, dino_head_size(vit.embed_dim), crops, total_steps=100, settings=settings
    ).to(device)
    groups = E.param_groups(
        objective,
        num_blocks=vit.depth,
        layer_decay=settings.layer_decay,
        lr_multipliers={"patch_embed": settings.patch_embed_lr_mult},
    )
    optimizer = E.build_optimizer(groups, betas=settings.betas)
    schedules = E.Schedules(100, lr=1e-4, warmup_steps=0, weight_decay=0.04)
    views = DinoV2Views(vit.patch_size, crops, settings)
    images = torch.rand(batch_size, 1, 3, 224, 224) * 3000
    samples = [views(np.random.default_rng(i), images[i].numpy()) for i in range(batch_size)]
    batch = torch.utils.data.default_collate(samples)
    batch["image"] = images
    batch = {
        k: (v.to(device) if torch.is_tensor(v) else {kk: vv.to(device) for kk, vv in v.items()})
        for k, v in batch.items()
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step(i: int) -> None:
        schedules.apply(optimizer, i)
        with autocast:
            loss = objective(batch, i)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], settings.clip_grad
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_optimizer_step(i)

    step(0)  # warm-up (allocations, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_after_imports
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    return {
        "method": method,
        "device": device,
        "model": "vit_small_patch14_dinov2 (random)",
        "img_size": 224,
        "batch_size": batch_size,
        "crops": f"2x224 + {local_crops}x98",
        "steps_timed": steps,
        "step_seconds": round(seconds, 4),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda_max_allocated" if device == "cuda" else "rss_peak_delta",
        "trainable_backbone": report["trainable"],
        "total_backbone": report["total"],
        "trainable_with_head": trainable,
        "optimizer_state_bytes": optimizer_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--method", choices=("explora", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.method:  # one measurement, in this (child) process
        print(
            json.dumps(
                measure(args.method, args.steps, args.batch_size, args.local_crops, args.device)
            )
        )
        return
    results = {}
    for method in ("explora", "full"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--method",
                method,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--local-crops",
                str(args.local_crops),
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[method]), flush=True)
    e, f = results["explora"], results["full"]
    print(
        json.dumps(
            {
                "benchmark": "adapt_step",
                "device": args.device,
                "step_time_ratio_full_over_explora": round(
                    f["step_seconds"] / e["step_seconds"], 3
                ),
                "peak_memory_ratio_full_over_explora": round(
                    f["peak_memory_bytes"] / max(e["peak_memory_bytes"], 1), 3
                ),
                "trainable_parameter_ratio_full_over_explora": round(
                    f["trainable_backbone"] / e["trainable_backbone"], 2
                ),
                "optimizer_state_bytes": {
                    "explora": e["optimizer_state_bytes"],
                    "full": f["optimizer_state_bytes"],
                },
                "optimizer_state_ratio_full_over_explora": round(
                    f["optimizer_state_bytes"] / e["optimizer_state_bytes"], 2
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
