"""A real 2-process DDP ``adapt`` run on CPU (gloo), through the same library path as the CLI.

Run as a program, this file is one rank of that run: Lightning Fabric's launcher re-runs
``sys.argv`` once per extra device, exactly as it re-runs ``geoexplora adapt``.
KoLeo is off: it is computed per rank (as in DINOv2), so only without it do 2 ranks x batch 2
and 1 process x batch 4 compute the same thing (Sinkhorn, centres and iBOT normalisation are
all-reduced).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from geoexplora import sample
from geoexplora.pipelines.adapt import AdaptConfig, adapt

TINY = "geo_vit_tiny_patch14"


def ddp_config(out: Path, weights: Path, batch_size: int, devices: int) -> AdaptConfig:
    return AdaptConfig(
        inputs=sample.slovenia_scenes()[:2],
        output=out,
        bands=["B2", "B3", "B4", "B8"],
        init=TINY,
        init_weights=str(weights),
        steps=3,
        batch_size=batch_size,
        crop_size=56,
        local_crop_size=28,
        local_crops=1,
        lr=1e-3,
        drop_path=0.0,
        num_workers=0,
        accelerator="cpu",
        devices=devices,
        checkpoint_every=100,
        settings_overrides={"koleo_weight": 0.0},
    )


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    from factories import timm_model

    from geoexplora.models.file import load_model

    weights = tmp_path / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), weights)
    ddp_out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, __file__, str(ddp_out), str(weights)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(ddp_out.with_suffix(".json").read_text())
    assert ddp["world_size"] == 2 and ddp["global_batch"] == 4
    checksums = ddp["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]

    single = adapt(ddp_config(tmp_path / "single.pt", weights, batch_size=4, devices=1)).report
    assert single["world_size"] == 1 and single["global_batch"] == 4
    want = load_model(tmp_path / "single.pt").state_dict()
    got = load_model(ddp_out).state_dict()
    moved = 0
    initial = torch.load(weights, weights_only=True)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
        moved += name.removeprefix("vit.") in initial and not torch.equal(
            tensor, initial[name.removeprefix("vit.")]
        )
    assert moved > 10  # the comparison is between trained models, not two copies of the init


if __name__ == "__main__":
    out, weights_path = Path(sys.argv[1]), Path(sys.argv[2])
    result = adapt(ddp_config(out, weights_path, batch_size=2, devices=2))
    if result is not None:  # rank 0
        out.with_suffix(".json").write_text(json.dumps(result.report, default=str))
