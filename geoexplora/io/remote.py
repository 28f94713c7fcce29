"""Rasters named by URI: ``https://``, ``s3://``, ``gs://``, ``az://``, GDAL's ``/vsi...`` paths.

A URI is never turned into a :class:`pathlib.Path` (which folds ``https://`` into ``https:/``):
it becomes a :class:`RemotePath`, which offers what the read path asks of a file (``name``,
``stem``, ``suffix``, ``parent.name``, ``resolve()``) and opens, through ``os.fspath``, as the GDAL
path rasterio would build (``s3://b/k.tif`` -> ``/vsis3/b/k.tif``). Reads stream windows through
HTTP range requests; nothing is downloaded whole. Outputs stay local.

Reading a URI sets GDAL's cloud-read configuration (:data:`CLOUD_DEFAULTS`) as process-wide
defaults (so that worker processes inherit them); a variable already in the environment wins.
Credentials are GDAL's own (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_*``...). See ``docs/cloud.md``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from geoexplora.errors import RuntimeFailure, UserError

# GDAL configuration set for cloud reads unless the environment has the variable already.
CLOUD_DEFAULTS: dict[str, str] = {
    # Opening /vsicurl/.../scene.tif must not list the "folder" (one request per sidecar name).
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Transient HTTP failures (429, 5xx, timeouts) are retried before the read fails.
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    # Keep fetched blocks: a window read twice (overlapping windows, several bands) is fetched once.
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(64 * 1024 * 1024),
    # Neighbouring ranges in one request; HTTP/2 multiplexing where the server offers it.
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    # Multi-block reads through the block cache: the parallel default fetches each block range
    # anew (overlapping windows re-fetched the file ~10 times in predict once GDAL knew it).
    "GDAL_HTTP_MULTIRANGE": "SERIAL",
    "GDAL_HTTP_TIMEOUT": "30",
}

# scheme -> GDAL virtual file system, as rasterio maps them.
_SCHEMES = {
    "http": "vsicurl",
    "https": "vsicurl",
    "ftp": "vsicurl",
    "s3": "vsis3",
    "gs": "vsigs",
    "az": "vsiaz",
    "azure": "vsiaz",
    "adl": "vsiadls",
    "oss": "vsioss",
    "swift": "vsiswift",
    "file": None,
}
_ARCHIVES = {"zip": "vsizip", "tar": "vsitar", "gzip": "vsigzip"}
_URI = re.compile(r"^([a-z][a-z0-9]*(?:\+[a-z][a-z0-9]*)?)://", re.IGNORECASE)


def is_uri(value) -> bool:
    """A URI or GDAL virtual path (``https://``, ``s3://``, ``zip+https://``, ``/vsicurl/...``),
    not a local file name."""
    if isinstance(value, RemotePath):
        return True
    if isinstance(value, Path):
        return False
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if text.startswith("/vsi"):
        return True
    m = _URI.match(text)
    if not m:
        return False
    schemes = m.group(1).lower().split("+")
    return all(s in _SCHEMES or s in _ARCHIVES for s in schemes) and schemes != ["file"]


def to_gdal_path(uri: str) -> str:
    """The GDAL path of a URI: ``https://h/a.tif`` -> ``/vsicurl/https://h/a.tif``,
    ``s3://b/k.tif`` -> ``/vsis3/b/k.tif``, ``zip+https://h/a.zip!/b.tif`` ->
    ``/vsizip/vsicurl/https://h/a.zip/b.tif``; ``/vsi...`` paths and local names as given."""
    if uri.startswith("/vsi"):
        return uri
    m = _URI.match(uri)
    if not m:
        return uri
    schemes = m.group(1).lower().split("+")
    rest = uri[m.end() :]
    archive = None
    if len(schemes) == 2 and schemes[0] in _ARCHIVES:
        archive, scheme = _ARCHIVES[schemes[0]], schemes[1]
    else:
        scheme = schemes[0]
    if scheme == "file":
        inner = rest
    elif _SCHEMES.get(scheme) == "vsicurl":
        inner = f"/vsicurl/{scheme}://{rest}"
    else:
        inner = f"/{_SCHEMES[scheme]}/{rest}"
    if archive:
        inner = f"/{archive}/{inner.lstrip('/')}".replace("!", "")
    return inner


def http_url(uri: str) -> str | None:
    """The plain http(s) URL behind a URI, or None (object-store schemes, archives)."""
    text = uri.removeprefix("/vsicurl/")
    return text if re.match(r"^https?://", text, re.IGNORECASE) else None


def apply_cloud_defaults() -> None:
    """Set :data:`CLOUD_DEFAULTS` in the environment where it has no value (GDAL reads its
    configuration from there, in this process and in the workers it starts)."""
    for key, value in CLOUD_DEFAULTS.items():
        os.environ.setdefault(key, value)


def cloud_settings() -> dict[str, str]:
    """The cloud-read configuration in effect: the defaults, overridden by the environment."""
    return {key: os.environ.get(key, value) for key, value in CLOUD_DEFAULTS.items()}


def cloud_env():
    """A ``rasterio.Env`` with :func:`cloud_settings` (for reading URIs from library code)."""
    import rasterio

    return rasterio.Env(**cloud_settings())


class RemotePath:
    """A raster named by URI, standing in for a ``Path`` on the read path (never for an output).

    ``str()`` is the URI as given; ``os.fspath()`` is its GDAL path (what rasterio opens).
    ``stac``: what a STAC item says of the asset (:class:`geoexplora.io.stac.AssetInfo`), if any.
    """

    __slots__ = ("stac", "uri")

    def __init__(self, uri: str, stac=None):
        self.uri = str(uri)
        self.stac = stac
        apply_cloud_defaults()

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __fspath__(self) -> str:
        return to_gdal_path(self.uri)

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(("remote", self.uri))

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __gt__(self, other) -> bool:
        return str(self) > str(other)

    def __reduce__(self):
        return RemotePath, (self.uri, self.stac)

    @property
    def _key(self) -> PurePosixPath:
        """The URI's path part (no query string, no archive marker) as a pure path."""
        text = self.uri.split("?", 1)[0].replace("!", "")
        m = _URI.match(text)
        return PurePosixPath(text[m.end() :] if m else text)

    name = property(lambda self: self._key.name)
    stem = property(lambda self: self._key.stem)
    suffix = property(lambda self: self._key.suffix)

    @property
    def parent(self) -> RemotePath:
        head, _, _ = self.uri.split("?", 1)[0].rstrip("/").rpartition("/")
        return RemotePath(head)

    def resolve(self) -> RemotePath:
        return self

    absolute = resolve
    expanduser = resolve

    def exists(self) -> bool:  # a URI: told when opened (see read_error)
        return os.path.exists(self.uri) if not is_uri(self.uri) else True

    def is_file(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False


def as_path(value):
    """A name on the read path as a path: a URI -> :class:`RemotePath` (kept as given), else a
    :class:`pathlib.Path`; a path already (either kind) as it is."""
    if isinstance(value, (RemotePath, Path)):
        return value
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return RemotePath(text) if is_uri(text) else Path(text)


def source_name(path) -> str:
    """How a read file is recorded (dataset index, provenance): a URI as given, a local file's
    absolute path."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def refuse_listing(uri: str) -> None:
    """Folders and globs on a URI cannot be listed: a UserError saying so."""
    raise UserError(
        f"{uri}: folders and globs are not supported on URIs; name each file, or a "
        "STAC item or item collection"
    )


def probe_http(url: str, timeout: float = 10.0) -> str | None:
    """Why an http(s) raster cannot be read, found with one 1-byte range request: ``None`` when
    it looks fine, else the cause in words (unreachable, HTTP status, no range support)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = resp.status
            accept = resp.headers.get("Accept-Ranges", "")
    except urllib.error.HTTPError as exc:
        reason = {401: "unauthorized", 403: "forbidden", 404: "not found"}.get(exc.code, exc.reason)
        return f"HTTP {exc.code} {reason}"
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
        return f"host unreachable ({reason})"
    except (TimeoutError, OSError) as exc:
        return f"host unreachable ({exc})"
    if status == 200 and accept.lower() != "bytes":
        return "the server does not support range requests (it sent the whole file)"
    return None


_NETWORK = (
    "timed out",
    "timeout",
    "connection reset",
    "could not resolve",
    "http response code: 5",
    "http error code: 5",
)


def read_error(path, exc: Exception) -> UserError | RuntimeFailure:
    """The one-line error for a URI that GDAL failed to open: the URI and the cause. Bad input
    (unreachable host, 401/403/404, no range support, not a raster) is a UserError; a network
    failure after GDAL's retries (timeouts, 5xx) is a RuntimeFailure."""
    uri = str(path)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "range downloading not supported" in first.lower():
        return UserError(f"{uri}: the server does not support range requests")
    url = http_url(uri)
    cause = probe_http(url) if url else None
    if cause is None:
        if any(k in first.lower() for k in _NETWORK):
            return RuntimeFailure(
                f"{uri}: network failure after "
                f"{cloud_settings()['GDAL_HTTP_MAX_RETRY']} retries ({first})"
            )
        return UserError(f"{uri}: not a readable raster ({first})")
    if cause.startswith("HTTP 5"):
        return RuntimeFailure(
            f"{uri}: {cause} after {cloud_settings()['GDAL_HTTP_MAX_RETRY']} retries"
        )
    return UserError(f"{uri}: {cause}")
