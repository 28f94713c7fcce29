"""The training loop shared by ``adapt`` and ``finetune``, on Lightning Fabric.

What a caller provides
----------------------
* an **objective**: an ``nn.Module`` whose ``forward(batch, step)`` returns a dict of scalar
  tensors: ``"loss"`` (the total to minimise), ``"loss_<term>"`` for its parts (logged and
  plotted) and any other metric to log (e.g. ``"teacher_temp"``, ``"acc"``). Everything
  the run must resume (EMA teacher, centres, heads) lives in its ``state_dict``. Optional
  methods, called on every rank outside the DDP wrapper:
  ``before_optimizer_step(step)`` (e.g. drop the gradients of a frozen head layer) and
  ``after_optimizer_step(step)`` (e.g. the EMA update);
* parameter groups from :func:`param_groups` (layer-wise lr decay, per-group multipliers, no
  weight decay on biases/norms/tokens) and :class:`Schedules` (cosine lr and weight decay with
  warm-up);
* a **map-style dataset over global sample indices**: ``dataset[i]`` must depend only on ``i``
  (and the dataset's own seed), never on a worker's RNG. :class:`StepSampler` hands every rank
  its share of each global batch, so a run is reproducible, a resumed run sees exactly the
  samples the uninterrupted run would have seen, and N processes with batch B see the same
  samples as one process with batch N*B. :class:`EpochIndex` turns a finite dataset into such a
  stream (a seeded permutation per epoch).

What the engine does
--------------------
Fabric set-up (devices, nodes, strategy, precision), AdamW, gradient accumulation (no DDP sync
on the inner micro-batches), gradient clipping, checkpoints every N steps and on SIGINT/SIGTERM
(saved at the next step boundary, agreed across ranks), exact resume (module, optimiser, step;
torch's RNG is re-seeded from (seed, micro-batch, rank) before every forward, so dropout and
drop-path resume too),
a rich progress bar on stderr, a JSONL log of all loss terms, a PNG of the loss curves, and a
summary dict for ``--json`` (first/last loss, images/s, the fraction of time spent waiting for
data, peak memory).

Files next to the output ``OUT`` (see :class:`RunFiles`): ``OUT-stem.ckpt`` (checkpoint),
``OUT-stem.log.jsonl``, ``OUT-stem.loss.png``.

Usage::

    fabric = make_fabric(FabricSettings(devices=2))
    objective = MyObjective(...)
    optimizer = build_optimizer(param_groups(objective, ...), betas=(0.9, 0.999))
    loop = TrainLoop(fabric, objective, optimizer, dataset, LoopSettings(...), schedules,
                     collate_fn=..., fingerprint={...})
    summary = loop.run(resume=False)
    model = loop.objective  # the unwrapped module, trained
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from geoexplora.defaults import ENGINE
from geoexplora.errors import RuntimeFailure, UserError, opt
from geoexplora.log import logger, make_progress
from geoexplora.train.diagnostics import learning_signal, stall_reason
from geoexplora.train.tracking import log_record

CHECKPOINT_FORMAT = "geoexplora-train-checkpoint"
CHECKPOINT_VERSION = 1


class Interrupted(RuntimeFailure):
    """SIGINT/SIGTERM: a checkpoint was written; the run continues with ``--resume``."""

    exit_code = 130


# ---------------------------------------------------------------------------------------------
# Fabric
# ---------------------------------------------------------------------------------------------


@dataclass
class FabricSettings:
    accelerator: str = "auto"  # auto, cpu, gpu/cuda
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto -> ENGINE.strategy_multi_device when >1 device or node
    precision: str | None = None  # None -> bf16-mixed on GPUs with bf16, 32-true on CPU


def default_precision(accelerator: str) -> str:
    """bf16-mixed where the GPU has bf16, 16-mixed on older GPUs, 32-true on CPU."""
    if accelerator == "cuda":
        return ENGINE.precision_gpu if torch.cuda.is_bf16_supported() else "16-mixed"
    return ENGINE.precision_cpu


def make_fabric(settings: FabricSettings, launch: bool = True):
    """A launched Fabric. With ``devices > 1`` and the default DDP strategy, Fabric re-runs the
    current command once per extra device (its subprocess launcher): call this early, from a
    program whose ``sys.argv`` reproduces the run (the CLI does)."""
    from lightning.fabric import Fabric

    from geoexplora.devices import device_count, resolve_accelerator

    accelerator = resolve_accelerator(settings.accelerator)
    devices = settings.devices
    if isinstance(devices, int) and devices < 1:
        raise UserError(f"{opt('devices')} must be at least 1, not {devices}")
    if settings.num_nodes < 1:
        raise UserError(f"{opt('num_nodes')} must be at least 1, not {settings.num_nodes}")
    if accelerator == "cuda" and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise UserError(f"{opt('devices')} {devices}: only {torch.cuda.device_count()} GPU(s) here")
    strategy = settings.strategy
    many = device_count(devices) > 1 or settings.num_nodes > 1
    if strategy == "auto" and many:
        strategy = ENGINE.strategy_multi_device
    precision = settings.precision or default_precision(accelerator)
    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=settings.num_nodes,
        strategy=strategy,
        precision=precision,
    )
    if launch:
        fabric.launch()
    return fabric


# ---------------------------------------------------------------------------------------------
# Optimiser: parameter groups and schedules
# ---------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = (
    "patch_embed",
    "cls_token",
    "reg_token",
    "pos_embed",
    "mask_token",
    "spectral",
    "temporal",
)
_NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token")


def vit_layer_id(name: str, num_blocks: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay: 0 for embeddings and tokens, i+1 for
    ``blocks.i``, ``num_blocks + 1`` for everything after the blocks (final norm, heads)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(part in name for part in _EMBEDDING):
        return 0
    return num_blocks + 1


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in _NO_DECAY_NAMES)


def param_groups(
    module: nn.Module,
    num_blocks: int | None = None,
    layer_decay: float = 1.0,
    lr_multipliers: dict[str, float] | None = None,
    layer_id: Callable[[str, int], int] = vit_layer_id,
    exclude: Callable[[str], bool] | None = None,
) -> list[dict]:
    """AdamW groups of the trainable parameters of ``module``.

    Each group carries ``lr_scale`` (layer-wise decay ``layer_decay ** (num_blocks + 1 - depth)``
    times every multiplier whose key is a substring of the parameter's name, e.g.
    ``{"patch_embed": 0.2}``) and ``wd_scale`` (0 for biases, norms and tokens, else 1);
    :class:`Schedules` multiplies them into ``lr``/``weight_decay`` at every step. Parameters
    whose name ``exclude`` accepts (e.g. an EMA teacher's) are left out.
    """
    lr_multipliers = lr_multipliers or {}
    if layer_decay != 1.0 and num_blocks is None:
        raise ValueError("layer_decay needs num_blocks")
    groups: dict[tuple[float, float], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad or (exclude is not None and exclude(name)):
            continue
        scale = 1.0
        if layer_decay != 1.0:
            scale = layer_decay ** (num_blocks + 1 - layer_id(name, num_blocks))
        for key, mult in lr_multipliers.items():
            if key in name:
                scale *= mult
        wd_scale = 0.0 if _no_weight_decay(name, p) else 1.0
        group = groups.setdefault(
            (scale, wd_scale), {"params": [], "names": [], "lr_scale": scale, "wd_scale": wd_scale}
        )
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise RuntimeFailure("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict], betas=(0.9, 0.999), eps: float = ENGINE.adamw_eps):
    """AdamW over ``groups`` (lr and weight decay are set by :class:`Schedules` every step)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    fused = all(p.is_cuda for g in clean for p in g["params"])
    return torch.optim.AdamW(
        clean, lr=0.0, weight_decay=0.0, betas=tuple(betas), eps=eps, fused=fused or None
    )


def cosine(
    step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup`` steps, then a cosine
    from ``start`` to ``end`` at ``total``. ``step`` counts from 0."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedules:
    """Learning rate and weight decay per step (step counts from 0)."""

    total_steps: int
    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    weight_decay_end: float | None = None  # None: constant

    def lr_at(self, step: int) -> float:
        return cosine(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps)

    def wd_at(self, step: int) -> float:
        end = self.weight_decay if self.weight_decay_end is None else self.weight_decay_end
        return cosine(step, self.total_steps, self.weight_decay, end)

    def apply(self, optimizer, step: int) -> tuple[float, float]:
        lr, wd = self.lr_at(step), self.wd_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd * group.get("wd_scale", 1.0)
        return lr, wd


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------


class StepSampler(Sampler[int]):
    """Global sample indices for steps ``start_step .. total_steps-1``, this rank's share.

    Step ``s``, micro-batch ``a`` covers the global indices ``g0 .. g0 + world*batch`` with
    ``g0 = (s * accumulate + a) * world * batch``; rank ``r`` takes ``batch`` consecutive ones
    from ``g0 + r*batch``. Independent of the number of workers, resumable at any step.
    """

    def __init__(
        self,
        batch_size: int,
        accumulate: int,
        total_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.batch_size, self.accumulate = batch_size, accumulate
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accumulate * self.batch_size

    def __iter__(self) -> Iterator[int]:
        per_micro = self.world_size * self.batch_size
        for s in range(self.start_step, self.total_steps):
            for a in range(self.accumulate):
                g0 = (s * self.accumulate + a) * per_micro + self.rank * self.batch_size
                yield from range(g0, g0 + self.batch_size)


class EpochIndex:
    """A finite dataset as an endless stream: global index ``i`` -> item ``perm_e[i % n]`` with
    a seeded permutation per epoch ``e = i // n`` (or the identity when ``shuffle`` is off).

    ``dataset[i]`` of the wrapped dataset receives the item index; :meth:`epoch_and_item` lets a
    wrapper derive per-sample randomness from the global index.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def epoch_and_item(self, i: int) -> tuple[int, int]:
        epoch, pos = divmod(i, self.n)
        if not self.shuffle:
            return epoch, pos
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(self.n))
        return epoch, int(self._perm[1][pos])


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of global sample ``index``: same draws in any worker/rank."""
    return np.random.default_rng([seed, index])


def _worker_init(_worker_id: int) -> None:
    # Workers leave SIGINT/SIGTERM to the main process, which checkpoints and shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def resolve_num_workers(num_workers: int | None) -> int:
    """DataLoader workers: as given, else ``ENGINE.num_workers`` capped by the CPU count."""
    if num_workers is None:
        return min(ENGINE.num_workers, max(0, (os.cpu_count() or 1) - 1))
    return num_workers


def make_loader(
    dataset,
    sampler: StepSampler,
    collate_fn=None,
    num_workers: int | None = None,
    pin_memory: bool = True,
    prefetch_factor: int = ENGINE.prefetch_factor,
):
    """A DataLoader over ``sampler`` with workers, pinned memory and prefetch."""
    num_workers = resolve_num_workers(num_workers)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(
            prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False
        )
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Files, logs, plots
# ---------------------------------------------------------------------------------------------


@dataclass
class RunFiles:
    """The files a run writes next to its output ``OUT``."""

    output: Path

    def _sibling(self, suffix: str) -> Path:
        return self.output.with_name(self.output.stem + suffix)

    @property
    def checkpoint(self) -> Path:
        return self._sibling(".ckpt")

    @property
    def log(self) -> Path:
        return self._sibling(".log.jsonl")

    @property
    def plot(self) -> Path:
        return self._sibling(".loss.png")

    def check(self, overwrite: bool, resume: bool, extra: tuple[Path, ...] = ()) -> None:
        """Before a run writes anything: ``--resume`` needs the checkpoint; a fresh run must not
        silently replace an earlier run's checkpoint, log or plot (``--overwrite`` allows it)."""
        from geoexplora.io.outputs import check_output

        if resume:
            if not self.checkpoint.exists():
                raise UserError(f"{opt('resume')}: no checkpoint {self.checkpoint}")
            return
        # A log or plot with neither a checkpoint nor an output beside it is what a run that
        # failed before its first checkpoint (a full disk, say) left: nothing to continue.
        unfinished = not self.checkpoint.exists() and not self.output.exists()
        for path in (self.checkpoint, self.log, self.plot, *extra):
            if path.exists() and not overwrite and unfinished and path in (self.log, self.plot):
                logger.warning("%s: left by a run that wrote no checkpoint; replacing it", path)
            elif path.exists() and not overwrite:
                raise UserError(
                    f"{path} exists (an earlier run's; {opt('resume')} continues it); pass "
                    f"{opt('overwrite')} to start afresh"
                )
            check_output(path, True)


def check_duration(steps: int | None, epochs: float | None) -> None:
    """A run is sized by ``--steps`` or ``--epochs`` (or neither: the command's default)."""
    if steps is not None and epochs is not None:
        raise UserError(f"give {opt('steps')} or {opt('epochs')}, not both")
    if steps is not None and steps < 1:
        raise UserError(f"{opt('steps')} must be at least 1, not {steps}")
    if epochs is not None and not epochs > 0:
        raise UserError(f"{opt('epochs')} must be positive, not {epochs}")


def progress_info(record: dict, lr: float, width: int) -> str:
    """The progress line's text: the total loss, lr and rate; every loss term too when the
    terminal is wide enough (the JSONL log always has them all)."""
    rate = f"lr {lr:.2e} {record['images_per_s']:.1f} img/s"
    signal = learning_signal(record)
    if signal != "loss":  # what the "not learning" rule watches (train/diagnostics.py)
        rate = f"{signal} {record[signal]:.3g} {rate}"
    terms = [k for k in record if is_loss_key(k) and k != "loss"]
    if terms and width >= 120:
        detail = " ".join(f"{k.removeprefix('loss_')} {record[k]:.3g}" for k in terms)
        return f"loss {record['loss']:.4g} ({detail}) {rate}"
    return f"loss {record['loss']:.4g} {rate}"


def is_loss_key(key: str) -> bool:
    """Logged keys that are losses (plotted): ``loss`` and ``loss_*``."""
    return key == "loss" or key.startswith("loss_")


def read_log(path: Path, upto_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if upto_step is not None:
        records = [r for r in records if r["step"] <= upto_step]
    return records


def write_loss_plot(records: list[dict], path: Path, title: str = "") -> None:
    """One PNG: every logged loss term against the step (log scale where all are positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geoexplora.io.outputs import atomic_output

    terms = [k for k in records[0] if is_loss_key(k)] if records else []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in records]
    for key in terms:
        ax.plot(steps, [r[key] for r in records], label=key, lw=1.2 if key == "loss" else 0.8)
    values = [r[k] for r in records for k in terms]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if terms:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopSettings:
    output: Path  # the final output; run files go next to it (RunFiles)
    steps: int
    batch_size: int  # per device
    accumulate: int = 1
    clip_grad: float | None = None
    checkpoint_every: int = ENGINE.checkpoint_every
    log_every: int | None = None  # None: so that the log has ~ENGINE.max_log_lines records
    seed: int = 0
    num_workers: int | None = None
    description: str = "train"
    stop_if_stalled: bool = False  # end (exit 1, checkpoint kept) once the run is not learning


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s received: checkpointing at the end of this step", signal.Signals(signum).name
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def replica_checksums(fabric, module: nn.Module) -> list[float]:
    """A float64 sum of every parameter and buffer, per rank: equal on all ranks when the
    replicas are in sync (DDP keeps them so; a mismatch is a bug, not noise)."""
    with torch.no_grad():
        local = sum(
            (
                t.detach().double().sum()
                for t in module.state_dict().values()
                if t.is_floating_point()
            ),
            torch.zeros((), dtype=torch.float64),
        )
    local = local.to(fabric.device).reshape(1)
    if fabric.world_size == 1:
        return [local.item()]
    import torch.distributed as dist

    gathered = [torch.zeros_like(local) for _ in range(fabric.world_size)]
    dist.all_gather(gathered, local)
    return [t.item() for t in gathered]


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def grad_norm(params) -> torch.Tensor:
    """The L2 norm of the gradients of ``params`` (those without a gradient count as 0)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@dataclass
class _RunState:
    """What one :meth:`TrainLoop.run` call tracks across its steps."""

    start_step: int
    history: list[dict]
    first: dict | None
    last: dict | None
    stopped_early_at: int | None = None
    stalled: str | None = None  # why the run is not learning, once it is found so
    wait_total: float = 0.0  # seconds waiting for data
    seconds: float = 0.0


class _Interval:
    """The loss terms and timings summed since the last logged record."""

    def __init__(self, start: float):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start, self.wait = start, 0.0

    def add(self, terms: dict[str, torch.Tensor], waited: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.wait += waited

    def close(
        self, step: int, lr: float, wd: float, images_per_step: int, elapsed: float, now: float
    ) -> dict:
        """The interval's record (means of its terms, rates), and a fresh interval from now."""
        span = max(now - self.start, 1e-9)
        record = {
            "step": step,
            **{k: v.item() / self.count for k, v in self.sums.items()},
            "lr": lr,
            "weight_decay": wd,
            "images_per_s": self.count * images_per_step / span,
            "data_wait_fraction": self.wait / span,
            "time": elapsed,
        }
        self.__init__(now)
        return record


class TrainLoop:
    """Runs ``steps`` optimiser steps of ``objective`` on ``dataset`` (see the module docs).

    ``fingerprint``: what must not change between a run and its resumption (options, data);
    a mismatch on ``--resume`` is a ``UserError`` naming the differing keys.
    ``on_checkpoint(step) -> bool``: optional, called on every rank after a checkpoint is
    written; returning True ends the run there (early stopping; it must agree on all ranks).
    """

    def __init__(
        self,
        fabric,
        objective: nn.Module,
        optimizer,
        dataset,
        settings: LoopSettings,
        schedules: Schedules,
        collate_fn=None,
        fingerprint: dict | None = None,
        on_checkpoint: Callable[[int], bool] | None = None,
    ):
        self.fabric = fabric
        self.settings = settings
        self.schedules = schedules
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, default=str))
        self.on_checkpoint = on_checkpoint
        self.files = RunFiles(Path(settings.output))
        for name in ("steps", "batch_size", "accumulate", "checkpoint_every"):
            if getattr(settings, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be at least 1, not {getattr(settings, name)}"
                )
        self.objective = objective  # unwrapped: what the caller exports
        self._grad_groups = (
            objective.grad_norm_groups() if hasattr(objective, "grad_norm_groups") else None
        )
        self._clip_groups = objective.clip_groups() if hasattr(objective, "clip_groups") else None
        self.module, self.optimizer = fabric.setup(objective, optimizer)
        self.step = 0
        self.elapsed = 0.0

    # -- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self) -> bool:
        """Rank 0 writes module + optimiser + step atomically; all ranks wait for it. Returns
        whether ``on_checkpoint`` asks to stop early."""
        if self.fabric.is_global_zero:
            from geoexplora.io.outputs import atomic_output, torch_save

            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": self.step,
                "elapsed": self.elapsed,
                "fingerprint": self.fingerprint,
                "module": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
            }
            with atomic_output(self.files.checkpoint, overwrite=True) as tmp:
                torch_save(state, tmp)
            records = read_log(self.files.log)
            if records:
                write_loss_plot(records, self.files.plot, self.settings.description)
        self.fabric.barrier()
        return bool(self.on_checkpoint(self.step)) if self.on_checkpoint is not None else False

    def load_checkpoint(self) -> None:
        path = self.files.checkpoint
        if not path.exists():
            raise UserError(
                f"{opt('resume')}: no checkpoint {path} (the run writes one every "
                f"{self.settings.checkpoint_every} steps and when interrupted)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            ValueError,
            zipfile.BadZipFile,
        ) as exc:
            raise UserError(
                f"{opt('resume')}: {path} is not a readable checkpoint ({exc})"
            ) from exc
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{opt('resume')}: {path} is not a geoexplora training checkpoint")
        differ = sorted(
            k
            for k in set(state["fingerprint"]) | set(self.fingerprint)
            if state["fingerprint"].get(k) != self.fingerprint.get(k)
        )
        if differ:
            detail = ", ".join(
                f"{k}: {state['fingerprint'].get(k)!r} -> {self.fingerprint.get(k)!r}"
                for k in differ[:4]
            )
            raise UserError(f"{opt('resume')}: {path} was written by a different run ({detail})")
        self.objective.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        logger.info("resuming from %s at step %d", path, self.step)

    # -- the loop -------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        s = self.settings
        sampler = StepSampler(
            s.batch_size,
            s.accumulate,
            s.steps,
            self.step,
            self.fabric.global_rank,
            self.fabric.world_size,
        )
        loader = make_loader(self.dataset, sampler, self.collate_fn, s.num_workers)
        return self.fabric.setup_dataloaders(loader, use_distributed_sampler=False)

    def _stop_requested(self, flag: _StopFlag) -> bool:
        """Whether any rank got SIGINT/SIGTERM (all ranks must stop at the same step)."""
        if self.fabric.world_size == 1:
            return flag.signum is not None
        local = torch.tensor(0.0 if flag.signum is None else 1.0, device=self.fabric.device)
        return bool(self.fabric.all_reduce(local, reduce_op="sum").item() > 0)

    def _check_stall(self, history: list[dict]) -> str | None:
        """The "not learning" rule (train/diagnostics.py) on rank 0's records, agreed by all
        ranks; warns once when it fires."""
        reason = stall_reason(history) if self.fabric.is_global_zero else None
        if self.fabric.world_size > 1:
            reason = self.fabric.broadcast(reason, src=0)
        if reason is not None and self.fabric.is_global_zero:
            logger.warning(
                "%s%s",
                reason,
                ""
                if self.settings.stop_if_stalled
                else "; --stop-if-stalled would end such a run here",
            )
        return reason

    def _log_every(self) -> int:
        if self.settings.log_every:
            return self.settings.log_every
        return max(1, math.ceil(self.settings.steps / ENGINE.max_log_lines))

    def _train_step(self, loader_iter) -> tuple[dict[str, torch.Tensor], float]:
        """One optimiser step (``accumulate`` micro-batches); returns (terms, data wait)."""
        s = self.settings
        fabric = self.fabric
        terms: dict[str, torch.Tensor] = {}
        waited = 0.0
        for micro in range(s.accumulate):
            t0 = time.perf_counter()
            batch = next(loader_iter)
            waited += time.perf_counter() - t0
            # Seeded after the fetch (creating a loader iterator draws from torch's RNG).
            torch.manual_seed(
                step_seed(s.seed, self.step * s.accumulate + micro, fabric.global_rank)
            )
            with fabric.no_backward_sync(self.module, enabled=micro < s.accumulate - 1):
                out = self.module(batch, self.step)
                fabric.backward(out["loss"] / s.accumulate)
            for k, v in out.items():
                v = v.detach().float() / s.accumulate
                terms[k] = terms[k] + v if k in terms else v
        hook = getattr(self.objective, "before_optimizer_step", None)
        if hook is not None:
            hook(self.step)
        terms.update(self._clip_and_measure())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        hook = getattr(self.objective, "after_optimizer_step", None)
        if hook is not None:
            hook(self.step)
        return terms, waited

    def _clip_and_measure(self) -> dict[str, torch.Tensor]:
        """Gradient norms per group of the objective's ``grad_norm_groups()`` (before clipping)
        as ``grad_norm_<group>``, then the clip: per group of ``clip_groups()`` when the
        objective has them (each at ``clip_grad``), else one clip over everything;
        ``grad_norm`` is the total norm before clipping."""
        s, fabric = self.settings, self.fabric
        groups, clips = self._grad_groups, self._clip_groups if s.clip_grad else None
        if not groups and not clips:
            if not s.clip_grad:
                return {}
            return {
                "grad_norm": fabric.clip_gradients(
                    self.module, self.optimizer, max_norm=s.clip_grad, error_if_nonfinite=False
                )
                .detach()
                .float()
            }
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        fabric.strategy.precision.unscale_gradients(optimizer)  # once (16-bit's loss scale)
        out = {f"grad_norm_{name}": grad_norm(params) for name, params in (groups or {}).items()}
        if clips:
            norms = [
                torch.nn.utils.clip_grad_norm_(params, s.clip_grad, error_if_nonfinite=False)
                for params in clips.values()
            ]
            out["grad_norm"] = torch.stack([n.float() for n in norms]).norm()
        elif s.clip_grad:
            out["grad_norm"] = (
                torch.nn.utils.clip_grad_norm_(
                    fabric.strategy.precision.main_params(optimizer),
                    s.clip_grad,
                    error_if_nonfinite=False,
                )
                .detach()
                .float()
            )
        return {k: v.detach().float() for k, v in out.items()}

    def run(self, resume: bool = False) -> dict:
        """Train to ``settings.steps``; returns the summary (see the module docs)."""
        s, fabric = self.settings, self.fabric
        kept = self._start_log(resume)
        run = _RunState(
            start_step=self.step,
            history=list(kept),
            first=kept[0] if kept else None,  # a resumed run reports the same
            last=kept[-1] if kept else None,
        )  # first loss as an uninterrupted one
        self.objective.train()  # load_model returns eval-mode modules: drop-path must be on
        log_every = self._log_every()
        images_per_step = s.batch_size * s.accumulate * fabric.world_size
        if fabric.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(fabric.device)
        run_start = mark = time.perf_counter()
        interval = _Interval(run_start)
        progress = make_progress() if fabric.is_global_zero else None
        log_file = (
            open(self.files.log, "a")  # noqa: SIM115 - closed in the finally below
            if fabric.is_global_zero
            else None
        )
        loader_iter = iter(self._loader())
        try:
            with _StopFlag() as flag:
                task = None
                if progress is not None:
                    progress.start()
                    task = progress.add_task(
                        s.description, total=s.steps, completed=self.step, info=""
                    )
                while self.step < s.steps:
                    lr, wd = self.schedules.apply(self.optimizer, self.step)
                    terms, waited = self._train_step(loader_iter)
                    run.wait_total += waited
                    self.step += 1
                    interval.add(terms, waited)
                    stop = self._stop_requested(flag)
                    checkpoint = stop or self.step % s.checkpoint_every == 0 or self.step == s.steps
                    halt = False
                    if interval.count == log_every or checkpoint:
                        now = time.perf_counter()
                        record = interval.close(
                            self.step,
                            lr,
                            wd,
                            images_per_step,
                            round(self.elapsed + now - mark, 3),
                            now,
                        )
                        halt = self._record(run, record)
                        checkpoint = checkpoint or halt
                        self._emit(record, log_file, progress, task, lr)
                    if checkpoint:
                        now = time.perf_counter()
                        self.elapsed += now - mark
                        mark = now
                        if self.save_checkpoint() and not stop and not halt:
                            run.stopped_early_at = self.step
                            break
                    if stop:
                        raise Interrupted(
                            f"interrupted at step {self.step}/{s.steps}: checkpoint "
                            f"{self.files.checkpoint}; continue with {opt('resume')}"
                        )
                    if halt:
                        raise RuntimeFailure(
                            f"{run.stalled}; stopped at step {self.step}/"
                            f"{s.steps} ({opt('stop_if_stalled')}), checkpoint "
                            f"{self.files.checkpoint}"
                        )
        finally:
            if progress is not None:
                progress.stop()
            if log_file is not None:
                log_file.close()
            del loader_iter
        run.seconds = max(time.perf_counter() - run_start, 1e-9)
        self.elapsed += time.perf_counter() - mark
        return self._summary(run, resume, images_per_step)

    def _start_log(self, resume: bool) -> list[dict]:
        """Resume from the checkpoint, or say that a fresh run replaces it; a fresh run starts a
        fresh JSONL log (and drops the old plot), a resumed one cuts the log back to the
        checkpoint's step. Returns the records kept (rank 0; none elsewhere)."""
        if resume:
            self.load_checkpoint()
        elif self.fabric.is_global_zero and self.files.checkpoint.exists():
            logger.warning(
                "starting afresh: %s will be replaced (--resume continues it)",
                self.files.checkpoint,
            )
        kept: list[dict] = []
        if self.fabric.is_global_zero:
            self.files.log.parent.mkdir(parents=True, exist_ok=True)
            kept = read_log(self.files.log, upto_step=self.step) if resume else []
            self.files.log.write_text("".join(json.dumps(r) + "\n" for r in kept))
            if not resume and self.files.plot.exists():
                self.files.plot.unlink()
        return kept

    def _record(self, run: _RunState, record: dict) -> bool:
        """Keep a logged record; check the loss is a number and, until the run is found
        stalled, the not-learning rule. Whether the run must halt here (``stop_if_stalled``)."""
        if not math.isfinite(record["loss"]):
            raise RuntimeFailure(
                f"the loss is {record['loss']} at step {self.step}; lower the "
                "learning rate or check the input data"
            )
        run.first = run.first or record
        run.last = record
        run.history.append(record)
        if run.stalled is not None:
            return False
        run.stalled = self._check_stall(run.history)
        return run.stalled is not None and self.settings.stop_if_stalled

    def _emit(self, record: dict, log_file, progress, task, lr: float) -> None:
        """A record to the JSONL log, the trackers and the progress line (rank 0)."""
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            log_record(record)  # to the experiment trackers too
        if progress is not None:
            progress.update(
                task, completed=self.step, info=progress_info(record, lr, progress.console.width)
            )

    def _summary(self, run: _RunState, resume: bool, images_per_step: int) -> dict:
        s, fabric = self.settings, self.fabric
        run_steps = self.step - run.start_step
        checksums = replica_checksums(fabric, self.objective)
        if len(set(checksums)) > 1:
            raise RuntimeFailure(
                f"the {fabric.world_size} model replicas differ after training "
                f"(checksums {checksums}); the distributed set-up is broken"
            )
        first, last = run.first, run.last
        return {
            "steps": s.steps,
            "steps_this_run": run_steps,
            "stopped_early_at": run.stopped_early_at,
            "stalled": run.stalled,
            "resumed_from_step": run.start_step if resume else None,
            "batch_size_per_device": s.batch_size,
            "accumulate": s.accumulate,
            "world_size": fabric.world_size,
            "global_batch": images_per_step,
            "first": first,
            "last": last,
            "first_loss": first["loss"] if first else None,
            "last_loss": last["loss"] if last else None,
            "seconds": round(self.elapsed, 3),
            "images_per_s": run_steps * images_per_step / run.seconds,
            "data_wait_fraction": run.wait_total / run.seconds,
            "peak_memory_bytes": peak_memory_bytes(fabric.device),
            "replica_checksums": checksums,
            "files": {
                "checkpoint": str(self.files.checkpoint),
                "log": str(self.files.log),
                "plot": str(self.files.plot),
            },
        }
