"""geoexplora: ExPLoRA for satellite imagery, as a library.

The verbs of the command line are functions taking a typed configuration and returning a typed
result; everything is imported on first use, so ``import geoexplora`` stays light::

    from geoexplora import TileConfig, tile
    chips = tile(TileConfig(inputs=["scene.tif"], output="chips/"))

See ``docs/api.md`` for a whole pipeline in Python.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported lazily by __getattr__)
_API = {
    "tile": "geoexplora.pipelines.tile",
    "TileConfig": "geoexplora.pipelines.tile",
    "TileResult": "geoexplora.pipelines.tile",
    "adapt": "geoexplora.pipelines.adapt",
    "AdaptConfig": "geoexplora.pipelines.adapt",
    "AdaptResult": "geoexplora.results",
    "probe": "geoexplora.pipelines.probe",
    "ProbeConfig": "geoexplora.pipelines.probe",
    "ProbeResult": "geoexplora.results",
    "finetune": "geoexplora.pipelines.finetune",
    "FinetuneConfig": "geoexplora.pipelines.finetune",
    "FinetuneResult": "geoexplora.results",
    "predict": "geoexplora.pipelines.predict",
    "PredictConfig": "geoexplora.pipelines.predict",
    "RasterResult": "geoexplora.results",
    "embed": "geoexplora.pipelines.embed",
    "EmbedConfig": "geoexplora.pipelines.embed",
    "export": "geoexplora.pipelines.export",
    "ExportConfig": "geoexplora.pipelines.export",
    "ExportResult": "geoexplora.results",
    "open_scene": "geoexplora.io.scene",
    "Scene": "geoexplora.io.scene",
    "SceneOptions": "geoexplora.io.scene",
    "load_model": "geoexplora.models.file",
    "UserError": "geoexplora.errors",
    "RuntimeFailure": "geoexplora.errors",
}

__all__ = [  # the names of _API (tests/test_api.py checks that the two agree)
    "AdaptConfig",
    "AdaptResult",
    "EmbedConfig",
    "ExportConfig",
    "ExportResult",
    "FinetuneConfig",
    "FinetuneResult",
    "PredictConfig",
    "ProbeConfig",
    "ProbeResult",
    "RasterResult",
    "RuntimeFailure",
    "Scene",
    "SceneOptions",
    "TileConfig",
    "TileResult",
    "UserError",
    "__version__",
    "adapt",
    "embed",
    "export",
    "finetune",
    "load_model",
    "open_scene",
    "predict",
    "probe",
    "tile",
]

if TYPE_CHECKING:
    from geoexplora.errors import RuntimeFailure, UserError
    from geoexplora.io.scene import Scene, SceneOptions, open_scene
    from geoexplora.models.file import load_model
    from geoexplora.pipelines.adapt import AdaptConfig, adapt
    from geoexplora.pipelines.embed import EmbedConfig, embed
    from geoexplora.pipelines.export import ExportConfig, export
    from geoexplora.pipelines.finetune import FinetuneConfig, finetune
    from geoexplora.pipelines.predict import PredictConfig, predict
    from geoexplora.pipelines.probe import ProbeConfig, probe
    from geoexplora.pipelines.tile import TileConfig, TileResult, tile
    from geoexplora.results import (
        AdaptResult,
        ExportResult,
        FinetuneResult,
        ProbeResult,
        RasterResult,
    )


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'geoexplora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
