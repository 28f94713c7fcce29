"""The band registry: identity, aliases, sensors, wavelengths."""

import pytest

from geoexplora import bands as B
from geoexplora.errors import UserError


@pytest.mark.parametrize("token", ["B2", "B02", "blue", "b02", "Blue"])
def test_sentinel2_blue_aliases_resolve_to_one_band(token):
    band = B.get_band("sentinel2", token)
    assert band.key == "sentinel2:B2"
    assert band.center_nm == pytest.approx(492.7)
    assert band.gsd_m == 10


@pytest.mark.parametrize("token", ["B8A", "B08A", "b8a", "nir08"])
def test_narrow_nir_aliases(token):
    assert B.get_band("s2", token).key == "sentinel2:B8A"


def test_sentinel2_has_13_bands_including_b8a_and_b10():
    names = [b.name for b in B.SENSORS["sentinel2"]]
    assert len(names) == 13 and "B8A" in names and "B10" in names


def test_same_name_in_two_sensors_is_two_bands():
    s2, l8, l7 = (B.get_band(s, "B5") for s in ("sentinel2", "landsat8", "landsat7"))
    assert {s2.common_name, l8.common_name, l7.common_name} == {"rededge1", "nir", "swir16"}
    assert len({s2.key, l8.key, l7.key}) == 3


def test_landsat_collection_names_and_gsd():
    assert B.get_band("landsat8", "B4").common_name == "red"
    assert B.get_band("landsat7", "B3").common_name == "red"
    assert B.get_band("landsat5", "nir").name == "B4"
    assert B.get_band("landsat8", "pan").gsd_m == 15


def test_unknown_band_error_lists_the_sensor_bands():
    with pytest.raises(UserError, match=r"B13.*not a sentinel2 band.*B8A"):
        B.get_band("sentinel2", "B13")


def test_unknown_sensor_error():
    with pytest.raises(UserError, match="unknown sensor 'modis'"):
        B.canonical_sensor("modis")


def test_band_key_round_trip():
    band = B.get_band("landsat8", "B5")
    assert B.band_from_key(band.key) == band


def test_band_list_parsing():
    assert B.parse_band_list("B2, B3,B4") == ["B2", "B3", "B4"]
    assert B.parse_band_list(None) is None
    with pytest.raises(UserError, match="empty entry"):
        B.parse_band_list("B2,,B3")


def test_interpolation_on_node_and_between_nodes():
    w = B.interpolation_weights(664.6)
    assert w[3] == pytest.approx(1.0) and sum(w) == pytest.approx(1.0)
    # Landsat-8 blue (482 nm) sits between S2 B1 (443) and B2 (493), mostly B2.
    w = B.interpolation_weights(482)
    assert w[1] == pytest.approx(0.80, abs=0.05) and w[0] == pytest.approx(0.20, abs=0.05)
    assert sum(w) == pytest.approx(1.0)


def test_interpolation_outside_range_clamps_to_end_nodes():
    assert B.interpolation_weights(300)[0] == 1.0
    assert B.interpolation_weights(2500)[-1] == 1.0


def test_fallback_statistics_exist_for_reflectance_sensors():
    for sensor in ("sentinel2", "landsat8", "landsat7"):
        for band in B.SENSORS[sensor]:
            if band.common_name != "pan":
                assert band.mean and band.std, band.key
