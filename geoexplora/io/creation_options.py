"""GDAL creation options (``--co KEY=VALUE``) checked against the driver that will write them,
before anything is written. GDAL itself only warns about an unknown option or value and then
ignores it (``COMPRESS=BOGUS`` gives an uncompressed file): here it is refused.

The driver's own list (its ``DMD_CREATIONOPTIONLIST`` metadata: names, types, allowed values)
is read from the GDAL library rasterio is built on. rasterio does not expose driver metadata,
and the ``osgeo`` bindings are not a dependency, so the two C functions are called through
``ctypes`` on rasterio's own (already loaded) libgdal; where that library cannot be found the
check is skipped with a debug log line, and GDAL's own warning (through the logger) remains.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from pathlib import Path
from xml.etree import ElementTree

from geoexplora.errors import UserError
from geoexplora.log import logger

GDAL_BOOLEANS = ("YES", "NO", "TRUE", "FALSE", "ON", "OFF")  # GDALValidateOptions' spellings


def _gdal_library_path() -> str | None:
    """The libgdal rasterio loaded: its wheel's bundled copy, else the system's."""
    import rasterio

    site = Path(rasterio.__file__).resolve().parents[1]
    for folder in ("rasterio.libs", "rasterio/.dylibs", "rasterio.libs/.dylibs"):
        found = sorted((site / folder).glob("libgdal*")) if (site / folder).is_dir() else []
        if found:
            return str(found[0])
    return ctypes.util.find_library("gdal")


@functools.cache
def driver_options(driver: str) -> dict[str, dict] | None:
    """``{NAME: {"type": ..., "values": {VALUE or alias: VALUE}, "min": ..., "max": ...}}`` of
    ``driver``'s creation options, or None where GDAL's library cannot be reached."""
    path = _gdal_library_path()
    if path is None:
        logger.debug("GDAL library not found: --co options are not checked")
        return None
    lib = ctypes.CDLL(path)
    lib.GDALGetDriverByName.restype = ctypes.c_void_p
    lib.GDALGetDriverByName.argtypes = [ctypes.c_char_p]
    lib.GDALGetMetadataItem.restype = ctypes.c_char_p
    lib.GDALGetMetadataItem.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.GDALAllRegister()
    handle = lib.GDALGetDriverByName(driver.encode())
    xml = lib.GDALGetMetadataItem(handle, b"DMD_CREATIONOPTIONLIST", None) if handle else None
    if not xml:
        raise RuntimeError(f"GDAL has no creation option list for its {driver} driver")
    out = {}
    for node in ElementTree.fromstring(xml.decode()).iter("Option"):
        values = {}
        for value in node.iter("Value"):
            name = (value.text or "").strip().upper()
            values[name] = name
            alias = value.get("alias")
            if alias:
                values[alias.upper()] = name
        spec = {
            "type": node.get("type", "string"),
            "values": values,
            "min": node.get("min"),
            "max": node.get("max"),
        }
        for option in [node.get("name"), *(node.get("alias") or "").split(",")]:
            if option:
                out[option.strip().upper()] = spec
    return out


def _number(text: str, kind: str) -> float | None:
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_creation_options(options: dict[str, str] | None, driver: str) -> None:
    """Refuse a creation option ``driver`` does not have, or a value it does not take (a value
    outside a list, a number that is not one or is out of range, a boolean that is not)."""
    if not options:
        return
    known = driver_options(driver)
    if known is None:
        return
    for key, value in options.items():
        given = f"{key}={value}"
        spec = known.get(key.upper())
        if spec is None:
            raise UserError(
                f"{given}: GDAL's {driver} driver has no creation option {key} "
                f"(see gdalinfo --format {driver})",
                option="creation_options",
            )
        kind, text = spec["type"], value.strip()
        if kind == "string-select" and spec["values"] and text.upper() not in spec["values"]:
            choices = ", ".join(sorted(set(spec["values"].values())))
            raise UserError(
                f"{given}: GDAL's {driver} driver takes {key} one of {choices}",
                option="creation_options",
            )
        if kind == "boolean" and text.upper() not in GDAL_BOOLEANS:
            raise UserError(
                f"{given}: {key} is a yes/no option ({', '.join(GDAL_BOOLEANS)})",
                option="creation_options",
            )
        if kind in ("int", "integer", "float"):
            kind = "float" if kind == "float" else "int"
            number = _number(text, kind)
            if number is None:
                what = "a number" if kind == "float" else "an integer"
                raise UserError(f"{given}: {key} takes {what}", option="creation_options")
            low, high = (_number(spec[k], "float") if spec[k] else None for k in ("min", "max"))
            if (low is not None and number < low) or (high is not None and number > high):
                raise UserError(
                    f"{given}: {key} takes {spec['min'] or '...'} to {spec['max'] or '...'}",
                    option="creation_options",
                )
