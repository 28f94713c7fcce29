"""The shared training engine (geoexplora.train.engine), on a toy regression objective."""

from __future__ import annotations

import itertools
import json
import os
import signal

import pytest
import torch
from torch import nn

from geoexplora.errors import UserError
from geoexplora.train import engine as E


class ToyData:
    """Sample i -> (x_i, y_i) from a fixed linear map; depends only on i."""

    def __getitem__(self, i):
        rng = E.sample_rng(7, i)
        x = torch.from_numpy(rng.normal(size=4).astype("float32"))
        return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5, 3.0])}


class ToyObjective(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 1)
        self.register_buffer("ema", torch.zeros(1))
        self.after_steps = []

    def forward(self, batch, step):
        pred = self.head(batch["x"] + 0 * self.frozen(batch["x"])).squeeze(-1)
        mse = ((pred - batch["y"]) ** 2).mean()
        return {"loss": mse, "loss_mse": mse, "step_seen": torch.tensor(float(step))}

    def after_optimizer_step(self, step):
        self.ema.mul_(0.5).add_(self.head.bias.detach() * 0.5)
        self.after_steps.append(step)


def _loop(tmp_path, steps=12, seed=0, **kw):
    torch.manual_seed(0)
    fabric = E.make_fabric(E.FabricSettings(accelerator="cpu"))
    objective = ToyObjective()
    groups = E.param_groups(objective)
    optimizer = E.build_optimizer(groups)
    schedules = E.Schedules(
        total_steps=steps,
        lr=0.05,
        min_lr=0.001,
        warmup_steps=2,
        weight_decay=0.01,
        weight_decay_end=0.1,
    )
    settings = E.LoopSettings(
        output=tmp_path / "out.pt",
        steps=steps,
        batch_size=4,
        num_workers=0,
        seed=seed,
        checkpoint_every=kw.pop("every", 5),
        **kw,
    )
    return E.TrainLoop(
        fabric, objective, optimizer, ToyData(), settings, schedules, fingerprint={"seed": seed}
    )


def test_cosine_warms_up_linearly_then_decays_to_the_final_value():
    values = [E.cosine(s, 10, 1.0, 0.1, warmup=2) for s in range(11)]
    assert values[:3] == [0.0, 0.5, 1.0]
    assert values[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))


def test_param_groups_apply_layer_decay_multipliers_and_no_decay_on_biases():
    model = nn.Module()
    model.patch_embed = nn.Linear(2, 2)
    model.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    model.norm = nn.LayerNorm(2)
    groups = E.param_groups(
        model, num_blocks=2, layer_decay=0.5, lr_multipliers={"patch_embed": 0.2}
    )
    scale = {n: (g["lr_scale"], g["wd_scale"]) for g in groups for n in g["names"]}
    assert scale["patch_embed.weight"] == (pytest.approx(0.125 * 0.2), 1.0)
    assert scale["blocks.0.weight"] == (0.25, 1.0)
    assert scale["blocks.1.bias"] == (0.5, 0.0)
    assert scale["norm.weight"] == (1.0, 0.0)


def test_step_sampler_splits_each_global_batch_across_ranks_and_resumes_mid_run():
    one = list(E.StepSampler(batch_size=4, accumulate=2, total_steps=3))
    ranks = [list(E.StepSampler(2, 2, 3, rank=r, world_size=2)) for r in range(2)]
    assert one == list(range(24))
    assert sorted(ranks[0] + ranks[1]) == one
    assert ranks[1][:2] == [2, 3]
    assert list(E.StepSampler(4, 2, 3, start_step=2)) == list(range(16, 24))


def test_epoch_index_visits_every_item_once_per_epoch_with_a_new_order():
    index = E.EpochIndex(5, seed=3)
    epochs = [[index.epoch_and_item(e * 5 + i)[1] for i in range(5)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(5))
    assert epochs[0] != epochs[1]


def test_run_trains_logs_plots_and_checkpoints(tmp_path):
    loop = _loop(tmp_path)
    summary = loop.run()
    assert summary["last_loss"] < summary["first_loss"]
    assert not loop.objective.frozen.weight.requires_grad
    records = [json.loads(line) for line in (tmp_path / "out.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"loss", "loss_mse", "lr", "weight_decay", "images_per_s"} <= set(records[0])
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(0.05)
    assert (tmp_path / "out.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert state["step"] == 12
    assert loop.objective.after_steps == list(range(12))
    assert 0.0 <= summary["data_wait_fraction"] < 1.0


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = _loop(tmp_path / "a")
    full.run()
    part = _loop(tmp_path / "b", every=5)
    part.settings.steps = 5  # stop after the first checkpoint, as an interruption would
    part.run()
    rest = _loop(tmp_path / "b")
    rest.run(resume=True)
    for (name, a), b in zip(
        full.objective.state_dict().items(), rest.objective.state_dict().values()
    ):
        assert torch.equal(a, b), name
    assert [r["step"] for r in E.read_log(tmp_path / "b" / "out.log.jsonl")] == list(range(1, 13))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    _loop(tmp_path, steps=3, seed=0).run()
    with pytest.raises(UserError, match="different run"):
        _loop(tmp_path, steps=3, seed=1).run(resume=True)


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        _loop(tmp_path).run(resume=True)


def test_sigterm_checkpoints_at_the_step_boundary_and_stops(tmp_path):
    loop = _loop(tmp_path, every=100)
    handler_before = signal.getsignal(signal.SIGTERM)

    def kill_at_step_3(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    loop.objective.after_optimizer_step = kill_at_step_3
    with pytest.raises(E.Interrupted, match="step 3/12"):
        loop.run()
    assert torch.load(tmp_path / "out.ckpt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the loop restores the handler


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = _loop(tmp_path / "a", steps=3)
    big.settings.batch_size = 8
    big.run()
    small = _loop(tmp_path / "b", steps=3, accumulate=2)
    small.run()
    torch.testing.assert_close(big.objective.head.weight, small.objective.head.weight)
