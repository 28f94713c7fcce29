"""Rasters named by URI (issue 16): read through a loopback HTTP server honouring Range requests,
serving a real COG made from the bundled Slovenia sample; no internet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli
from factories import make_model
from loopback import RangeServer
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoexplora.errors import UserError
from geoexplora.io import remote
from geoexplora.io.inputs import collect_inputs
from geoexplora.io.remote import RemotePath, as_path, is_uri, to_gdal_path
from geoexplora.io.scene import open_scene

SAMPLE = Path(__file__).resolve().parents[1] / "geoexplora/data/slovenia"
NAME = "S2A_MSIL1C_20150711_scene.tif"


def make_cog(path: Path, size: int = 512, block: int = 128) -> Path:
    """A 4-band (B2, B3, B4, B8) uint16 COG from the real Slovenia scene, resampled to size."""
    with rasterio.open(SAMPLE / "S2L1C_2015-07-11_13band_10m.tif") as src:
        data = src.read([2, 3, 4, 8], out_shape=(4, size, size), resampling=Resampling.bilinear)
        transform = src.transform * src.transform.scale(src.width / size, src.height / size)
        crs = src.crs
    dn = np.clip(np.nan_to_num(data) * 1e4, 1, 65535).astype("uint16")
    with rasterio.open(
        path,
        "w",
        driver="COG",
        width=size,
        height=size,
        count=4,
        dtype="uint16",
        crs=crs,
        transform=transform,
        blocksize=block,
        compress="deflate",
        predictor=2,
    ) as dst:
        dst.write(dn)
        dst.descriptions = ("B02", "B03", "B04", "B08")
        dst.update_tags(ACQUISITION="2015-07-11")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    make_cog(root / NAME)
    with RangeServer(root) as srv:
        yield srv, root


def test_uri_helpers_map_schemes_as_rasterio_does():
    assert to_gdal_path("https://h.org/a/b.tif") == "/vsicurl/https://h.org/a/b.tif"
    assert to_gdal_path("http://h/b.tif") == "/vsicurl/http://h/b.tif"
    assert to_gdal_path("s3://bucket/k/b.tif") == "/vsis3/bucket/k/b.tif"
    assert to_gdal_path("gs://bucket/b.tif") == "/vsigs/bucket/b.tif"
    assert to_gdal_path("az://container/b.tif") == "/vsiaz/container/b.tif"
    assert to_gdal_path("zip+https://h/a.zip!/b.tif") == "/vsizip/vsicurl/https://h/a.zip/b.tif"
    assert to_gdal_path("/vsicurl/http://127.0.0.1:9/x.tif") == "/vsicurl/http://127.0.0.1:9/x.tif"
    assert to_gdal_path("local/x.tif") == "local/x.tif"
    for uri in ("https://x/a.tif", "s3://b/k", "/vsizip/a.zip/b.tif", "zip+s3://b/a.zip"):
        assert is_uri(uri), uri
    for local in ("a.tif", "/data/a.tif", Path("https:/x"), "C:/x.tif", "file://x"):
        assert not is_uri(local), local
    p = as_path("https://h.org/a/S2B_B04.tif?sig=1")
    assert isinstance(p, RemotePath) and str(p) == "https://h.org/a/S2B_B04.tif?sig=1"
    assert (p.name, p.stem, p.suffix, p.parent.name) == ("S2B_B04.tif", "S2B_B04", ".tif", "a")
    assert p.resolve() is p and min([p, Path("/z.tif")]) == Path("/z.tif")


def test_cli_keeps_uris_unmangled(monkeypatch):
    import io
    import sys

    from geoexplora.commands._options import expand_paths

    assert expand_paths(["https://example.com/a.tif", "x.tif"]) == [
        "https://example.com/a.tif",
        Path("x.tif"),
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3://b/k.tif\nlocal.tif\n"))
    assert expand_paths(["-"]) == ["s3://b/k.tif", Path("local.tif")]


def test_user_environment_wins_over_cloud_defaults(monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "7")
    monkeypatch.delenv("GDAL_DISABLE_READDIR_ON_OPEN", raising=False)
    remote.apply_cloud_defaults()
    import os

    assert os.environ["GDAL_HTTP_MAX_RETRY"] == "7"
    assert os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert remote.cloud_settings()["GDAL_HTTP_MAX_RETRY"] == "7"


def test_remote_window_equals_local_and_fetches_a_small_fraction(served):
    srv, root = served
    url = srv.url(NAME)
    srv.reset()
    with open_scene([url]) as scene:
        window = Window(300, 200, 64, 64)
        got = scene.read(window)
        fetched = srv.bytes_served
        assert scene.describe()["paths"] == [url]  # named as given
        assert [b.key for b in scene.bands] == [
            "sentinel2:B2",
            "sentinel2:B3",
            "sentinel2:B4",
            "sentinel2:B8",
        ]
        assert scene.dates == ["2015-07-11"]
    with open_scene([root / NAME]) as local:
        want = local.read(window)
        whole = local.read()
    size = (root / NAME).stat().st_size
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all() and got.std() > 0
    assert fetched / size < 0.2, (fetched, size)  # header + one block, never the whole file
    assert all(r[2] for r in srv.requests if r[0] == "GET")  # every GET a range request
    with open_scene([url]) as scene:  # the whole scene too, pixel for pixel
        np.testing.assert_array_equal(scene.read(), whole)


def test_resolver_takes_uris_and_refuses_listing(served):
    srv, _ = served
    got = collect_inputs([srv.url(NAME), "/vsicurl/" + srv.url(NAME)])
    assert [str(p) for p in got] == [srv.url(NAME), "/vsicurl/" + srv.url(NAME)]
    for bad in (srv.url(""), srv.url("*.tif")):
        with pytest.raises(UserError, match="folders and globs are not supported on URIs"):
            collect_inputs([bad])


@pytest.mark.parametrize(
    "name,cause", [("missing.tif", "HTTP 404 not found"), ("forbidden.tif", "HTTP 403 forbidden")]
)
def test_http_errors_are_one_line_exit_2(served, name, cause):
    srv, _ = served
    url = srv.url(name)
    code, out, err = run_cli("info", url)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"geoexplora: error: {url}: {cause}"]


def test_unreachable_host_and_no_range_support_exit_2(served, tmp_path):
    _, root = served
    url = "http://127.0.0.1:9/x.tif"
    code, _, err = run_cli("info", url)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"geoexplora: error: {url}: host unreachable")
    code, _, err = run_cli("info", f"/vsicurl/{url}")  # GDAL's own spelling, unmangled too
    assert code == 2 and f"/vsicurl/{url}: host unreachable" in err
    with RangeServer(root, ranges=False) as plain:
        out = tmp_path / "p.tif"
        code, _, err = run_cli(
            "predict", str(make_model(tmp_path / "m.pt")), plain.url(NAME), "-o", str(out)
        )
        assert code == 2 and not out.exists()
        assert err.strip().splitlines() == [
            f"geoexplora: error: {plain.url(NAME)}: the server does not support range requests"
        ]


def test_server_failure_after_retries_is_exit_1(served, monkeypatch):
    srv, _ = served
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")  # the user's settings win over ours
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")
    srv.reset()
    url = srv.url("busy.tif")
    code, _, err = run_cli("info", url)
    assert code == 1
    assert err.strip().splitlines() == [
        f"geoexplora: error: {url}: HTTP 503 Service Unavailable after 1 retries"
    ]
    assert sum(1 for r in srv.requests if r[1] == "/busy.tif") >= 2  # GDAL retried


def test_info_remote_raster(served):
    srv, _ = served
    import json

    code, out, _ = run_cli("info", srv.url(NAME), "--json")
    assert code == 0
    doc = json.loads(out)["files"][0]
    assert doc["path"] == srv.url(NAME) and doc["count"] == 4 and doc["width"] == 512
    assert [b["key"] for b in doc["bands"]] == [
        "sentinel2:B2",
        "sentinel2:B3",
        "sentinel2:B4",
        "sentinel2:B8",
    ]


def test_predict_remote_scene_equals_local(served, tmp_path):
    srv, root = served
    model = make_model(tmp_path / "model.pt")
    srv.reset()
    code, out, err = run_cli("predict", str(model), srv.url(NAME), "-o", str(tmp_path / "r.tif"))
    assert code == 0, err
    fetched = srv.bytes_served
    code, _, err = run_cli("predict", str(model), str(root / NAME), "-o", str(tmp_path / "l.tif"))
    assert code == 0, err
    with rasterio.open(tmp_path / "r.tif") as r, rasterio.open(tmp_path / "l.tif") as loc:
        np.testing.assert_array_equal(r.read(), loc.read())
        assert r.crs == loc.crs and r.transform == loc.transform
    # the whole scene is read once, window by window: about the file, not a multiple of it
    assert fetched < (root / NAME).stat().st_size
    assert "r.tif" in out
