"""STAC items as inputs (issue 16): items and an ItemCollection written by the tests, pointing at
per-band COGs served by a loopback server; a pystac-client search against a loopback STAC API
stub. No internet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli
from loopback import RangeServer
from rasterio.enums import Resampling

from geoexplora.errors import UserError
from geoexplora.io import stac
from geoexplora.io.inputs import place_name, resolve_places
from geoexplora.io.scene import SceneOptions, open_scene

SAMPLE = Path(__file__).resolve().parents[1] / "geoexplora/data/slovenia"
# asset key -> (file band of the sample, eo:bands name, common name)
BANDS = {
    "blue": (2, "B02", "blue"),
    "green": (3, "B03", "green"),
    "red": (4, "B04", "red"),
    "nir": (8, "B08", "nir"),
}


def band_cogs(root: Path, scene: str, size: int = 128) -> dict[str, Path]:
    """One single-band uint16 COG per band, named by asset key (no band token, no
    descriptions: only the STAC item says which band each is)."""
    out = {}
    with rasterio.open(SAMPLE / scene) as src:
        data = src.read(
            [v[0] for v in BANDS.values()],
            out_shape=(4, size, size),
            resampling=Resampling.bilinear,
        )
        transform = src.transform * src.transform.scale(src.width / size, src.height / size)
        crs = src.crs
    dn = np.clip(np.nan_to_num(data) * 1e4 + 1000, 1, 65535).astype("uint16")
    for i, key in enumerate(BANDS):
        path = root / f"{Path(scene).stem}-{key}.tif"
        with rasterio.open(
            path,
            "w",
            driver="COG",
            width=size,
            height=size,
            count=1,
            dtype="uint16",
            crs=crs,
            transform=transform,
            blocksize=128,
            compress="deflate",
        ) as dst:
            dst.write(dn[i], 1)
        out[key] = path
    return out


def make_item(item_id: str, hrefs: dict[str, str], date: str, **props) -> dict:
    assets = {}
    for key, href in hrefs.items():
        _, name, common = BANDS[key]
        assets[key] = {
            "href": href,
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "eo:bands": [{"name": name, "common_name": common}],
            "raster:bands": [{"scale": 0.0001, "offset": -0.1, "nodata": 0}],
        }
    assets["thumbnail"] = {"href": "thumb.jpg", "type": "image/jpeg", "roles": ["thumbnail"]}
    assets["red-jp2"] = {
        "href": "red.jp2",
        "type": "image/jp2",
        "roles": ["data"],
        "eo:bands": [{"name": "B04", "common_name": "red"}],
    }
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "collection": "sentinel-2-l2a",
        "bbox": [14.0, 46.0, 14.1, 46.1],
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[14.0, 46.0], [14.1, 46.0], [14.1, 46.1], [14.0, 46.0]]],
        },
        "properties": {"datetime": f"{date}T10:00:00Z", "platform": "sentinel-2a", **props},
        "assets": assets,
        "links": [],
    }


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("stac")
    with RangeServer(root) as srv:
        items = []
        for i, scene in enumerate(
            ("S2L1C_2015-07-11_13band_10m.tif", "S2L1C_2015-07-31_13band_10m.tif")
        ):
            files = band_cogs(root, scene)
            item = make_item(
                f"S2A_T33TVM_{i}",
                {k: srv.url(p.name) for k, p in files.items()},
                f"2023-0{6 + i}-10",
                **{"s2:processing_baseline": "05.09"},
            )
            items.append(item)
        (root / "item.json").write_text(json.dumps(items[0]))
        (root / "items.json").write_text(
            json.dumps({"type": "FeatureCollection", "features": items})
        )
        srv.httpd.stac_items = items
        yield srv, root, items


def test_band_mapping_from_stac_metadata(catalog):
    items = catalog[2]
    paths = stac.band_assets(items[0])
    assert [p.stac.key for p in paths] == ["blue", "green", "red", "nir"]  # jp2 twin, thumb out
    assert [p.stac.band.key for p in paths] == [
        "sentinel2:B2",
        "sentinel2:B3",
        "sentinel2:B4",
        "sentinel2:B8",
    ]
    assert {p.stac.date for p in paths} == {"2023-06-10"}
    # processing baseline 05.09: the +1000 offset is removed; an explicit s2_offset wins
    assert paths[0].stac.conversion() == (1.0, -1000.0)
    assert paths[0].stac.conversion("0") == (1.0, 0.0)
    applied = make_item(
        "x", {"red": "r.tif"}, "2023-01-01", **{"earthsearch:boa_offset_applied": True}
    )
    assert stac.band_assets(applied)[0].stac.conversion() == (1.0, 0.0)
    bare = make_item("x", {"red": "r.tif"}, "2023-01-01")  # only raster:bands says
    assert stac.band_assets(bare)[0].stac.conversion() == pytest.approx((1.0, -1000.0))


def test_landsat_c2_scale_offset_and_common_names():
    item = {
        "type": "Feature",
        "id": "LC09_L2SP_x",
        "collection": "landsat-c2-l2",
        "properties": {"datetime": "2023-05-01T00:00:00Z", "platform": "landsat-9"},
        "assets": {
            "red": {
                "href": "https://h/LC09_SR_B4.TIF",
                "type": "image/tiff",
                "roles": ["data"],
                "eo:bands": [{"name": "SR_B4", "common_name": "red"}],
                "raster:bands": [{"scale": 2.75e-05, "offset": -0.2}],
            },
            "nir08": {
                "href": "https://h/LC09_SR_B5.TIF",
                "type": "image/tiff",
                "roles": ["data"],
                "eo:bands": [{"common_name": "nir08"}],
            },
            "qa": {
                "href": "https://h/QA.TIF",
                "type": "image/tiff",
                "roles": ["data"],
                "eo:bands": [{"name": "QA_PIXEL"}],
            },
        },
    }
    paths = stac.band_assets(item)
    assert [p.stac.band.key for p in paths] == ["landsat9:B4", "landsat9:B5"]
    scale, add = paths[0].stac.conversion()
    assert scale == pytest.approx(0.275) and add == pytest.approx(-2000.0)
    assert paths[1].stac.conversion() is None  # says nothing: the file rules apply


def test_items_without_bands_or_rasters_are_refused():
    only_meta = {
        "type": "Feature",
        "id": "m1",
        "properties": {"platform": "sentinel-2b"},
        "assets": {"meta": {"href": "m.xml", "type": "application/xml"}},
    }
    with pytest.raises(
        UserError, match=r"STAC item m1: no band assets .its assets are not rasters"
    ):
        stac.band_assets(only_meta)
    with pytest.raises(UserError, match="not a STAC Item or ItemCollection"):
        stac.load_items({"type": "Catalog"})


def test_remote_item_is_one_scene_equal_to_its_files(catalog):
    srv, root, _ = catalog
    places = resolve_places([srv.url("item.json")])
    assert len(places) == 1 and place_name(places.groups[0]) == "S2A_T33TVM_0"
    with open_scene(list(places.groups[0])) as scene:
        assert [b.key for b in scene.bands] == [
            "sentinel2:B2",
            "sentinel2:B3",
            "sentinel2:B4",
            "sentinel2:B8",
        ]
        assert scene.dates == ["2023-06-10"]
        got = scene.read()
    stem = "S2L1C_2015-07-11_13band_10m"
    local = np.stack([rasterio.open(root / f"{stem}-{k}.tif").read(1) for k in BANDS])
    np.testing.assert_allclose(got[0], local.astype("float32") - 1000.0)  # offset removed
    wrong = SceneOptions(bands=["B5"])
    with pytest.raises(UserError, match="band B5 not found"):
        open_scene(list(places.groups[0]), wrong)


def test_item_collection_is_one_place_per_item(catalog):
    _, root, _ = catalog
    places = resolve_places([root / "items.json"])
    assert [place_name(g) for g in places.groups] == ["S2A_T33TVM_0", "S2A_T33TVM_1"]
    assert all(len(g) == 4 for g in places.groups)


def test_info_item_shows_the_mapping(catalog):
    _, root, _ = catalog
    code, out, err = run_cli("info", str(root / "item.json"), "--json")
    assert code == 0, err
    doc = json.loads(out)["files"][0]
    assert doc["kind"] == "stac" and doc["items"][0]["sensor"] == "sentinel2"
    bands = doc["items"][0]["bands"]
    assert [(b["asset"], b["band"], b["add"]) for b in bands] == [
        ("blue", "B2", -1000.0),
        ("green", "B3", -1000.0),
        ("red", "B4", -1000.0),
        ("nir", "B8", -1000.0),
    ]
    code, out, _ = run_cli("info", str(root / "item.json"))
    assert code == 0 and "S2A_T33TVM_0" in out and "sentinel2:B4" in out


def test_tile_an_item(catalog, tmp_path):
    _, root, _ = catalog
    out = tmp_path / "chips"
    code, stdout, err = run_cli("tile", str(root / "item.json"), "--size", "32", "-o", str(out))
    assert code == 0, err
    meta = json.loads((out / "dataset.json").read_text())
    assert [b["key"] for b in meta["bands"]] == [
        "sentinel2:B2",
        "sentinel2:B3",
        "sentinel2:B4",
        "sentinel2:B8",
    ]
    assert meta["counts"]["chips"] == 16
    assert "16 chips" in stdout
    sources = meta["provenance"]["sources"]
    assert len(sources) == 4 and all(s.startswith("http://127.0.0.1:") for s in sources)


def test_stac_search_through_pystac_client(catalog, tmp_path):
    srv, _, _ = catalog
    api = srv.url("stac/")
    items = stac.search(
        api, ["sentinel-2-l2a"], [13.9, 45.9, 14.2, 46.2], "2023-06-01/2023-07-31", max_items=1
    )
    assert [i["id"] for i in items] == ["S2A_T33TVM_0"]
    query = srv.httpd.searches[-1]
    assert query["collections"] == ["sentinel-2-l2a"]
    out = tmp_path / "chips"
    code, _, err = run_cli(
        "tile",
        "--stac-search",
        api,
        "--collection",
        "sentinel-2-l2a",
        "--bbox",
        "13.9,45.9,14.2,46.2",
        "--max-items",
        "2",
        "--size",
        "32",
        "-o",
        str(out),
    )
    assert code == 0, err
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"]["chips"] == 32  # two items, two scenes of 16 chips
    code, _, err = run_cli(
        "tile", "--stac-search", api, "--collection", "landsat-c2-l2", "-o", str(tmp_path / "none")
    )
    assert code == 2 and not (tmp_path / "none").exists()
    assert err.strip().splitlines() == [
        (
            f"geoexplora: error: {api}: the STAC search returned no items (collections "
            "['landsat-c2-l2'])"
        )
    ]
    code, _, err = run_cli("tile", "--bbox", "1,2,3", "--stac-search", api, "-o", str(out / "x"))
    assert code == 2 and "--bbox" in err


def test_adapt_and_embed_read_remote_items(catalog, tmp_path):
    import torch
    from factories import TINY, timm_model

    srv, _, _ = catalog
    weights = tmp_path / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), weights)
    adapted = tmp_path / "adapted.pt"
    code, _, err = run_cli(
        "adapt",
        srv.url("items.json"),
        "-o",
        str(adapted),
        "--init",
        TINY,
        "--init-weights",
        str(weights),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--crop-size",
        "56",
        "--num-workers",
        "0",
    )
    assert code == 0, err
    emb = tmp_path / "emb.tif"
    code, _, err = run_cli("embed", str(adapted), srv.url("item.json"), "-o", str(emb))
    assert code == 0, err
    with rasterio.open(emb) as src:
        assert src.count > 1 and src.width > 0


def test_append_skips_remote_files_already_in_the_dataset(catalog, tmp_path):
    srv, _, _ = catalog
    out = tmp_path / "chips"
    code, _, err = run_cli("tile", srv.url("item.json"), "--size", "32", "-o", str(out))
    assert code == 0, err
    code, _, err = run_cli("tile", srv.url("item.json"), "--size", "32", "-o", str(out), "--append")
    assert code == 2 and "nothing to append" in err
