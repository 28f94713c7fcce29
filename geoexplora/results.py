"""The verbs' typed results.

Each verb returns a frozen dataclass: typed fields for what a Python caller reads, and
``report``, the whole result document (what ``--json`` prints; its keys are documented per verb
in docs/cli.md). ``to_dict()`` returns that document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Result:
    report: dict = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return self.report


@dataclass(frozen=True)
class AdaptResult(Result):
    """``adapt``: the adapted model file (None for a dry run, which only plans)."""

    output: Path | None = None
    objective: str = ""
    steps: int = 0
    global_batch: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    dry_run: bool = False

    @classmethod
    def from_report(cls, doc: dict) -> AdaptResult:
        dry = bool(doc.get("dry_run"))
        return cls(
            report=doc,
            output=None if dry else Path(doc["output"]),
            objective=doc["objective"],
            steps=doc["steps"],
            global_batch=doc["global_batch"],
            trainable_parameters=doc["parameters"]["trainable"],
            total_parameters=doc["parameters"]["total"],
            first_loss=doc.get("first_loss"),
            last_loss=doc.get("last_loss"),
            dry_run=dry,
        )


@dataclass(frozen=True)
class ProbeScores:
    """One probed model: its best linear head's and its k-NN's test scores."""

    name: str
    path: Path
    linear: dict
    knn: dict


@dataclass(frozen=True)
class ProbeResult(Result):
    """``probe``: the models' scores, in the order they were given."""

    chips: Path = Path()
    task: str = ""
    classes: tuple[str, ...] = ()
    models: tuple[ProbeScores, ...] = ()

    @classmethod
    def from_report(cls, doc: dict) -> ProbeResult:
        return cls(
            report=doc,
            chips=Path(doc["chips"]),
            task=doc["task"],
            classes=tuple(doc["classes"]),
            models=tuple(
                ProbeScores(m["name"], Path(m["model"]), m["linear"], m["knn"])
                for m in doc["models"]
            ),
        )


@dataclass(frozen=True)
class RasterResult(Result):
    """``predict`` / ``embed``: one output raster (or its plan, for a dry run). ``status`` is
    "complete", or "partial" when other shards still have strips to compute."""

    inputs: tuple[str, ...] = ()
    output: Path = Path()
    dry_run: bool = False
    status: str | None = None
    valid_pixels: int | None = None
    outputs: dict = field(default_factory=dict)

    @classmethod
    def from_report(cls, doc: dict, dry_run: bool) -> RasterResult:
        inputs = doc.get("input", doc.get("inputs", []))
        return cls(
            report=doc,
            inputs=tuple(str(p) for p in inputs),
            output=Path(doc["output"]),
            dry_run=dry_run,
            status=doc.get("status"),
            valid_pixels=doc.get("valid_pixels"),
            outputs=dict(doc.get("outputs", {})),
        )


@dataclass(frozen=True)
class FinetuneResult(Result):
    """``finetune``: the task model file and the metrics of its best checkpoint (``monitor`` is
    the validation metric that chose it; ``test`` is None without a test split)."""

    output: Path = Path()
    task: str = ""
    mode: str = ""
    steps: int = 0
    monitor: str = ""
    val: dict | None = None
    test: dict | None = None

    @classmethod
    def from_report(cls, doc: dict) -> FinetuneResult:
        metrics = doc["metrics"]
        return cls(
            report=doc,
            output=Path(doc["output"]),
            task=doc["task"],
            mode=doc["mode"],
            steps=doc["training"]["steps"],
            monitor=metrics["monitor"],
            val=metrics["val"],
            test=metrics["test"],
        )


@dataclass(frozen=True)
class ExportResult(Result):
    """``export``: the written file(s); for ONNX the check against PyTorch."""

    output: Path = Path()
    format: str = ""
    kind: str = ""
    sidecar: Path | None = None
    max_abs_diff: float | None = None

    @classmethod
    def from_report(cls, doc: dict) -> ExportResult:
        check = doc.get("check") or {}
        return cls(
            report=doc,
            output=Path(doc["output"]),
            format=doc["format"],
            kind=doc["kind"],
            sidecar=Path(doc["sidecar"]) if doc.get("sidecar") else None,
            max_abs_diff=check.get("max_abs_diff"),
        )
