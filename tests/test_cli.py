"""The CLI shell: help, version, info, exit codes."""

import json
import subprocess
import sys
import time

from conftest import run_cli

from geoexplora import __version__


def test_version():
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"geoexplora {__version__}"


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, time; t = time.time(); from geoexplora.cli import main; "
        "main(['--help']); print('TORCH', 'torch' in sys.modules, 'rasterio' in sys.modules)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    assert "TORCH False False" in proc.stdout
    assert elapsed < 2.0  # the target is 0.5 s; generous for a loaded 2-core CI machine


def test_every_command_help_has_an_example():
    import typer.main

    from geoexplora.cli import app

    group = typer.main.get_command(app)
    assert group.commands, "no commands registered"
    for name in group.commands:
        code, out, _ = run_cli(name, "--help")
        assert code == 0, name
        assert "Example" in out, f"{name} --help has no example"


def test_info_json_describes_bands_crs_and_dates(shared_data):
    path = shared_data / "s2-l1c-slovenia-2015" / "S2L1C_2015-07-11_13band_10m.tif"
    code, out, err = run_cli("info", str(path), "--json")
    assert code == 0, err
    doc = json.loads(out)["files"][0]
    assert doc["width"] == 100 and doc["height"] == 101 and doc["count"] == 13
    assert doc["crs"] == "EPSG:32633" and doc["dtype"] == "float32"
    assert doc["date"] == "2015-07-11" and doc["sensor"] == "sentinel2"
    b8a = doc["bands"][8]
    assert b8a["name"] == "B8A" and b8a["center_nm"] == 864.7 and b8a["gsd_m"] == 20


def test_info_band_map_identifies_landsat_bands(shared_data):
    path = (
        shared_data / "landsat8-224078-2020-05-18" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
    )
    code, out, _ = run_cli("info", str(path), "--band-map", "1=B2,2=B3,3=B4", "--json")
    doc = json.loads(out)["files"][0]
    assert code == 0
    assert [b["key"] for b in doc["bands"]] == ["landsat8:B2", "landsat8:B3", "landsat8:B4"]
    assert doc["bands"][0]["center_nm"] == 482


def test_info_table_on_stdout(sample_data):
    code, out, _ = run_cli(
        "info", str(sample_data / "s2-29RKH" / "S2A_29RKH_20200219_L2A_12band_200m_crop.tif")
    )
    assert code == 0 and "EPSG:32629" in out and "B8A" in out


def test_missing_file_exits_2_with_one_line(tmp_path):
    code, out, err = run_cli("info", str(tmp_path / "missing.tif"))
    assert code == 2 and out == ""
    assert err.strip() == f"geoexplora: error: {tmp_path / 'missing.tif'}: no such file"


def test_not_a_raster_exits_2(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("hello")
    code, _, err = run_cli("info", str(bad))
    assert code == 2 and "notes.tif: not a readable raster" in err
    assert "Traceback" not in err


def test_bad_band_map_exits_2(sample_data):
    code, _, err = run_cli(
        "info", str(sample_data / "slovenia" / "LULC.tif"), "--band-map", "one=B2"
    )
    assert code == 2 and "--band-map entry 'one=B2'" in err


def test_unknown_option_is_usage_error_2():
    code, _, _ = run_cli("info", "--no-such-option")
    assert code == 2


def test_paths_from_stdin(sample_data):
    path = sample_data / "slovenia" / "S2L1C_2015-07-11_13band_10m.tif"
    code, out, _ = run_cli("info", "-", "--json", input=f"{path}\n")
    assert code == 0 and json.loads(out)["files"][0]["count"] == 13


def test_info_on_a_model_file_prints_its_card(tmp_path):
    from geoexplora.models import build_backbone
    from geoexplora.models.file import save_model

    vit = build_backbone(
        init="geo_vit_tiny_patch14",
        init_weights="random",
        bands=["sentinel2:B4", "sentinel2:B3", "sentinel2:B2"],
        img_size=28,
    )
    path = save_model(tmp_path / "m.pt", vit)
    code, out, err = run_cli("info", str(path))
    assert code == 0, err
    assert "geo_vit_tiny_patch14" in out and "backbone" in out and "B4" in out
    code, out, _ = run_cli("info", str(path), "--json")
    doc = json.loads(out)["files"][0]
    assert doc["kind"] == "model" and doc["model_kind"] == "backbone"
    assert [b["key"] for b in doc["backbone"]["bands"]][:1] == ["sentinel2:B4"]


def test_a_file_that_is_not_a_model_is_a_one_line_error(tmp_path, sample_data):
    fake = tmp_path / "x.pt"
    fake.write_text("hello")
    scene = next(sample_data.glob("slovenia/S2L1C_*.tif"))
    for args in (
        ("info", str(fake)),
        ("embed", str(fake), str(scene), "-o", str(tmp_path / "e.tif")),
    ):
        code, _, err = run_cli(*args)
        assert code == 2, args
        assert f"{fake}: not a readable model file" in err and "Traceback" not in err


def test_info_on_a_folder_describes_its_band_files(shared_data):
    folder = next((shared_data / "bigearthnet-s2-examples").glob("S2A_*"))
    code, out, _ = run_cli("info", str(folder), "--json")
    names = [f["bands"][0]["name"] for f in json.loads(out)["files"]]
    assert code == 0 and len(names) == 12 and "B8A" in names


def test_partial_band_map_overrides_only_the_bands_it_names(sample_data):
    path = sample_data / "slovenia" / "S2L1C_2015-07-11_13band_10m.tif"
    code, out, _ = run_cli("info", str(path), "--band-map", "1=B1", "--json")
    names = [b["name"] for b in json.loads(out)["files"][0]["bands"]]
    assert code == 0 and names[:3] == ["B1", "B2", "B3"] and names[8] == "B8A"


def test_band_map_naming_an_unknown_band_is_refused(sample_data):
    path = sample_data / "slovenia" / "S2L1C_2015-07-11_13band_10m.tif"
    code, _, err = run_cli("info", str(path), "--band-map", "1=B77")
    assert code == 2 and "--band-map names B77: not a band of any sensor" in err


def test_info_on_a_chips_dataset_summarises_it(sample_data, tmp_path):
    out_dir = str(tmp_path / "chips")
    assert (
        run_cli(
            "tile",
            str(sample_data / "slovenia" / "S2L1C_2015-07-11_13band_10m.tif"),
            "--label-raster",
            str(sample_data / "slovenia" / "LULC.tif"),
            "--size",
            "32",
            "-o",
            out_dir,
        )[0]
        == 0
    )
    code, out, _ = run_cli("info", out_dir, "--json")
    (doc,) = json.loads(out)["files"]
    assert code == 0 and doc["kind"] == "chips" and doc["task"] == "segmentation"
    assert (doc["chips"], doc["chip_size"], doc["num_frames"]) == (9, 32, 1)
    assert sum(doc["splits"].values()) == 9 and len(doc["bands"]) == 13
    assert [c["name"] for c in doc["classes"]][:2] == ["cultivated_land", "forest"]
    assert doc["classes"][1]["chips"] == 9 and doc["crs"] == "EPSG:32633"
    code, out, _ = run_cli("info", out_dir)
    assert code == 0 and "9 of 32 px" in out and "forest" in out


def test_quiet_and_verbose_are_accepted_after_the_verb(tmp_path):
    from geoexplora.log import set_verbosity, verbosity

    missing = str(tmp_path / "missing.tif")
    try:
        code, _, err = run_cli("info", missing, "-q")
        assert code == 2 and "missing.tif: no such file" in err
        assert verbosity() == -1
        code, _, err = run_cli("-v", "info", missing, "-v")
        assert code == 2 and verbosity() == 2
        assert "Traceback" in err  # -v shows tracebacks, wherever it is typed
    finally:
        set_verbosity(0)


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "geoexplora", "--version"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"geoexplora {__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "geoexplora", "info", "/no/such.tif", "-q"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "geoexplora: error: /no/such.tif: no such file"


def test_the_suite_cannot_reach_the_network():
    """conftest refuses every connection that leaves this machine, and the hub is offline."""
    import os
    import socket

    import pytest

    with socket.socket() as sock, pytest.raises(OSError, match="loopback only"):
        sock.connect(("93.184.216.34", 80))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
