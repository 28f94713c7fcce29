"""Faults and edge inputs (issue 20): every case exits with one error line naming what is wrong
(2 for bad input, 1 for a runtime failure), writes nothing, and leaves its inputs byte-identical."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from factories import TINY

from geoexplora import sample


def digest(*paths: Path) -> dict:
    """sha256 of every file under ``paths`` (files or folders)."""
    out = {}
    for root in paths:
        files = [root] if Path(root).is_file() else sorted(Path(root).rglob("*"))
        for f in files:
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def error_line(err: str) -> str:
    """The one line a failing command writes on stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from factories import make_model

    return make_model(tmp_path_factory.mktemp("model") / "seg.pt")


@pytest.fixture
def scene(tmp_path) -> Path:
    """A private copy of a real 12-band Sentinel-2 crop, so a test can see it stay unchanged."""
    path = tmp_path / "in.tif"
    shutil.copyfile(sample.s2_tile_crop(), path)
    return path


# --- case 2: an output that is an input -----------------------------------------------------


def test_predict_over_its_input_is_refused_with_overwrite(model, scene, tmp_path):
    before = digest(tmp_path)
    code, _, err = run_cli("predict", str(model), str(scene), "-o", str(scene), "--overwrite")
    assert code == 2
    line = error_line(err)
    assert f"--output {scene} is the input {scene}" in line
    assert digest(tmp_path) == before


def test_predict_through_a_link_or_hard_link_to_its_input_is_refused(model, scene, tmp_path):
    link, hard = tmp_path / "link.tif", tmp_path / "hard.tif"
    link.symlink_to(scene)
    os.link(scene, hard)
    before = digest(scene)
    for out in (link, hard):
        code, _, err = run_cli("predict", str(model), str(scene), "-o", str(out), "--overwrite")
        assert code == 2 and f"--output {out} is the input {scene}" in error_line(err)
    assert digest(scene) == before and link.is_symlink()


def test_predict_over_the_model_file_is_refused(model, scene):
    before = digest(model)
    code, _, err = run_cli("predict", str(model), str(scene), "-o", str(model), "--overwrite")
    assert code == 2 and f"is the input {model}" in error_line(err)
    assert digest(model) == before


def test_embed_over_its_input_is_refused(model, scene, tmp_path):
    before = digest(tmp_path)
    code, _, err = run_cli("embed", str(model), str(scene), "-o", str(scene), "--overwrite")
    assert code == 2 and f"--output {scene} is the input {scene}" in error_line(err)
    assert digest(tmp_path) == before


def test_adapt_over_its_input_is_refused(scene, tmp_path):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "adapt",
        str(scene),
        "-o",
        str(scene),
        "--overwrite",
        "--init",
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B2,B3,B4,B8",
    )
    assert code == 2 and f"--output {scene} is the input {scene}" in error_line(err)
    assert digest(tmp_path) == before


def test_adapt_whose_checkpoint_would_be_an_input_is_refused(tmp_path):
    """``-o m.pt`` writes ``m.ckpt`` beside it: an input of that name is refused too."""
    inp = tmp_path / "m.ckpt"
    shutil.copyfile(sample.s2_tile_crop(), inp)
    before = digest(tmp_path)
    code, _, err = run_cli(
        "adapt",
        str(inp),
        "-o",
        str(tmp_path / "m.pt"),
        "--overwrite",
        "--init",
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B2,B3,B4,B8",
    )
    assert code == 2 and f"--output {inp} is the input {inp}" in error_line(err)
    assert digest(tmp_path) == before


def test_tile_over_its_input_is_refused_and_leaves_no_partial_folder(scene, tmp_path):
    before = digest(tmp_path)
    code, _, err = run_cli("tile", str(scene), "-o", str(scene), "--overwrite", "--size", "32")
    assert code == 2 and f"--output {scene} is the input {scene}" in error_line(err)
    assert digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_tile_into_a_folder_holding_its_input_is_refused(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    scene = folder / "in.tif"
    shutil.copyfile(sample.s2_tile_crop(), scene)
    before = digest(tmp_path)
    code, _, err = run_cli("tile", str(scene), "-o", str(folder), "--overwrite", "--size", "32")
    assert code == 2 and f"--output {folder} holds the input {scene}" in error_line(err)
    assert digest(tmp_path) == before


# --- case 3: a band named twice -------------------------------------------------------------


@pytest.mark.parametrize(
    "bands, named",
    [
        ("B2,B2,B4,B8", "--bands 'B2,B2,B4,B8' names B2 twice; give each band once"),
        ("B2,B02,B4", "--bands 'B2,B02,B4' names B2 twice (as B02); give each band once"),
        ("B2,blue,B4", "--bands names sentinel2:B2 twice (B2 and blue); give each band once"),
    ],
)
def test_tile_refuses_a_band_named_twice(scene, tmp_path, bands, named):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "tile", str(scene), "-o", str(tmp_path / "c"), "--size", "32", "--bands", bands
    )
    assert code == 2 and error_line(err).endswith(named)
    assert digest(tmp_path) == before


def test_adapt_refuses_a_band_named_twice(scene, tmp_path):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "adapt",
        str(scene),
        "-o",
        str(tmp_path / "m.pt"),
        "--init",
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B2,blue,B4",
    )
    assert code == 2 and "names sentinel2:B2 twice (B2 and blue)" in error_line(err)
    assert digest(tmp_path) == before


def test_adapt_on_chips_refuses_a_band_named_twice(tmp_path):
    from factories import make_chips_dataset

    chips = make_chips_dataset(tmp_path / "chips", "unlabeled", size=56)
    before = digest(tmp_path)
    code, _, err = run_cli(
        "adapt",
        str(chips),
        "-o",
        str(tmp_path / "m.pt"),
        "--init",
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B4,red",
    )
    assert code == 2 and "names sentinel2:B4 twice (B4 and red)" in error_line(err)
    assert digest(tmp_path) == before


# --- case 5: zeros and negatives are refused, never replaced by a default -------------------


@pytest.mark.parametrize(
    "option, value, line",
    [
        ("--steps", "0", "--steps must be at least 1, not 0"),
        ("--batch-size", "0", "--batch-size must be at least 1, not 0"),
        ("--knn-k", "0", "--knn-k must be at least 1, not 0"),
    ],
)
def test_probe_refuses_zero(model, tmp_path, option, value, line):
    chips = tmp_path / "chips"
    chips.mkdir()
    code, _, err = run_cli("probe", str(model), str(chips), option, value)
    assert code == 2 and error_line(err).endswith(line)
    assert list(chips.iterdir()) == []


@pytest.mark.parametrize("verb", ["predict", "embed"])
@pytest.mark.parametrize("window", ["0", "-1", "7"])
def test_predict_and_embed_refuse_a_window_below_the_patch_size(
    model, scene, tmp_path, verb, window
):
    before = digest(tmp_path)
    code, _, err = run_cli(
        verb, str(model), str(scene), "-o", str(tmp_path / "o.tif"), "--window", window
    )
    assert code == 2
    assert error_line(err).endswith(f"--window must be at least 14, not {window}")
    assert digest(tmp_path) == before


@pytest.mark.parametrize(
    "args, line",
    [
        (["--frames", "0"], "--frames must be at least 1, not 0"),
        (["--lr", "-1"], "--lr must be positive, not -1.0"),
        (["--lr", "0"], "--lr must be positive, not 0.0"),
    ],
)
def test_adapt_refuses_zero_and_negative_values(scene, tmp_path, args, line):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "adapt",
        str(scene),
        "-o",
        str(tmp_path / "m.pt"),
        "--init",
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B2,B3,B4,B8",
        *args,
    )
    assert code == 2 and error_line(err).endswith(line)
    assert digest(tmp_path) == before


@pytest.mark.parametrize("resolution", ["0", "-10"])
def test_tile_refuses_a_resolution_that_is_not_positive(scene, tmp_path, resolution):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "tile", str(scene), "-o", str(tmp_path / "c"), "--size", "32", "--resolution", resolution
    )
    assert code == 2
    assert error_line(err).endswith(f"--resolution must be positive, not {float(resolution)}")
    assert digest(tmp_path) == before


# --- case 6: a file that would run code when unpickled --------------------------------------


class _Payload:
    """Unpickling this calls ``os.getpid`` (harmless, but code all the same)."""

    def __reduce__(self):
        return (os.getpid, ())


class _Args:
    """A plain object, as training scripts store their arguments."""


@pytest.fixture(params=["blocked_module", "class"])
def hostile(request, tmp_path) -> Path:
    """A real torch.save archive holding tensors and a Python object: one calling a blocked
    module's function (torch: "unsupported GLOBAL posix.getpid whose module posix is blocked"),
    one of a class torch does not know ("Unsupported global: GLOBAL ...")."""
    import torch

    obj = _Payload() if request.param == "blocked_module" else _Args()
    path = tmp_path / "hostile.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": obj}, path)
    return path


def _assert_refused_safely(code: int, err: str, path: Path) -> None:
    """Exit 2, one line naming the file, and no advice to disable weights_only."""
    line = error_line(err)
    refusal = (
        "holds Python objects besides tensors, which are never loaded: unpickling them "
        "can run any code; use a file of tensors only (a state dict, or .safetensors) "
        "from a source you trust"
    )
    assert code == 2
    assert line.endswith(
        (f"{path}: not a geoexplora model file: it {refusal}", f"{path}: {refusal}")
    )
    assert "weights_only" not in line and "False" not in line


def test_the_torch_message_for_a_hostile_file_is_recognised(hostile):
    import pickle

    import torch

    from geoexplora.models.checkpoints import is_weights_only_refusal

    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(hostile, weights_only=True)
    assert is_weights_only_refusal(info.value)


def test_info_and_predict_refuse_a_hostile_model_file_without_unsafe_advice(
    hostile, scene, tmp_path
):
    before = digest(tmp_path)
    _assert_refused_safely(*run_cli("info", str(hostile))[::2], hostile)
    code, _, err = run_cli("predict", str(hostile), str(scene), "-o", str(tmp_path / "o.tif"))
    _assert_refused_safely(code, err, hostile)
    assert digest(tmp_path) == before


def test_adapt_refuses_hostile_init_weights_without_unsafe_advice(hostile, scene, tmp_path):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "adapt",
        str(scene),
        "-o",
        str(tmp_path / "m.pt"),
        "--init",
        TINY,
        "--init-weights",
        str(hostile),
        "--bands",
        "B2,B3,B4,B8",
        "--steps",
        "1",
    )
    _assert_refused_safely(code, err, hostile)
    assert digest(tmp_path) == before


# --- case 7 (and 4: metadata without bands): every version field, every field readers need --


def _rewrite_meta(model: Path, dest: Path, change) -> Path:
    """A copy of ``model`` whose metadata ``change(meta)`` edited (the archive left as is)."""
    import json

    import torch

    payload = torch.load(model, weights_only=True)
    meta = json.loads(payload["meta_json"])
    change(meta)
    payload["meta_json"] = json.dumps(meta)
    torch.save(payload, dest)
    return dest


def test_a_newer_metadata_format_is_refused_by_info_predict_and_adapt_init(model, scene, tmp_path):
    newer = _rewrite_meta(model, tmp_path / "newer.pt", lambda m: m.update(format_version=2))
    before = digest(tmp_path)
    line = (
        f"{newer}: model metadata format 2 is newer than this geoexplora reads (up to 1); "
        "upgrade geoexplora"
    )
    code, _, err = run_cli("info", str(newer))
    assert code == 2 and error_line(err).endswith(line)
    code, _, err = run_cli("predict", str(newer), str(scene), "-o", str(tmp_path / "o.tif"))
    assert code == 2 and error_line(err).endswith(line)
    code, _, err = run_cli(
        "adapt", str(scene), "-o", str(tmp_path / "m.pt"), "--init", str(newer), "--steps", "1"
    )
    assert code == 2 and error_line(err).endswith(line)
    assert digest(tmp_path) == before  # adapt --init did not re-save it as version 1


def test_info_on_a_model_whose_metadata_lacks_bands_says_so(model, tmp_path):
    broken = _rewrite_meta(model, tmp_path / "nobands.pt", lambda m: m["backbone"].pop("bands"))
    before = digest(tmp_path)
    code, _, err = run_cli("info", str(broken))
    assert code == 2
    assert error_line(err).endswith(
        f"{broken}: corrupt model file (metadata lacks the backbone's bands)"
    )
    assert digest(tmp_path) == before


# --- case 8: leftovers, interruptions, concurrent writers -----------------------------------


def test_a_failed_embed_pca_leaves_nothing_and_a_plain_rerun_works(
    model, scene, tmp_path, monkeypatch
):
    from geoexplora.pipelines import embed as embed_module

    def fail(*_args, **_kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "e.tif"
    monkeypatch.setattr(embed_module, "fit_pca", fail)
    before = digest(tmp_path)
    code, _, err = run_cli("embed", str(model), str(scene), "-o", str(out), "--pca", "3")
    assert code == 130 and error_line(err) == "geoexplora: interrupted"
    assert digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
    monkeypatch.undo()
    code, _, err = run_cli("embed", str(model), str(scene), "-o", str(out), "--pca", "3")
    assert code == 0, err
    assert out.is_file() and not (tmp_path / ".e.tif.parts").exists()


def _sigterm_after_first_strip(monkeypatch):
    import signal

    from geoexplora.io.writers import StripStore

    original = StripStore._write_strip

    def write_then_term(self, i, data):
        original(self, i, data)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(StripStore, "_write_strip", write_then_term)


def test_predict_on_sigterm_exits_130_with_a_line_and_resumes(model, scene, tmp_path, monkeypatch):
    out = tmp_path / "p.tif"
    _sigterm_after_first_strip(monkeypatch)
    before = digest(scene)
    code, _, err = run_cli("-q", "predict", str(model), str(scene), "-o", str(out))
    assert code == 130 and error_line(err) == "geoexplora: interrupted (SIGTERM)"
    assert not out.exists() and (tmp_path / ".p.tif.parts").is_dir()
    monkeypatch.undo()
    code, _, err = run_cli("predict", str(model), str(scene), "-o", str(out), "--resume")
    assert code == 0, err
    assert out.is_file() and digest(scene) == before


def test_a_second_predict_on_an_output_being_written_names_the_other_run(
    model, scene, tmp_path, monkeypatch
):
    """The other run is another process holding the work folder's lock (as a running predict
    does); the second run is refused, whatever its options, and the first one's work is kept."""
    import subprocess
    import sys

    out = tmp_path / "p.tif"
    _sigterm_after_first_strip(monkeypatch)
    assert run_cli("-q", "predict", str(model), str(scene), "-o", str(out))[0] == 130
    monkeypatch.undo()
    work = tmp_path / ".p.tif.parts"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(work)!r}, os.O_RDONLY)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                f"open({str(work / 'writer.pid')!r}, 'w')"
                ".write(str(os.getpid()))\n"
                "print('locked', flush=True)\ntime.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        parts = digest(work)
        for flag in ("--resume", "--overwrite"):
            code, _, err = run_cli("-q", "predict", str(model), str(scene), "-o", str(out), flag)
            assert code == 2
            assert error_line(err).endswith(
                f"another run (pid {holder.pid}) is writing {out} (work folder {work}); wait "
                "for it to finish"
            )
            assert digest(work) == parts and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli("predict", str(model), str(scene), "-o", str(out), "--resume")
    assert code == 0, err


# --- case 4: a full disk ---------------------------------------------------------------------


def _disk_full_after(monkeypatch, owner, name: str, calls: int = 1) -> None:
    """``owner.name`` writes its file, then the disk is full (ENOSPC) on call ``calls``."""
    import errno

    real = getattr(owner, name)
    count = []

    def write(*args, **kwargs):
        count.append(1)
        if len(count) >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/disk/file")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, write)


FULL = (
    "/full/disk/file: no space left on device; free some space and run again (--resume "
    "continues an interrupted predict, embed, adapt or finetune)"
)


def test_tile_on_a_full_disk_fails_with_one_line_and_leaves_nothing(scene, tmp_path, monkeypatch):
    from geoexplora.io import chips

    _disk_full_after(monkeypatch, chips, "write_chip", calls=3)
    before = digest(tmp_path)
    code, _, err = run_cli("-q", "tile", str(scene), "-o", str(tmp_path / "c"), "--size", "32")
    assert code == 1 and error_line(err) == f"geoexplora: error: {FULL}"
    assert digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_tile_whose_pixel_sample_meets_a_full_disk_fails_with_one_line(
    scene, tmp_path, monkeypatch
):
    """numpy's writer says only "N requested and M written" (no errno) when the disk fills: the
    fault matrix's 2 MiB tmpfs met it at the statistics sample, and printed a traceback."""
    from collections import namedtuple

    import numpy as np

    from geoexplora.io import outputs

    def short_write(*args, **kwargs):
        raise OSError("2600208 requested and 370656 written")

    monkeypatch.setattr(np, "save", short_write)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage(1, 1, 0))
    before = digest(tmp_path)
    code, _, err = run_cli("-q", "tile", str(scene), "-o", str(tmp_path / "c"), "--size", "32")
    line = error_line(err)
    assert code == 1 and line.startswith("geoexplora: error: ") and "Traceback" not in err
    assert "stats_sample.npy: no space left on device; free some space" in line
    assert digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_predict_on_a_full_disk_fails_with_one_line_and_resumes(
    model, scene, tmp_path, monkeypatch
):
    from geoexplora.io.writers import StripStore

    out = tmp_path / "p.tif"
    _disk_full_after(monkeypatch, StripStore, "_write_strip")
    before = digest(scene)
    code, _, err = run_cli("-q", "predict", str(model), str(scene), "-o", str(out))
    assert code == 1 and error_line(err) == f"geoexplora: error: {FULL}"
    assert not out.exists() and digest(scene) == before
    monkeypatch.undo()
    code, _, err = run_cli("-q", "predict", str(model), str(scene), "-o", str(out), "--resume")
    assert code == 0, err


def test_adapt_on_a_full_disk_fails_with_one_line_and_leaves_no_temporary_file(
    scene, tmp_path, monkeypatch
):
    import torch

    _disk_full_after(monkeypatch, torch, "save")
    before = digest(scene)
    code, _, err = run_cli(
        "-q",
        "adapt",
        str(scene),
        "-o",
        str(tmp_path / "m.pt"),
        "--init",
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B2,B3,B4,B8",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--crop-size",
        "56",
        "--num-workers",
        "0",
    )
    assert code == 1 and error_line(err) == f"geoexplora: error: {FULL}"
    assert digest(scene) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert not (tmp_path / "m.pt").exists()


def test_tile_refuses_a_crs_proj_does_not_know(scene, tmp_path):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "tile", str(scene), "-o", str(tmp_path / "c"), "--size", "32", "--crs", "EPSG:99999"
    )
    assert code == 2 and error_line(err).endswith(
        "--crs EPSG:99999: not a coordinate reference system PROJ knows (e.g. EPSG:32633)"
    )
    assert digest(tmp_path) == before


@pytest.fixture
def chips_missing_one(tmp_path) -> tuple[Path, str]:
    """A labelled chips dataset one of whose chip files was deleted after tiling."""
    import pandas as pd
    from factories import make_chips_dataset

    from geoexplora.io.chips import INDEX_NAME

    root = make_chips_dataset(tmp_path, "classification", size=28, split_block=14)
    rel = pd.read_parquet(root / INDEX_NAME)["path"].iloc[-1]
    (root / rel).unlink()
    return root, rel


@pytest.mark.parametrize("verb", ["finetune", "probe"])
def test_a_deleted_chip_is_found_before_training(model, chips_missing_one, tmp_path, verb):
    from geoexplora.io.chips import INDEX_NAME

    root, rel = chips_missing_one
    before = digest(tmp_path)
    args = (
        ["finetune", str(model), str(root), "-o", str(tmp_path / "f.pt")]
        if verb == "finetune"
        else ["probe", str(model), str(root), "--no-cache"]
    )
    code, _, err = run_cli(*args)
    assert code == 2 and error_line(err).endswith(
        f"{root / INDEX_NAME} names {rel}, missing from the dataset folder; tile it again"
    )
    assert digest(tmp_path) == before


# --- case 9: messages that misled -----------------------------------------------------------


def test_demo_can_start_from_a_model_file(model, tmp_path):
    """``demo --init MODEL.pt`` used to be told "--init-weights cannot be used with it" though
    it was not given: the model file is the source, with its own weights."""
    import torch
    from factories import make_chips_dataset

    from geoexplora.models.file import load_model
    from geoexplora.pipelines.demo import DemoConfig, _source, _write_source_model

    init, weights, note = _source(DemoConfig(output=tmp_path / "d", init=str(model)))
    assert (init, weights, note) == (str(model), None, f"source: the model file {model}")
    chips = make_chips_dataset(tmp_path, "unlabeled", size=28, bands=["B2", "B3", "B4", "B8"])
    source = load_model(_write_source_model(tmp_path / "source.pt", init, weights, chips))
    original = load_model(model).backbone
    block = "vit.blocks.0.attn.qkv.weight"
    assert torch.equal(source.state_dict()[block], original.state_dict()[block])


def test_demo_refuses_init_weights_with_a_model_file(model, tmp_path):
    code, _, err = run_cli(
        "demo", "--out", str(tmp_path / "d"), "--init", str(model), "--init-weights", "random"
    )
    assert code == 2 and error_line(err).endswith(
        f"--init {model} is a model file; it carries its own weights, so drop --init-weights"
    )
    assert not (tmp_path / "d").exists()


# --- case 10: library warnings go through the logger ----------------------------------------


def test_library_warnings_stay_off_stderr_unless_verbose(tmp_path):
    """rasterio's NotGeoreferencedWarning on a raster without a geotransform: without -v the
    error is the only line; with -v the warning is logged (a separate process: pytest keeps
    warnings to itself)."""
    import subprocess
    import sys

    import numpy as np
    import rasterio
    from conftest import ROOT

    path = tmp_path / "nogeo.tif"
    with (
        pytest.warns(rasterio.errors.NotGeoreferencedWarning),
        rasterio.open(
            path, "w", driver="GTiff", width=32, height=32, count=3, dtype="uint16"
        ) as dst,
    ):
        dst.write(np.ones((3, 32, 32), dtype="uint16"))
    before = digest(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "geoexplora.cli",
        "tile",
        str(path),
        "-o",
        str(tmp_path / "c"),
        "--size",
        "16",
        "--sensor",
        "rgb",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert quiet.returncode == 2
    assert error_line(quiet.stderr) == (
        f"geoexplora: error: {path}: has no CRS; assign the one it was made in first "
        f"(gdal_edit.py -a_srs EPSG:<code> {path.name})"
    )
    verbose = subprocess.run(
        [*cmd[:3], "-v", *cmd[3:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert verbose.returncode == 2 and "NotGeoreferencedWarning" in verbose.stderr
    assert digest(tmp_path) == before


# --- case 1: the memory guard ---------------------------------------------------------------


@pytest.mark.parametrize("verb", ["predict", "embed"])
def test_a_plan_that_cannot_fit_in_memory_is_refused_before_allocating(
    model, scene, tmp_path, monkeypatch, verb
):
    """A machine with 8 GiB available: --window 14000 (about 190 GiB of windows in flight) is
    refused at once with its estimate; the default window runs; --dry-run still shows the plan."""
    import json

    from geoexplora import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * 2**30)
    out = tmp_path / "o.tif"
    before = digest(tmp_path)
    code, _, err = run_cli("-q", verb, str(model), str(scene), "-o", str(out), "--window", "14000")
    line = error_line(err)
    assert code == 2 and f"{out} (--window 14000, --batch-size 8) needs about " in line
    assert line.endswith(
        "of memory; this machine has 8.0 GiB available; use a smaller --window "
        "or --batch-size (--dry-run shows the estimate)"
    )
    needs = float(line.split("needs about ")[1].split(" GiB")[0])
    assert needs > 0.8 * 8
    assert digest(tmp_path) == before
    code, doc, err = run_cli(
        "-q",
        verb,
        str(model),
        str(scene),
        "-o",
        str(out),
        "--window",
        "14000",
        "--dry-run",
        "--json",
    )
    assert code == 0, err
    total = json.loads(doc)["results"][0]["memory"]["total_bytes"]
    assert round(total / 2**30, 1) == needs and digest(tmp_path) == before
    assert run_cli("-q", verb, str(model), str(scene), "-o", str(out))[0] == 0


def test_tile_dry_run_with_a_plan_that_cannot_fit_is_refused_before_listing_it(
    tmp_path, monkeypatch
):
    """The issue's case: 0.001 m pixels make 1.3e9 candidate chips (OOM-killed at 24 GB, in a
    dry run); now refused at once (a machine with 64 GiB available; the estimate is 719 GiB)."""
    from geoexplora import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**30)
    scene = sample.slovenia_scenes()[0]
    code, _, err = run_cli(
        "tile",
        str(scene),
        "--bands",
        "B2,B3",
        "--resolution",
        "0.001",
        "--size",
        "28",
        "-o",
        str(tmp_path / "t"),
        "--dry-run",
    )
    line = error_line(err)
    assert (
        code == 2
        and "listing 1,287,233,090 candidate chips of 28 px (stride 28) needs "
        "about 719.3 GiB of memory; this machine has 64.0 GiB "
        in line
    )
    assert line.endswith(
        "available; use a larger --resolution (coarser pixels), --size or --stride, or an --aoi"
    )
    assert not (tmp_path / "t").exists()


def test_a_sensor_preset_of_another_band_count_says_so_and_how_to_name_the_bands(tmp_path):
    """A 3-band Landsat-8 export with --sensor landsat8 was told to "pass --sensor"."""
    import numpy as np
    import rasterio
    from affine import Affine

    path = tmp_path / "l8_rgb.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(30, 0, 500000, 0, -30, 5100000),
    ) as dst:
        dst.write(np.full((3, 64, 64), 9000, dtype="uint16"))
    before = digest(tmp_path)
    code, _, err = run_cli(
        "tile", str(path), "--sensor", "landsat8", "-o", str(tmp_path / "c"), "--size", "28"
    )
    assert code == 2 and error_line(err).endswith(
        "--sensor landsat8: the preset describes a 7-band stack, l8_rgb.tif has 3 band(s) "
        "without descriptions; name them with --band-map 1=B2,2=B3,3=B4"
    )
    assert digest(tmp_path) == before
    code, _, err = run_cli(
        "-q",
        "tile",
        str(path),
        "--sensor",
        "landsat8",
        "--band-map",
        "1=B2,2=B3,3=B4",
        "-o",
        str(tmp_path / "c"),
        "--size",
        "28",
    )
    assert code == 0, err


def _labels_over(scene: Path, path: Path, classes: list, crs_member: bool = True) -> Path:
    """Vertical stripes over ``scene`` as GeoJSON, one per class value (None: a null value)."""
    import json

    import rasterio

    with rasterio.open(scene) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs.to_string()
    width = (right - left) / len(classes)
    features = [
        {
            "type": "Feature",
            "properties": {"cls": name},
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [
                        [left + i * width, bottom],
                        [left + (i + 1) * width, bottom],
                        [left + (i + 1) * width, top],
                        [left + i * width, top],
                        [left + i * width, bottom],
                    ]
                ],
            },
        }
        for i, name in enumerate(classes)
    ]
    doc = {"type": "FeatureCollection", "features": features}
    if crs_member:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def test_labels_without_a_class_value_are_counted_in_a_warning(scene, tmp_path):
    labels = _labels_over(scene, tmp_path / "lab.geojson", ["water", None, "crop", None])
    code, _, err = run_cli(
        "tile",
        str(scene),
        "--labels",
        str(labels),
        "--label-field",
        "cls",
        "--size",
        "32",
        "-o",
        str(tmp_path / "c"),
    )
    assert code == 0, err
    assert "labels lab.geojson: 2 of 4 features have no 'cls' value and are left out" in " ".join(
        err.split()
    )


def test_projected_coordinates_in_a_geojson_without_crs_are_named(scene, tmp_path):
    labels = _labels_over(scene, tmp_path / "lab.geojson", ["water", "crop"], crs_member=False)
    before = digest(tmp_path)
    code, _, err = run_cli(
        "tile",
        str(scene),
        "--labels",
        str(labels),
        "--label-field",
        "cls",
        "--size",
        "32",
        "-o",
        str(tmp_path / "c"),
    )
    assert code == 2 and error_line(err).endswith(
        f"--labels {labels}: its coordinates do not fit its CRS EPSG:4326 (GeoJSON without a "
        "'crs' member is lon/lat WGS 84); give the file its real CRS"
    )
    assert digest(tmp_path) == before


@pytest.fixture
def labelled_chips(tmp_path) -> Path:
    from factories import make_chips_dataset

    return make_chips_dataset(tmp_path / "data", "classification", size=28, split_block=14)


def test_finetune_with_a_batch_that_cannot_fit_is_refused_before_its_first_step(
    model, labelled_chips, tmp_path, monkeypatch
):
    """The issue's ``finetune A C --batch-size 100000`` hung at 3 GB (ignoring SIGTERM, deep in
    collating one step's batch): now refused at once on a machine with 8 GiB available."""
    from geoexplora import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * 2**30)
    before = digest(tmp_path)
    code, _, err = run_cli(
        "-q",
        "finetune",
        str(model),
        str(labelled_chips),
        "-o",
        str(tmp_path / "f.pt"),
        "--batch-size",
        "100000",
        "--num-workers",
        "1",
    )
    line = error_line(err)
    assert code == 2 and "training 28 px chips with --batch-size 100000 needs about " in line
    assert line.endswith(
        "of memory; this machine has 8.0 GiB available; use a smaller "
        "--batch-size (--accumulate keeps the global batch)"
    )
    assert float(line.split("needs about ")[1].split(" GiB")[0]) > 0.8 * 8
    assert digest(tmp_path) == before


def test_training_estimate_counts_activations_only_where_gradients_flow(model, labelled_chips):
    """A frozen backbone (linear probing) keeps one block's activations, LoRA all of them."""
    from geoexplora import memory
    from geoexplora.io.chips import ChipsDataset
    from geoexplora.pipelines.finetune import build_task_model, parameterise
    from geoexplora.train.features import ModelInputs, backbone_for_dataset

    chips = ChipsDataset(labelled_chips, split="train")
    estimates = {}
    for mode in ("linear", "lora"):
        backbone, band_index = backbone_for_dataset(model, chips)
        task_model = build_task_model(backbone, "classification", [{"name": "a"}, {"name": "b"}])
        parameterise(task_model, mode, 4, 4.0)
        sample = ModelInputs(chips, band_index)[0]
        estimates[mode] = memory.training_estimate(
            task_model,
            backbone,
            10,
            memory.sample_bytes(sample),
            memory.vit_tokens(backbone, 28),
            "32-true",
            1,
        )
    tokens = 1 + (28 // 14) ** 2
    one_block = 10 * tokens * 34 * backbone.embed_dim * 4 // 2
    assert estimates["linear"]["activations_bytes"] == one_block
    assert estimates["lora"]["activations_bytes"] == one_block * backbone.depth
    assert estimates["linear"]["input_batches_bytes"] == 10 * memory.sample_bytes(sample)
    assert 0 < estimates["linear"]["gradients_bytes"] < estimates["lora"]["gradients_bytes"]


def test_probe_extraction_that_cannot_fit_is_refused_before_extracting(
    model, labelled_chips, tmp_path, monkeypatch
):
    from geoexplora import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 2**19)
    before = digest(tmp_path)
    code, _, err = run_cli(
        "-q", "probe", str(model), str(labelled_chips), "--no-cache", "--extract-batch-size", "16"
    )
    line = error_line(err)
    assert (
        code == 2
        and "extracting features of 28 px chips with --extract-batch-size 16 needs about " in line
    )
    assert line.endswith("this machine has 0.0 GiB available; use a smaller --extract-batch-size")
    assert digest(tmp_path) == before


def test_adapt_with_a_batch_that_cannot_fit_is_refused_before_its_first_step(
    scene, tmp_path, monkeypatch
):
    from geoexplora import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * 2**30)
    before = digest(tmp_path)
    code, _, err = run_cli(
        "-q",
        "adapt",
        str(scene),
        "-o",
        str(tmp_path / "m.pt"),
        "--init",
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B2,B3,B4,B8",
        "--batch-size",
        "100000",
        "--crop-size",
        "56",
        "--num-workers",
        "0",
    )
    line = error_line(err)
    assert code == 2 and "adapting 56 px crops with --batch-size 100000 needs about " in line
    assert line.endswith(
        "this machine has 8.0 GiB available; use a smaller --batch-size "
        "(--accumulate keeps the global batch) or --crop-size"
    )
    assert digest(tmp_path) == before


# --- case 9: creation options checked against the GDAL driver -------------------------------


def test_tile_refuses_a_compression_its_driver_does_not_have(scene, tmp_path):
    """``--co COMPRESS=BOGUS`` was silently ignored (GDAL warns, then writes uncompressed)."""
    before = digest(tmp_path)
    code, _, err = run_cli(
        "tile", str(scene), "-o", str(tmp_path / "c"), "--size", "32", "--co", "COMPRESS=BOGUS"
    )
    line = error_line(err)
    assert code == 2 and line.startswith(
        "geoexplora: error: --co: COMPRESS=BOGUS: GDAL's GTiff driver takes COMPRESS one of "
    )
    assert "DEFLATE" in line and "ZSTD" in line
    assert digest(tmp_path) == before and not (tmp_path / "c").exists()


def test_tile_writes_the_compression_it_is_given(scene, tmp_path):
    import rasterio

    out = tmp_path / "c"
    code, _, err = run_cli(
        "-q", "tile", str(scene), "-o", str(out), "--size", "32", "--co", "compress=zstd"
    )
    assert code == 0, err
    chip = next(out.rglob("*.tif"))
    with rasterio.open(chip) as src:
        assert src.compression.name.upper() == "ZSTD"


@pytest.mark.parametrize(
    "co, line",
    [
        (
            "BOGUS=1",
            (
                "--co: BOGUS=1: GDAL's COG driver has no creation option BOGUS (see "
                "gdalinfo --format COG)"
            ),
        ),
        (
            "TILED=YES",
            (
                "--co: TILED=YES: GDAL's COG driver has no creation option TILED (see "
                "gdalinfo --format COG)"
            ),
        ),
        ("LEVEL=high", "--co: LEVEL=high: LEVEL takes an integer"),
    ],
)
def test_predict_refuses_a_creation_option_the_cog_driver_does_not_take(
    model, scene, tmp_path, co, line
):
    before = digest(tmp_path)
    code, _, err = run_cli(
        "predict", str(model), str(scene), "-o", str(tmp_path / "p.tif"), "--co", co
    )
    assert code == 2 and error_line(err) == f"geoexplora: error: {line}"
    assert digest(tmp_path) == before


def _byte_scene(path: Path, bands: list[str]) -> Path:
    """An 8-bit Sentinel-2 export (values 0..255) whose bands are named by description."""
    import numpy as np
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=56,
        height=56,
        count=len(bands),
        dtype="uint8",
        crs="EPSG:32633",
        transform=Affine(10, 0, 500000, 0, -10, 5100000),
    ) as dst:
        dst.write(rng.integers(0, 256, (len(bands), 56, 56), dtype="uint8"))
        dst.descriptions = tuple(bands)
    return path


def test_an_8_bit_input_meeting_a_model_of_another_scale_is_warned_about_once(model, tmp_path):
    """Reflectance x 255 in a uint8 file was read as DN with no hint."""
    scene = _byte_scene(tmp_path / "rgb8.tif", ["B2", "B3", "B4", "B8"])
    before = digest(scene)
    code, _, err = run_cli(
        "predict", str(model), str(scene), "-o", str(tmp_path / "p.tif"), "--sensor", "sentinel2"
    )
    assert code == 0, err
    text = " ".join(err.split())
    assert text.count("8-bit band(s) read as they are") == 1
    assert (
        f"rgb8.tif: 8-bit band(s) read as they are, but {model} was trained on means above "
        "255 (B2 " in text
    )
    assert "if the file holds reflectance x 255, rescale it to the model's units first" in text
    assert digest(scene) == before


def test_a_16_bit_input_is_not_warned_about(model, scene, tmp_path):
    code, _, err = run_cli("predict", str(model), str(scene), "-o", str(tmp_path / "p.tif"))
    assert code == 0, err
    assert "8-bit" not in err


def test_a_band_described_twice_is_not_told_to_pass_the_sensor_it_was_given(tmp_path):
    import numpy as np
    import rasterio
    from affine import Affine

    path = tmp_path / "dup.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=4,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(10, 0, 500000, 0, -10, 5100000),
    ) as dst:
        dst.write(np.full((4, 64, 64), 900, dtype="uint16"))
        dst.descriptions = ("B2", "B2", "B4", "B8")
    before = digest(tmp_path)
    code, _, err = run_cli(
        "tile", str(path), "--sensor", "sentinel2", "-o", str(tmp_path / "c"), "--size", "28"
    )
    assert code == 2 and error_line(err) == (
        "geoexplora: error: band B2 appears 2 times: dup.tif#1 (sentinel2:B2), dup.tif#2 "
        "(sentinel2:B2); say which band each one is with --band-map (e.g. --band-map "
        "1=B2,2=B3,...)"
    )
    assert digest(tmp_path) == before
    code, _, err = run_cli(
        "-q",
        "tile",
        str(path),
        "--sensor",
        "sentinel2",
        "--band-map",
        "1=B2,2=B3,3=B4,4=B8",
        "-o",
        str(tmp_path / "c"),
        "--size",
        "28",
    )
    assert code == 0, err


def test_proj_messages_stay_off_stderr_unless_verbose(scene, tmp_path):
    """``tile --crs EPSG:99999`` printed GDAL's raw ``ERROR 1: PROJ: ... crs not found`` before
    the error line (a separate process: GDAL writes to the process's own stderr)."""
    import subprocess
    import sys

    from conftest import ROOT

    before = digest(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "geoexplora.cli",
        "tile",
        str(scene),
        "-o",
        str(tmp_path / "c"),
        "--size",
        "32",
        "--crs",
        "EPSG:99999",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert quiet.returncode == 2 and error_line(quiet.stderr) == (
        "geoexplora: error: --crs EPSG:99999: not a coordinate reference system PROJ knows "
        "(e.g. EPSG:32633)"
    )
    verbose = subprocess.run(
        [*cmd[:3], "-v", *cmd[3:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert verbose.returncode == 2
    assert "PROJ: internal_proj_create_from_database: crs not found: EPSG:99999" in verbose.stderr
    assert "ERROR 1:" not in verbose.stderr
    assert digest(tmp_path) == before


# --- Also: SIGTERM / SIGINT at a random step, then --resume, bit-exact ------------------------


def _signal_after_step(monkeypatch, signum: int, step: int) -> None:
    """The training loop receives ``signum`` once its step ``step`` has run."""
    import signal as _signal  # noqa: F401 - signum is one of its values

    from geoexplora.train import engine as E

    original = E.TrainLoop._train_step
    done = []

    def step_then_signal(self, loader_iter):
        out = original(self, loader_iter)
        done.append(1)
        if len(done) == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(E.TrainLoop, "_train_step", step_then_signal)


def _weights(path: Path) -> dict:
    from geoexplora.models.file import load_model

    return load_model(path).state_dict()


TRAIN_STEPS = 6


def _train_args(verb: str, model: Path, scene: Path, chips: Path, out: Path) -> list[str]:
    if verb == "adapt":
        return [
            "-q",
            "adapt",
            str(scene),
            "-o",
            str(out),
            "--init",
            TINY,
            "--init-weights",
            "random",
            "--bands",
            "B2,B3,B4,B8",
            "--steps",
            str(TRAIN_STEPS),
            "--batch-size",
            "2",
            "--crop-size",
            "56",
            "--num-workers",
            "0",
            "--seed",
            "3",
        ]
    return [
        "-q",
        "finetune",
        str(model),
        str(chips),
        "-o",
        str(out),
        "--steps",
        str(TRAIN_STEPS),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--seed",
        "3",
    ]


@pytest.mark.parametrize(
    "verb, signame",
    [("adapt", "SIGTERM"), ("adapt", "SIGINT"), ("finetune", "SIGTERM"), ("finetune", "SIGINT")],
)
def test_a_signal_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    model, scene, labelled_chips, tmp_path, monkeypatch, verb, signame
):
    """The step is drawn (seeded, so a failure replays) from 1..steps-1."""
    import random
    import signal

    import torch

    step = random.Random(f"{verb}-{signame}").randrange(1, TRAIN_STEPS)
    reference, out = tmp_path / "reference.pt", tmp_path / "resumed.pt"
    code, _, err = run_cli(*_train_args(verb, model, scene, labelled_chips, reference))
    assert code == 0, err
    inputs = digest(scene, labelled_chips, model)
    _signal_after_step(monkeypatch, getattr(signal, signame), step)
    code, _, err = run_cli(*_train_args(verb, model, scene, labelled_chips, out))
    assert code == 130 and error_line(err) == (
        f"geoexplora: error: interrupted at step {step}/{TRAIN_STEPS}: checkpoint "
        f"{out.with_suffix('.ckpt')}; continue with --resume"
    )
    assert not out.exists()
    monkeypatch.undo()
    code, _, err = run_cli(*_train_args(verb, model, scene, labelled_chips, out), "--resume")
    assert code == 0, err
    want, got = _weights(reference), _weights(out)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name
    assert digest(scene, labelled_chips, model) == inputs


# --- Also: --shard 1/2 + 2/2 merged vs one run ------------------------------------------------


def test_predict_shards_merged_are_byte_identical_to_one_run(model, tmp_path):
    """A 600-row scene is 3 strips: shard 2/2 writes its strips and leaves the output partial,
    shard 1/2 completes it; the files equal a single run's, byte for byte."""
    import json

    import numpy as np
    import rasterio
    from affine import Affine

    scene = tmp_path / "tall.tif"
    rng = np.random.default_rng(1)
    with rasterio.open(
        scene,
        "w",
        driver="GTiff",
        width=70,
        height=600,
        count=4,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(10, 0, 500000, 0, -10, 5100000),
    ) as dst:
        dst.write(rng.integers(200, 4000, (4, 600, 70), dtype="uint16"))
        dst.descriptions = ("B2", "B3", "B4", "B8")
    before = digest(scene)
    single, sharded = tmp_path / "single.tif", tmp_path / "sharded.tif"
    common = ["--probabilities", "--sensor", "sentinel2", "--json"]
    code, _, err = run_cli("-q", "predict", str(model), str(scene), "-o", str(single), *common)
    assert code == 0, err
    code, out, err = run_cli(
        "-q", "predict", str(model), str(scene), "-o", str(sharded), "--shard", "2/2", *common
    )
    assert code == 0 and json.loads(out)["results"][0]["status"] == "partial", err
    assert not sharded.exists()
    code, out, err = run_cli(
        "-q", "predict", str(model), str(scene), "-o", str(sharded), "--shard", "1/2", *common
    )
    assert code == 0 and json.loads(out)["results"][0]["status"] == "complete", err
    for name in ("{}.tif", "{}_probabilities.tif"):
        a, b = (tmp_path / name.format(k) for k in ("single", "sharded"))
        assert hashlib.md5(a.read_bytes()).hexdigest() == hashlib.md5(b.read_bytes()).hexdigest()
    assert not (tmp_path / ".sharded.tif.parts").exists() and digest(scene) == before


# --- Also: a full disk (ENOSPC) in the verbs not covered above --------------------------------


def test_finetune_on_a_full_disk_fails_with_one_line_and_resumes(
    model, labelled_chips, tmp_path, monkeypatch
):
    """The disk fills while the final model file is written (the 2nd torch.save, after the
    checkpoint): one line, no model file and no temporary one; the checkpoint is kept, so
    --resume finishes once there is space."""
    import torch

    out = tmp_path / "f.pt"
    args = _train_args("finetune", model, None, labelled_chips, out)
    inputs = digest(labelled_chips, model)
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (saves.append(1), real_save(*a, **k)))
    assert run_cli(*args)[0] == 0
    monkeypatch.undo()
    out.unlink()
    _disk_full_after(monkeypatch, torch, "save", calls=len(saves))
    code, _, err = run_cli(*args, "--overwrite")
    assert code == 1 and error_line(err) == f"geoexplora: error: {FULL}"
    assert not out.exists() and out.with_suffix(".ckpt").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or ".tmp" in p.name]
    monkeypatch.undo()
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert out.is_file() and digest(labelled_chips, model) == inputs


def test_embed_on_a_full_disk_fails_with_one_line_and_resumes(model, scene, tmp_path, monkeypatch):
    from geoexplora.io.writers import StripStore

    out = tmp_path / "e.tif"
    _disk_full_after(monkeypatch, StripStore, "_write_strip")
    before = digest(scene)
    code, _, err = run_cli("-q", "embed", str(model), str(scene), "-o", str(out))
    assert code == 1 and error_line(err) == f"geoexplora: error: {FULL}"
    assert not out.exists() and (tmp_path / ".e.tif.parts").is_dir()  # kept: resumable
    monkeypatch.undo()
    code, _, err = run_cli("-q", "embed", str(model), str(scene), "-o", str(out), "--resume")
    assert code == 0, err
    assert out.is_file() and not (tmp_path / ".e.tif.parts").exists()
    assert digest(scene) == before


def test_probe_save_head_on_a_full_disk_fails_with_one_line_and_writes_nothing(
    model, labelled_chips, tmp_path, monkeypatch
):
    import torch

    head = tmp_path / "head.pt"
    inputs = digest(labelled_chips, model)
    _disk_full_after(monkeypatch, torch, "save")
    code, _, err = run_cli(
        "-q",
        "probe",
        str(model),
        str(labelled_chips),
        "--no-cache",
        "--features",
        "cls,cls+mean",
        "--save-head",
        str(head),
    )
    assert code == 1 and error_line(err) == f"geoexplora: error: {FULL}"
    assert not head.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert digest(labelled_chips, model) == inputs


def test_tile_append_on_a_full_disk_fails_with_one_line_and_keeps_the_dataset(
    scene, tmp_path, monkeypatch
):
    from geoexplora.io import chips

    out = tmp_path / "c"
    assert run_cli("-q", "tile", str(scene), "-o", str(out), "--size", "32")[0] == 0
    other = tmp_path / "other.tif"
    shutil.copyfile(scene, other)
    before = digest(tmp_path)
    _disk_full_after(monkeypatch, chips, "write_chip", calls=2)
    code, _, err = run_cli("-q", "tile", str(other), "-o", str(out), "--size", "32", "--append")
    assert code == 1 and error_line(err) == f"geoexplora: error: {FULL}"
    assert digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c",
        "c.config.yaml",
        "in.tif",
        "other.tif",
    ]


# --- Also: a real full disk (a 256 KiB tmpfs, mounted when the tests run as root) ------------


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: room for a few chips, not for a model file or a scene's strips."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected ENOSPC tests above cover this")
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("verb", ["tile", "predict", "adapt", "finetune"])
def test_a_real_full_disk_gives_one_line_and_no_traceback(
    model, scene, labelled_chips, full_disk, tmp_path, verb
):
    """In a separate process, so GDAL's and libtiff's own writes to stderr are seen too."""
    import subprocess
    import sys

    from conftest import ROOT

    args = {
        "tile": ["tile", str(scene), "-o", str(full_disk / "c"), "--size", "32"],
        "predict": [
            "predict",
            str(model),
            str(scene),
            "-o",
            str(full_disk / "p.tif"),
            "--probabilities",
        ],
        "adapt": _train_args("adapt", model, scene, labelled_chips, full_disk / "a.pt")[1:],
        "finetune": _train_args("finetune", model, scene, labelled_chips, full_disk / "f.pt")[1:],
    }[verb]
    inputs = digest(scene, labelled_chips, model)

    def run():
        done = subprocess.run(
            [sys.executable, "-m", "geoexplora.cli", "-q", *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        )
        lines = done.stderr.splitlines()
        if verb == "predict":  # libtiff's own default handler writes this line itself (GDAL's
            # handler, which rasterio routes to the logger, never sees it): known, left alone
            assert lines[0] == "_tiffWriteProc: No space left on device.", done.stderr
            lines = lines[1:]
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith("geoexplora: error: ") and lines[0].endswith(
            "no space left on device; free some space and run again (--resume continues an "
            "interrupted predict, embed, adapt or finetune)"
        )

    run()
    left = sorted(p.name for p in full_disk.iterdir())
    logs = {"adapt": ["a.log.jsonl"], "finetune": ["f.log.jsonl"]}
    assert left == {"tile": [], "predict": [".p.tif.parts"], **logs}[verb], left
    assert not [p for p in full_disk.rglob("*") if p.name.endswith(".partial")]
    if verb in logs:  # a log without a checkpoint does not block a plain rerun
        run()
    assert digest(scene, labelled_chips, model) == inputs


def test_finetune_with_a_batch_far_larger_than_its_train_split_is_refused(
    model, labelled_chips, tmp_path
):
    """A batch that fits in memory but repeats a few chips 100 000 times a step ran for hours
    (the issue's ``--batch-size 100000`` on a machine with the memory for it)."""
    before = digest(tmp_path)
    code, _, err = run_cli(
        "-q",
        "finetune",
        str(model),
        str(labelled_chips),
        "-o",
        str(tmp_path / "f.pt"),
        "--batch-size",
        "5000",
        "--num-workers",
        "1",
    )
    line = error_line(err)
    assert code == 2 and line.startswith(
        "geoexplora: error: --batch-size: 5000 is larger than the train split of "
    )
    assert line.endswith("labelled chips)")
    assert digest(tmp_path) == before
