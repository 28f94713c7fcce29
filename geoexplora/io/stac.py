"""STAC items as inputs: an Item or ItemCollection (a local JSON file or a URL), or the items a
STAC API search returns (pystac-client), each one place whose files are its band assets.

An asset is a band when it is a single-band raster (GeoTIFF/COG, JP2, VRT) that names a band of
the item's sensor, tried in this order: its ``eo:bands`` (or STAC 1.1 ``bands``) ``name``, a band
token in that name (``SR_B4``: ``B4``), the asset key (``B04``), then the ``common_name``
(``red``). The sensor comes from the item's ``platform``/``constellation`` (``sentinel-2b``,
``landsat-9``) or its collection's id. A band offered twice (``red`` as COG and as JP2) is read
from the COG. Units, into canonical reflectance x 10 000:

- Sentinel-2: ``earthsearch:boa_offset_applied`` true -> no offset; else
  ``s2:processing_baseline`` >= 04.00 -> -1000; else the asset's ``raster:bands`` offset; else the
  date rule of :mod:`geoexplora.bands`. An explicit ``s2_offset`` (0 or 1000) wins.
- Landsat Collection 2 (and others): ``raster:bands`` ``scale``/``offset`` (x 10 000).

The item's ``datetime`` (or ``start_datetime``) is the date of its files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from geoexplora import bands as B
from geoexplora.errors import RuntimeFailure, UserError
from geoexplora.io.remote import RemotePath, http_url, is_uri

STAC_SUFFIXES = (".json", ".geojson")
_RASTER_TYPES = ("image/tiff", "image/jp2", "application/x-gdal-vrt", "image/vnd.stac.geotiff")
_RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")
_SKIP_ROLES = {"thumbnail", "overview", "metadata", "visual"}
_TOKEN = re.compile(r"(?:^|[_\-.])(B0?\d{1,2}A?)$", re.IGNORECASE)
_PLATFORMS = (
    (re.compile(r"sentinel[-_ ]?2"), "sentinel2"),
    (re.compile(r"landsat[-_ ]?0?9"), "landsat9"),
    (re.compile(r"landsat[-_ ]?0?8"), "landsat8"),
    (re.compile(r"landsat[-_ ]?0?7"), "landsat7"),
    (re.compile(r"landsat[-_ ]?0?5"), "landsat5"),
    (re.compile(r"landsat[-_ ]?0?4"), "landsat4"),
    (re.compile(r"naip"), "rgbn"),
)


@dataclass(frozen=True)
class AssetInfo:
    """What a STAC item says of one band asset."""

    item: str  # the item's id (and collection): its place
    key: str  # the asset key
    band: B.Band
    date: str | None
    scale: float | None = None  # raster:bands
    offset: float | None = None
    boa_offset_applied: bool | None = None  # earthsearch:boa_offset_applied
    processing_baseline: str | None = None  # s2:processing_baseline

    @property
    def sensor(self) -> str:
        return self.band.sensor

    def conversion(self, s2_offset: str = "auto") -> tuple[float, float] | None:
        """``(scale, add)`` to canonical units from the item's metadata; None when it says
        nothing (the file-based rules then apply)."""
        if self.sensor == "sentinel2":
            if s2_offset in ("0", "1000"):
                return 1.0, -float(s2_offset)
            if self.boa_offset_applied is True:
                return 1.0, 0.0
            if self.processing_baseline:
                try:
                    baseline = float(self.processing_baseline)
                except ValueError:
                    baseline = None
                if baseline is not None:
                    return 1.0, -float(B.S2_OFFSET_DN) if baseline >= 4.0 else 0.0
        if self.scale is not None or self.offset is not None:
            return (self.scale if self.scale is not None else 1.0) * 1e4, (self.offset or 0.0) * 1e4
        return None

    def describe(self, href: str) -> dict:
        conv = self.conversion()
        return {
            "asset": self.key,
            "href": href,
            "band": self.band.name,
            "key": self.band.key,
            "common_name": self.band.common_name,
            "center_nm": self.band.center_nm,
            "date": self.date,
            "scale": conv[0] if conv else None,
            "add": conv[1] if conv else None,
        }


def is_stac_input(value) -> bool:
    """A name that is a STAC JSON document (by its suffix), local or remote."""
    if isinstance(value, dict):
        return True
    text = str(value).split("?", 1)[0]
    return text.lower().endswith(STAC_SUFFIXES)


def read_json(source: str) -> dict:
    """A JSON document from a local file or an http(s) URL; UserError naming it."""
    url = http_url(source)
    if url is not None:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise UserError(f"{source}: HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
            raise UserError(f"{source}: host unreachable ({reason})") from exc
        except (TimeoutError, OSError) as exc:
            raise RuntimeFailure(f"{source}: network failure ({exc})") from exc
    elif is_uri(source):
        raise UserError(f"{source}: STAC documents are read from local files or http(s) URLs")
    else:
        try:
            raw = Path(source).read_bytes()
        except FileNotFoundError as exc:
            raise UserError(f"{source}: no such file") from exc
        except OSError as exc:
            raise UserError(f"{source}: {exc.strerror or exc}") from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UserError(f"{source}: not JSON ({exc})") from exc


def load_items(source) -> list[tuple[dict, str]]:
    """A STAC Item or ItemCollection (file, URL or parsed dict) -> ``[(item, base href)]``;
    UserError when it is neither."""
    doc = source if isinstance(source, dict) else read_json(str(source))
    where = _self_href(doc) or ("" if isinstance(source, dict) else str(source))
    name = where or "STAC document"
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "Feature" and "assets" in doc:
        return [(doc, _self_href(doc) or where)]
    if kind == "FeatureCollection":
        items = [f for f in doc.get("features", []) if isinstance(f, dict) and "assets" in f]
        if not items:
            raise UserError(f"{name}: the item collection holds no STAC items")
        return [(item, _self_href(item) or where) for item in items]
    raise UserError(f"{name}: not a STAC Item or ItemCollection (type {kind!r})")


def _self_href(doc: dict) -> str | None:
    for link in doc.get("links", []) if isinstance(doc, dict) else []:
        if isinstance(link, dict) and link.get("rel") == "self" and link.get("href"):
            return link["href"]
    return None


def item_sensor(item: dict) -> str | None:
    """The registry's sensor of an item, from its platform, constellation or collection."""
    props = item.get("properties", {})
    for text in (props.get("platform"), props.get("constellation"), item.get("collection")):
        if not text:
            continue
        low = str(text).lower()
        for pattern, sensor in _PLATFORMS:
            if pattern.search(low):
                return sensor
    return None


def _asset_bands(asset: dict) -> list[dict]:
    bands = asset.get("eo:bands") or asset.get("bands") or []
    return [b for b in bands if isinstance(b, dict)]


def _is_raster(key: str, asset: dict) -> bool:
    kind = str(asset.get("type", "")).lower()
    href = str(asset.get("href", "")).split("?", 1)[0].lower()
    if set(asset.get("roles") or []) & _SKIP_ROLES:
        return False
    return any(t in kind for t in _RASTER_TYPES) or (not kind and href.endswith(_RASTER_SUFFIXES))


def _candidates(key: str, asset: dict) -> list[str]:
    out = []
    for band in _asset_bands(asset)[:1]:
        name = band.get("name")
        if name:
            out.append(str(name))
            token = _TOKEN.search(str(name))
            if token:
                out.append(token.group(1))
    out.append(key)
    token = _TOKEN.search(key)
    if token:
        out.append(token.group(1))
    for band in _asset_bands(asset)[:1]:
        common = band.get("common_name") or band.get("eo:common_name")
        if common:
            out.append(str(common))
    return out


def item_date(item: dict) -> str | None:
    from geoexplora.io.scene import parse_date

    props = item.get("properties", {})
    return parse_date(props.get("datetime") or props.get("start_datetime"))


def band_assets(item: dict, base: str = "") -> list[RemotePath]:
    """The item's band assets as paths carrying their :class:`AssetInfo` (``.stac``), in the
    item's asset order; UserError when the item has no raster band assets."""
    item_id = str(item.get("id", "?"))
    place = f"{item.get('collection') or ''}/{item_id}"
    sensor = item_sensor(item)
    props = item.get("properties", {})
    date = item_date(item)
    chosen: dict[str, tuple[RemotePath, bool]] = {}  # band key -> (path, is COG)
    rasters = 0
    for key, asset in (item.get("assets") or {}).items():
        if not isinstance(asset, dict) or not asset.get("href") or not _is_raster(key, asset):
            continue
        rasters += 1
        if len(_asset_bands(asset)) > 1 or sensor is None:
            continue
        band = next(
            (b for b in (B.find_band(sensor, c) for c in _candidates(key, asset)) if b), None
        )
        if band is None:
            continue
        raster = (asset.get("raster:bands") or [{}])[0] if asset.get("raster:bands") else {}
        info = AssetInfo(
            item=place,
            key=key,
            band=band,
            date=date,
            scale=_number(raster.get("scale")),
            offset=_number(raster.get("offset")),
            boa_offset_applied=props.get("earthsearch:boa_offset_applied"),
            processing_baseline=props.get("s2:processing_baseline"),
        )
        path = RemotePath(_resolve_href(asset["href"], base), stac=info)
        cog = "jp2" not in str(asset.get("type", "")).lower() and path.suffix != ".jp2"
        if band.key not in chosen or (cog and not chosen[band.key][1]):
            chosen[band.key] = (path, cog)
    if not chosen:
        why = (
            "its assets are not rasters"
            if not rasters
            else "its platform/constellation/collection names no known sensor"
            if sensor is None
            else "no asset names a band of " + sensor
        )
        raise UserError(f"STAC item {item_id}: no band assets ({why})")
    return [p for p, _ in chosen.values()]


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _resolve_href(href: str, base: str) -> str:
    """An asset href made absolute against its item's location (a URL or a local file)."""
    if is_uri(href) or os.path.isabs(href) or not base:
        return href
    if http_url(base):
        return urljoin(base, href)
    return str(Path(base).resolve().parent / href)


def search(
    url: str,
    collections: list[str] | None = None,
    bbox: list[float] | None = None,
    datetime: str | None = None,
    max_items: int = 10,
) -> list[dict]:
    """The items a STAC API search returns (pystac-client), as dicts; UserError when it returns
    none or the API cannot be reached."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    try:
        client = Client.open(url)
        found = client.search(
            collections=collections or None, bbox=bbox, datetime=datetime, max_items=max_items
        )
        items = [item.to_dict() for item in found.items()]
    except APIError as exc:
        raise UserError(f"{url}: STAC search failed ({str(exc).splitlines()[0][:200]})") from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise UserError(f"{url}: STAC API unreachable ({type(exc).__name__})") from exc
    if not items:
        what = ", ".join(
            f"{k} {v}"
            for k, v in (("collections", collections), ("bbox", bbox), ("datetime", datetime))
            if v
        )
        raise UserError(f"{url}: the STAC search returned no items ({what or 'no filters'})")
    for item in items:  # the search is where these items were found
        item.setdefault("links", []).append({"rel": "via", "href": url})
    return items


def parse_bbox(text: str | None) -> list[float] | None:
    """``W,S,E,N`` (lon/lat) -> four floats; UserError naming the option."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise UserError(f"'{text}' is not W,S,E,N numbers", option="bbox") from exc
    if len(values) != 4 or values[0] > values[2] or values[1] > values[3]:
        raise UserError(f"'{text}' is not W,S,E,N (west <= east, south <= north)", option="bbox")
    return values


def describe_stac(source) -> dict:
    """``info ITEM.json``: each item's sensor, date and band mapping (asset -> band)."""
    items = []
    for item, base in load_items(source):
        paths = band_assets(item, base)
        items.append(
            {
                "id": item.get("id"),
                "collection": item.get("collection"),
                "sensor": item_sensor(item),
                "date": item_date(item),
                "bbox": item.get("bbox"),
                "bands": [p.stac.describe(str(p)) for p in paths],
            }
        )
    return {"path": str(source), "kind": "stac", "items": items}
