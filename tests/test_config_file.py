"""--config FILE.yaml and --print-config, on every verb: the verb's own options are the schema."""

import pytest
import yaml
from conftest import run_cli


def _args(tmp_path) -> dict[str, list[str]]:
    """Each verb's required arguments, as files that exist (only parsed, never run)."""
    model, chips, raster = tmp_path / "m.pt", tmp_path / "chips", tmp_path / "a.tif"
    model.write_bytes(b"")
    chips.mkdir()
    raster.write_bytes(b"")
    out = str(tmp_path / "out")
    return {
        "info": [str(raster)],
        "tile": [str(raster), "-o", out],
        "adapt": [str(raster), "-o", out],
        "probe": [str(model)],
        "finetune": [str(model), str(chips), "-o", out],
        "predict": [str(model), str(raster), "-o", out],
        "embed": [str(model), str(raster), "-o", out],
        "demo": [],
        "models": [],
        "export": [str(model), "-o", out],
    }


def test_every_verb_round_trips_print_config_through_config(tmp_path):
    import typer.main

    from geoexplora.cli import app

    verbs = _args(tmp_path)
    assert set(verbs) == set(typer.main.get_command(app).commands)
    for verb, args in verbs.items():
        code, printed, err = run_cli(verb, *args, "--print-config")
        assert code == 0, (verb, err)
        resolved = yaml.safe_load(printed)
        assert "help" not in resolved and "print_config" not in resolved
        path = tmp_path / f"{verb}.yaml"
        path.write_text(printed)
        code, again, err = run_cli(verb, "--config", str(path), "--print-config")
        assert code == 0, (verb, err)
        assert again == printed, verb


def test_print_config_includes_defaults_and_flags_override_the_file(tmp_path):
    args = _args(tmp_path)["adapt"]
    path = tmp_path / "adapt.yaml"
    path.write_text("lr: 0.002\nbatch_size: 4\nseed: 7\n")
    code, out, err = run_cli("adapt", *args, "--seed", "3", "--config", str(path), "--print-config")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["lr"] == 0.002 and resolved["batch_size"] == 4  # from the file
    assert resolved["seed"] == 3  # the flag wins, wherever it is typed
    assert resolved["lora_rank"] == 64 and resolved["crop_size"] == 224  # defaults included
    assert resolved["output"] == args[-1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batchsize: 4\n", "unknown key 'batchsize' for 'geoexplora adapt'"),
        ("batch_size: many\n", "key 'batch_size': Input should be a valid integer"),
        ("full: maybe\n", "key 'full': Input should be a valid boolean"),
        ("- lr\n", "expected a mapping of option names to values"),
        ("lr: [1\n", "not YAML"),
    ],
)
def test_bad_config_is_one_line_naming_the_key_and_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run_cli("adapt", *_args(tmp_path)["adapt"], "--config", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(path) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_named(tmp_path):
    code, _, err = run_cli("info", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and f"--config {tmp_path / 'none.yaml'}:" in err


def test_a_run_keeps_its_resolved_config_next_to_its_output_and_reruns_from_it(tmp_path):
    from geoexplora import sample

    out = tmp_path / "chips"
    code, _, err = run_cli("tile", str(sample.slovenia_scenes()[0]), "-o", str(out), "--size", "32")
    assert code == 0, err
    sidecar = tmp_path / "chips.config.yaml"
    kept = yaml.safe_load(sidecar.read_text())
    assert kept["output"] == str(out) and kept["size"] == 32 and "print_config" not in kept
    assert sidecar.read_text().startswith("# geoexplora tile (geoexplora ")
    code, printed, err = run_cli("tile", "--config", str(sidecar), "--print-config")
    assert code == 0, err
    assert yaml.safe_load(printed) == kept
    code, _, err = run_cli("tile", "--config", str(sidecar), "-o", str(tmp_path / "again"))
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "again.config.yaml").read_text())["output"] == str(
        tmp_path / "again"
    )


def test_a_failed_run_writes_no_config(tmp_path):
    code, _, _ = run_cli("tile", str(tmp_path / "none.tif"), "-o", str(tmp_path / "chips"))
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def test_an_adapted_model_file_carries_the_resolved_config_in_its_provenance(tmp_path):
    import torch
    from factories import TINY, timm_model

    from geoexplora import sample
    from geoexplora.models.file import read_model_meta

    weights = tmp_path / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), weights)
    out = tmp_path / "adapted.pt"
    code, _, err = run_cli(
        "adapt",
        str(sample.slovenia_scenes()[0]),
        "-o",
        str(out),
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
        "--bands",
        "B2,B3,B4,B8",
        "-q",
    )
    assert code == 0, err
    config = read_model_meta(out)["provenance"]["config"]
    assert config["command"] == "adapt"
    assert config["options"] == yaml.safe_load((tmp_path / "adapted.config.yaml").read_text())
    assert config["options"]["steps"] == 1 and config["options"]["crop_size"] == 56
