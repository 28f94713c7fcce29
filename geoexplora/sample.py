"""The small real sample bundled with the package (see geoexplora/data/NOTICE)."""

from pathlib import Path


def sample_dir() -> Path:
    return Path(__file__).resolve().parent / "data"


def slovenia_scenes() -> list[Path]:
    """The 5-date Sentinel-2 L1C series of one place (13 bands, 10 m)."""
    return sorted((sample_dir() / "slovenia").glob("S2L1C_*_13band_10m.tif"))


def slovenia_labels() -> Path:
    return sample_dir() / "slovenia" / "LULC.tif"


def s2_tile_crop() -> Path:
    return sample_dir() / "s2-29RKH" / "S2A_29RKH_20200219_L2A_12band_200m_crop.tif"
