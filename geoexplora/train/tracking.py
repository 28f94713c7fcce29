"""Experiment trackers through Lightning's loggers: ``--logger csv|tensorboard|mlflow|wandb``.

The CLI opens them around a training verb (``tracking(...)``, a context), and the training loop
hands each record it writes to its JSONL log to ``log_record`` as well, so trackers see exactly
the logged values (every loss term, lr, weight decay, throughput). The resolved options are
logged as hyper-parameters. Each tracker is an optional extra; a missing one is a one-line
install hint.
"""

from __future__ import annotations

import contextlib
import importlib.util
from contextvars import ContextVar
from pathlib import Path

from geoexplora import defaults
from geoexplora.errors import UserError, opt

# tracker -> (module it needs, the extra that installs it)
TRACKERS = {
    "csv": (None, None),
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}

_active: ContextVar[tuple] = ContextVar("geoexplora_trackers", default=())


def _open(name: str, run_name: str, log_dir: Path):
    """One tracker; each writes under its own folder of ``log_dir`` (``tensorboard --logdir
    LOG_DIR/tensorboard``), runs of one name numbered version_0, version_1..."""
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=log_dir / "csv", name=run_name)
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(
            save_dir=log_dir / "tensorboard", name=run_name, default_hp_metric=False
        )
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        # MLflow 3 refuses its plain-file store; a SQLite file is its local, offline backend
        log_dir.mkdir(parents=True, exist_ok=True)
        return MLFlowLogger(
            experiment_name=defaults.TRACKER_PROJECT,
            run_name=run_name,
            tracking_uri=f"sqlite:///{(log_dir / 'mlflow.db').resolve()}",
            artifact_location=(log_dir / "mlartifacts").resolve().as_uri(),
        )
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(name=run_name, save_dir=str(log_dir), project=defaults.TRACKER_PROJECT)


def open_loggers(names: list[str], run_name: str, log_dir: Path) -> list:
    """Lightning loggers for ``names``; every name is checked before any is opened."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{opt('logger')} {name}: not one of {', '.join(TRACKERS)}")
        module, extra = TRACKERS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(
                f"{opt('logger')} {name} needs the {module} package: "
                f"pip install 'geoexplora[{extra}]'"
            )
    return [_open(name, run_name, Path(log_dir)) for name in dict.fromkeys(names)]


def _hyperparameters(config: dict) -> dict:
    """Options as trackers take them: numbers, strings and booleans; the rest as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


@contextlib.contextmanager
def tracking(names: list[str], run_name: str, log_dir: Path, config: dict):
    """While the block runs, ``log_record`` also goes to these trackers."""
    loggers = open_loggers(names, run_name, log_dir) if names else []
    for tracker in loggers:
        tracker.log_hyperparams(_hyperparameters(config))
    token = _active.set(tuple(loggers))
    status = "failed"
    try:
        yield loggers
        status = "success"
    finally:
        _active.reset(token)
        for tracker in loggers:
            tracker.finalize(status)
            if type(tracker).__name__ == "WandbLogger":  # its finalize leaves the run open
                tracker.experiment.finish(exit_code=0 if status == "success" else 1)


def log_images(paths: list[Path], step: int = 0) -> None:
    """The run's PNGs (loss curves, confusion matrix) as images, named by their file names."""
    loggers = _active.get()
    if not loggers or not paths:
        return
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    for tracker in loggers:
        for path in paths:
            if isinstance(tracker, TensorBoardLogger):
                import matplotlib.image

                pixels = matplotlib.image.imread(path)[..., :3]  # RGB floats in 0-1
                tracker.experiment.add_image(path.name, pixels, step, dataformats="HWC")
            elif isinstance(tracker, MLFlowLogger):
                tracker.experiment.log_artifact(tracker.run_id, str(path), "images")
            elif isinstance(tracker, WandbLogger):
                tracker.log_image(key=path.name, images=[str(path)], step=step)
            # csv: the PNGs already lie next to the output


def log_table(key: str, rows: list[dict], step: int = 0) -> None:
    """A result table (probe's scores, one row a model) to the active trackers: each number as a
    metric ``KEY/ROW/COLUMN`` (rows named by their first column), and the whole table where the
    tracker shows tables (TensorBoard: markdown text; MLflow: a JSON artifact; W&B: a table)."""
    loggers = _active.get()
    if not loggers or not rows:
        return
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    columns = list(rows[0])
    label = columns[0]
    metrics = {
        f"{key}/{row[label]}/{column}": float(value)
        for row in rows
        for column, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for tracker in loggers:
        tracker.log_metrics(metrics, step=step)
        if isinstance(tracker, TensorBoardLogger):
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
            tracker.experiment.add_text(key, "\n".join(lines), step)
        elif isinstance(tracker, MLFlowLogger):
            tracker.experiment.log_dict(
                tracker.run_id, {"columns": columns, "rows": rows}, f"{key}.json"
            )
        elif isinstance(tracker, WandbLogger):
            tracker.log_table(
                key=key,
                columns=columns,
                data=[[row[c] for c in columns] for row in rows],
                step=step,
            )


def log_record(record: dict) -> None:
    """One training-log record (``step`` and numbers) to the active trackers."""
    loggers = _active.get()
    if loggers:
        metrics = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for tracker in loggers:
            tracker.log_metrics(metrics, step=record["step"])
