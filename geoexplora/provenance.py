"""What a written file records about where it came from: content digests and the versions of the
software that made it. One digest (SHA-256, streamed) and one list of packages, for model files,
rasters' sidecars, feature caches and run fingerprints alike."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

# The packages whose versions decide what a run produces.
RECORDED_PACKAGES = ("geoexplora", "torch", "timm", "peft", "torchgeo", "rasterio", "numpy")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time (memory stays bounded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Python's, GDAL's and :data:`RECORDED_PACKAGES`' versions; a package that is not installed
    (geoexplora run from a source tree) is left out rather than guessed."""
    import rasterio

    out = {"python": platform.python_version(), "gdal": rasterio.__gdal_version__}
    for package in RECORDED_PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed: nothing to record
    return out
