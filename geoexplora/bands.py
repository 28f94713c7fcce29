"""Sensors and bands: the one source of truth for band identity.

Band identity is ``(sensor, name)`` -> centre wavelength, width, native GSD. The same bare name in
two sensors is two different bands (Landsat-8 ``B5`` is NIR, Landsat-7 ``B5`` is SWIR 1), so a bare
name is only resolved against one sensor at a time.

Canonical units
---------------
Every reader converts pixel values to one convention before anything else sees them:
**surface/TOA reflectance x 10 000** (the unit of the statistics tables below), as float32.

* Sentinel-2 digital numbers: ``reflectance = (DN - offset) / 10000``; ``offset`` is 1000 for
  products of processing baseline 04.00 and later (acquired from 2022-01-25 on), else 0
  (``--s2-offset auto|0|1000``; ``auto`` decides by acquisition date, or a ``BOA_ADD_OFFSET`` /
  ``RADIO_ADD_OFFSET`` tag when the file carries one). Canonical = DN - offset.
* Reflectance stored as 0-1 floats (float dtype with a 99th percentile below 2): canonical =
  value x 10000.
* Landsat Collection-2 Level-2 surface reflectance (``--landsat-c2``): reflectance =
  DN x 2.75e-5 - 0.2; canonical = reflectance x 10000.
* Generic RGB / RGB-NIR (aerial, 8-bit or 16-bit): values are kept as they are; statistics are
  computed from the data.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass

from geoexplora.errors import UserError, opt


@dataclass(frozen=True)
class Band:
    sensor: str
    name: str
    center_nm: float
    width_nm: float
    gsd_m: float
    common_name: str
    aliases: tuple[str, ...] = ()
    mean: float | None = None  # fall-back statistics, canonical units
    std: float | None = None

    @property
    def key(self) -> str:
        return f"{self.sensor}:{self.name}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d


def _b(sensor, name, center, width, gsd, common, aliases=(), mean=None, std=None):
    return Band(sensor, name, center, width, gsd, common, tuple(aliases), mean, std)


# Fall-back mean/std: SSL4EO-S12 L1C (Sentinel-2), see docs/bands.md. Landsat fall-backs borrow the
# Sentinel-2 band of the nearest wavelength (same physical quantity, reflectance x 10000).
_S2 = [
    _b("sentinel2", "B1", 442.7, 20, 60, "coastal", ["B01", "coastal"], 1605.6, 786.8),
    _b("sentinel2", "B2", 492.7, 65, 10, "blue", ["B02", "blue"], 1390.8, 850.3),
    _b("sentinel2", "B3", 559.8, 35, 10, "green", ["B03", "green"], 1314.9, 875.1),
    _b("sentinel2", "B4", 664.6, 30, 10, "red", ["B04", "red"], 1363.5, 1138.8),
    _b("sentinel2", "B5", 704.1, 15, 20, "rededge1", ["B05", "rededge1", "re1"], 1549.4, 1122.2),
    _b("sentinel2", "B6", 740.5, 15, 20, "rededge2", ["B06", "rededge2", "re2"], 2091.7, 1161.6),
    _b("sentinel2", "B7", 782.8, 20, 20, "rededge3", ["B07", "rededge3", "re3"], 2371.7, 1274.4),
    _b("sentinel2", "B8", 832.8, 115, 10, "nir", ["B08", "nir"], 2299.9, 1248.4),
    _b("sentinel2", "B8A", 864.7, 20, 20, "nir08", ["B08A", "nir08", "narrow_nir"], 2560.3, 1345.5),
    _b("sentinel2", "B9", 945.1, 20, 60, "watervapour", ["B09", "water_vapour"], 830.1, 577.3),
    _b("sentinel2", "B10", 1373.5, 30, 60, "cirrus", ["cirrus"], 22.1, 51.2),
    _b("sentinel2", "B11", 1613.7, 90, 20, "swir16", ["swir1", "swir16"], 2177.1, 1336.1),
    _b("sentinel2", "B12", 2202.4, 180, 20, "swir22", ["swir2", "swir22"], 1524.1, 1136.5),
]

_L8 = [
    _b("landsat8", "B1", 443, 20, 30, "coastal", ["B01", "coastal"], 1605.6, 786.8),
    _b("landsat8", "B2", 482, 60, 30, "blue", ["B02", "blue"], 1390.8, 850.3),
    _b("landsat8", "B3", 562, 60, 30, "green", ["B03", "green"], 1314.9, 875.1),
    _b("landsat8", "B4", 655, 30, 30, "red", ["B04", "red"], 1363.5, 1138.8),
    _b("landsat8", "B5", 865, 30, 30, "nir", ["B05", "nir", "nir08"], 2560.3, 1345.5),
    _b("landsat8", "B6", 1610, 80, 30, "swir16", ["B06", "swir1", "swir16"], 2177.1, 1336.1),
    _b("landsat8", "B7", 2200, 180, 30, "swir22", ["B07", "swir2", "swir22"], 1524.1, 1136.5),
    _b("landsat8", "B8", 590, 180, 15, "pan", ["B08", "pan"], 1339.0, 860.0),
    _b("landsat8", "B9", 1370, 20, 30, "cirrus", ["B09", "cirrus"], 22.1, 51.2),
]


def _tm_like(sensor: str) -> list[Band]:
    """Landsat 4/5 TM and 7 ETM+ share band numbering (B6 thermal is not a reflectance band)."""
    return [
        _b(sensor, "B1", 485, 70, 30, "blue", ["B01", "blue"], 1390.8, 850.3),
        _b(sensor, "B2", 560, 80, 30, "green", ["B02", "green"], 1314.9, 875.1),
        _b(sensor, "B3", 660, 60, 30, "red", ["B03", "red"], 1363.5, 1138.8),
        _b(sensor, "B4", 835, 130, 30, "nir", ["B04", "nir", "nir08"], 2299.9, 1248.4),
        _b(sensor, "B5", 1650, 200, 30, "swir16", ["B05", "swir1", "swir16"], 2177.1, 1336.1),
        _b(sensor, "B7", 2215, 270, 30, "swir22", ["B07", "swir2", "swir22"], 1524.1, 1136.5),
    ]


_L7 = [*_tm_like("landsat7"), _b("landsat7", "B8", 710, 380, 15, "pan", ["B08", "pan"])]

# Generic aerial imagery (NAIP-like): 8- or 16-bit DNs, statistics always computed from data.
_RGB = [
    _b("rgb", "red", 640, 100, 1, "red", ["R"]),
    _b("rgb", "green", 550, 100, 1, "green", ["G"]),
    _b("rgb", "blue", 470, 100, 1, "blue", ["B"]),
]
_RGBN = [
    _b("rgbn", "red", 640, 100, 1, "red", ["R"]),
    _b("rgbn", "green", 550, 100, 1, "green", ["G"]),
    _b("rgbn", "blue", 470, 100, 1, "blue", ["B"]),
    _b("rgbn", "nir", 840, 100, 1, "nir", ["N"]),
]

SENSORS: dict[str, tuple[Band, ...]] = {
    "sentinel2": tuple(_S2),
    "landsat8": tuple(_L8),
    "landsat9": tuple(
        Band(**{**asdict(b), "sensor": "landsat9", "aliases": b.aliases}) for b in _L8
    ),
    "landsat7": tuple(_L7),
    "landsat5": tuple(_tm_like("landsat5")),
    "landsat4": tuple(_tm_like("landsat4")),
    "rgb": tuple(_RGB),
    "rgbn": tuple(_RGBN),
}

SENSOR_ALIASES = {
    "s2": "sentinel2",
    "sentinel-2": "sentinel2",
    "sentinel_2": "sentinel2",
    "msi": "sentinel2",
    "l8": "landsat8",
    "landsat-8": "landsat8",
    "oli": "landsat8",
    "l9": "landsat9",
    "landsat-9": "landsat9",
    "l7": "landsat7",
    "landsat-7": "landsat7",
    "etm": "landsat7",
    "etm+": "landsat7",
    "l5": "landsat5",
    "landsat-5": "landsat5",
    "tm": "landsat5",
    "l4": "landsat4",
    "landsat-4": "landsat4",
    "aerial": "rgb",
    "naip": "rgbn",
    "rgb-nir": "rgbn",
    "rgbnir": "rgbn",
}

# Reference wavelengths of the band-aware patch embedding's kernel bank: the 13 Sentinel-2 centres.
REFERENCE_WAVELENGTHS_NM: tuple[float, ...] = tuple(b.center_nm for b in _S2)

# The source RGB models' channel order (timm: R, G, B) and the wavelengths they stand for.
RGB_WAVELENGTHS_NM: tuple[float, float, float] = (664.6, 559.8, 492.7)

# SatMAE / ExPLoRA multispectral band groups (Sentinel-2 names).
DEFAULT_SPECTRAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("B2", "B3", "B4", "B8"),
    ("B5", "B6", "B7", "B8A"),
    ("B11", "B12"),
)

# The date after which Sentinel-2 products carry the +1000 DN offset (processing baseline 04.00).
S2_OFFSET_FROM = "2022-01-25"
S2_OFFSET_DN = 1000
LANDSAT_C2_SCALE = 2.75e-5
LANDSAT_C2_OFFSET = -0.2


def _norm(token: str) -> str:
    return token.strip().lower().replace("-", "").replace("_", "")


def canonical_sensor(name: str) -> str:
    key = name.strip().lower()
    key = SENSOR_ALIASES.get(key, key)
    if key not in SENSORS:
        raise UserError(f"unknown sensor '{name}'; known: {', '.join(SENSORS)}")
    return key


def _canonical_band_name(token: str) -> str:
    """'B02' -> 'B2', 'B08A' -> 'B8A', 'b8a' -> 'B8A'; other tokens are returned normalised."""
    m = re.fullmatch(r"b0*(\d+)(a?)", _norm(token))
    if m:
        return f"B{int(m.group(1))}{m.group(2).upper()}"
    return _norm(token)


def find_band(sensor: str, token: str) -> Band | None:
    """The band of ``sensor`` that ``token`` names (name, zero-padded name or alias), or None."""
    sensor = canonical_sensor(sensor)
    want = _canonical_band_name(token)
    for band in SENSORS[sensor]:
        names = {_canonical_band_name(band.name)} | {_canonical_band_name(a) for a in band.aliases}
        if want in names:
            return band
    return None


def get_band(sensor: str, token: str) -> Band:
    band = find_band(sensor, token)
    if band is None:
        names = ", ".join(b.name for b in SENSORS[canonical_sensor(sensor)])
        raise UserError(f"band '{token}' is not a {canonical_sensor(sensor)} band; it has: {names}")
    return band


def band_from_key(key: str) -> Band:
    """Band from its ``sensor:name`` key (as stored in datasets and model files)."""
    sensor, _, name = key.partition(":")
    return get_band(sensor, name)


def parse_band_list(text: str | None) -> list[str] | None:
    """``"B2,B3, B4"`` -> ``["B2", "B3", "B4"]``; None or empty -> None."""
    if text is None or not text.strip():
        return None
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise UserError(f"{opt('bands')} '{text}' has an empty entry")
    seen: dict[str, str] = {}
    for t in items:
        canonical = _canonical_band_name(t)
        if canonical in seen:
            raise UserError(
                f"{opt('bands')} '{text}' names {seen[canonical]} twice"
                + ("" if t == seen[canonical] else f" (as {t})")
                + "; give each band once"
            )
        seen[canonical] = t
    return items


def check_distinct(tokens: list[str], bands: list[Band], option: str = "--bands") -> None:
    """Refuse a band list that names one band twice, also through an alias (``B2,blue``): a
    model or dataset with a repeated band is never what was meant."""
    first: dict[str, str] = {}
    for token, band in zip(tokens, bands):
        if band.key in first:
            raise UserError(
                f"{option} names {band.key} twice ({first[band.key]} and {token}); "
                "give each band once"
            )
        first[band.key] = token


def interpolation_weights(
    wavelength_nm: float, nodes_nm: tuple[float, ...] = REFERENCE_WAVELENGTHS_NM
) -> list[float]:
    """Piecewise-linear weights over the kernel-bank nodes in log-wavelength.

    A band on a node takes that node; a band between two nodes is split between them; a band
    outside the range takes the nearest end node. Weights sum to 1.
    """
    logs = [math.log(n) for n in nodes_nm]
    order = sorted(range(len(nodes_nm)), key=lambda i: logs[i])
    x = math.log(wavelength_nm)
    w = [0.0] * len(nodes_nm)
    if x <= logs[order[0]]:
        w[order[0]] = 1.0
        return w
    if x >= logs[order[-1]]:
        w[order[-1]] = 1.0
        return w
    for lo, hi in itertools.pairwise(order):
        if logs[lo] <= x <= logs[hi]:
            t = (x - logs[lo]) / (logs[hi] - logs[lo])
            w[lo] += 1.0 - t
            w[hi] += t
            return w
    raise AssertionError("unreachable: wavelength inside node range")
