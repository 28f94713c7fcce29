"""The shell experience of every command, end to end: help examples, ``--json`` (one document on
stdout, logs and progress on stderr), ``-q``, exit codes (0, 2 bad input, 1 runtime failure), the
``--overwrite`` guard, and the rich progress display in a real terminal and behind a pipe.

In-process runs (``run_cli``) share one tiny model and chips dataset; the terminal tests run the
installed ``geoexplora`` script in a pseudo-terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli
from factories import make_chips_dataset

from geoexplora.sample import sample_dir

SCENE = sample_dir() / "slovenia" / "S2L1C_2015-07-11_13band_10m.tif"  # 100 x 101 px, EPSG:32633
BANDS = ["B2", "B3", "B4", "B8"]
CLASSES = [
    {"id": 0, "name": "water", "color": "#0000ff"},
    {"id": 1, "name": "crop", "color": "#ffff00"},
]
EMBED_DIM = 32
GEOEXPLORA = Path(sys.executable).parent / "geoexplora"  # the console script of this venv
ALL_COMMANDS = ("info", "tile", "adapt", "probe", "finetune", "predict", "embed", "demo")
RESULT_COMMANDS = ("info", "tile", "adapt", "probe", "finetune", "predict", "embed")
WRITING_COMMANDS = ("tile", "adapt", "probe", "finetune", "predict", "embed")
PROGRESS_BAR = "━"  # rich's BarColumn glyph
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Work:
    chips: Path
    backbone: Path
    task_model: Path


def write_tiny_models(folder: Path) -> tuple[Path, Path]:
    """(backbone file, segmentation task model file): depth 2, width 32, patch 14, 4 S2 bands."""
    import torch

    from geoexplora.models import build_backbone
    from geoexplora.models.file import save_model
    from geoexplora.models.heads import TaskModel, build_head

    torch.manual_seed(0)
    vit = build_backbone(
        "geo_vit_tiny_patch14",
        init_weights="random",
        bands=[f"sentinel2:{b}" for b in BANDS],
        img_size=56,
        arch_overrides={"depth": 2, "embed_dim": EMBED_DIM, "num_heads": 2},
    )
    backbone = save_model(folder / "backbone.pt", vit)
    head = build_head("segmentation", vit.embed_dim, len(CLASSES), hidden=16)
    task_model = save_model(folder / "task.pt", TaskModel(vit, head, "segmentation", CLASSES))
    return backbone, task_model


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    folder = tmp_path_factory.mktemp("shell")
    chips = make_chips_dataset(folder, "segmentation", size=28, bands=BANDS)
    return Work(chips, *write_tiny_models(folder))


OUTPUT_NAME = {
    "tile": "chips",
    "adapt": "out.pt",
    "probe": "head.pt",
    "finetune": "out.pt",
    "predict": "out.tif",
    "embed": "out.tif",
}


def invocation(command: str, work: Work, out: Path) -> list[str]:
    """A tiny, successful run of ``command`` writing ``out`` (ignored by info)."""
    train = ["--steps", "2", "--batch-size", "4", "--accelerator", "cpu", "--num-workers", "0"]
    args = {
        "info": ["info", SCENE],
        "tile": ["tile", SCENE, "--bands", ",".join(BANDS), "--size", "28", "-o", out],
        "adapt": [
            "adapt",
            work.chips,
            "-o",
            out,
            "--init",
            work.backbone,
            "--crop-size",
            "28",
            *train,
        ],
        "probe": [
            "probe",
            work.backbone,
            work.chips,
            "--steps",
            "5",
            "--learning-rates",
            "0.01",
            "--features",
            "cls",
            "--no-cache",
            "--device",
            "cpu",
            "--save-head",
            out,
        ],
        "finetune": ["finetune", work.backbone, work.chips, "-o", out, *train],
        "predict": ["predict", work.task_model, SCENE, "-o", out, "--device", "cpu"],
        "embed": ["embed", work.backbone, SCENE, "-o", out, "--device", "cpu"],
    }[command]
    return [str(a) for a in args]


@contextlib.contextmanager
def fd1_captured():
    """What is written to file descriptor 1 itself (C libraries, subprocesses), beside
    ``sys.stdout``; yields a list that holds the text afterwards."""
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(sink.fileno(), 1)
        try:
            yield text
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read())


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    fd1: str
    out: Path


@pytest.fixture(scope="module")
def json_run(work, tmp_path_factory):
    """``geoexplora CMD ... --json`` without -q (logs and progress on), once per command."""
    done: dict[str, Run] = {}

    def run(command: str) -> Run:
        if command not in done:
            out = tmp_path_factory.mktemp(f"json-{command}") / OUTPUT_NAME.get(command, "none")
            with fd1_captured() as fd1:
                code, stdout, stderr = run_cli(*invocation(command, work, out), "--json")
            done[command] = Run(code, stdout, stderr, fd1[0], out)
        return done[command]

    return run


def tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: relative path -> (size, mtime_ns, bytes)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_line_error(code: int, stdout: str, stderr: str, expected_code: int = 2) -> str:
    assert code == expected_code, stderr
    assert stdout == ""
    assert stderr.startswith("geoexplora: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    return stderr.removeprefix("geoexplora: error: ").strip()


# --- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_help_gives_an_example_of_the_command_itself(command):
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    assert re.search(rf"Example: geoexplora {command} \S", out), out


# --- --json: one document on stdout -----------------------------------------------------------


def check_info(doc, out):
    (scene,) = doc["files"]
    assert (scene["width"], scene["height"], scene["crs"]) == (100, 101, "EPSG:32633")


def check_tile(doc, out):
    assert doc["chips"] == 9 == sum(doc["splits"].values())  # 3 x 3 chips of 28 px in 100 x 101
    assert doc["chip_size"] == 28
    assert doc["bands"] == [f"sentinel2:{b}" for b in BANDS]
    assert (out / "dataset.json").is_file()


def check_adapt(doc, out):
    assert doc["output"] == str(out) and out.is_file()
    assert doc["steps"] == 2 and math.isfinite(doc["last_loss"])


def check_probe(doc, out):
    assert [m["name"] for m in doc["models"]] == ["backbone"]
    assert doc["models"][0]["saved_head"]["path"] == str(out) and out.is_file()
    assert 0 <= doc["models"][0]["top1"] <= 1


def check_finetune(doc, out):
    assert doc["output"] == str(out) and out.is_file()
    assert doc["task"] == "segmentation" and doc["training"]["steps"] == 2


def check_predict(doc, out):
    (result,) = doc["results"]
    assert result["status"] == "complete" and result["outputs"] == {"classes": str(out)}
    assert result["valid_pixels"] == 100 * 101  # the scene has no nodata


def check_embed(doc, out):
    import rasterio

    (result,) = doc["results"]
    assert result["outputs"] == {"embedding": str(out)}
    with rasterio.open(out) as src:
        assert src.count == EMBED_DIM
        assert (src.width, src.height) == (8, 8)  # one pixel per 14 px patch: ceil(100 / 14)
        assert result["valid_pixels"] == src.width * src.height


CHECKS = {
    "info": check_info,
    "tile": check_tile,
    "adapt": check_adapt,
    "probe": check_probe,
    "finetune": check_finetune,
    "predict": check_predict,
    "embed": check_embed,
}


@pytest.mark.parametrize("command", RESULT_COMMANDS)
def test_json_is_one_document_on_stdout_holding_the_results(command, json_run):
    run = json_run(command)
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)  # fails on anything before or after the one document
    CHECKS[command](doc, run.out)
    assert run.fd1 == ""  # nothing reached the real stdout behind Python's back


@pytest.mark.parametrize(
    "command",
    [
        "tile",
        "finetune",
        "predict",
        "embed",
        "adapt",
    ],
)
def test_progress_goes_to_stderr_with_bar_and_percentage(command, json_run):
    run = json_run(command)
    assert run.code == 0, run.stderr
    assert PROGRESS_BAR in run.stderr and "100%" in run.stderr
    assert PROGRESS_BAR not in run.stdout


@pytest.mark.parametrize("command", RESULT_COMMANDS)
def test_quiet_writes_nothing_to_stderr(command, work, tmp_path):
    out = tmp_path / OUTPUT_NAME.get(command, "none")
    code, stdout, stderr = run_cli("-q", *invocation(command, work, out))
    assert code == 0, stderr
    assert stderr == ""  # -q: errors only, so no progress bar and no INFO/WARNING lines
    assert stdout.strip()  # the results are still printed


# --- exit codes -------------------------------------------------------------------------------


MISSING = {  # command -> (arguments with one missing input, the missing path's name)
    "info": (["info", "{m}.tif"], "{m}.tif"),
    "tile": (["tile", "{m}.tif", "-o", "{o}"], "{m}.tif"),
    "adapt": (["adapt", "{m}", "-o", "{o}", "--init", "{backbone}"], "{m}"),
    "probe": (["probe", "{m}.pt", "{chips}"], "{m}.pt"),
    "finetune": (["finetune", "{backbone}", "{m}", "-o", "{o}"], "{m}"),
    "predict": (["predict", "{task_model}", "{m}.tif", "-o", "{o}"], "{m}.tif"),
    "embed": (["embed", "{m}.pt", str(SCENE), "-o", "{o}"], "{m}.pt"),
}


@pytest.mark.parametrize("command", RESULT_COMMANDS)
def test_missing_input_exits_2_with_one_line_naming_it(command, work, tmp_path):
    names = {
        "m": tmp_path / "missing",
        "o": tmp_path / "out" / "result",
        "chips": work.chips,
        "backbone": work.backbone,
        "task_model": work.task_model,
    }
    args, missing = MISSING[command]
    code, stdout, stderr = run_cli(*(a.format(**names) for a in args))
    message = assert_one_line_error(code, stdout, stderr)
    assert missing.format(**names) in message
    assert not (tmp_path / "out").exists()


BAD_OPTION = {  # command -> (extra arguments, the option the message must name)
    "tile": (["--bands", "B2,B99"], "B99"),
    "adapt": (["--objective", "nope"], "--objective"),
    "probe": (["--features", "nope"], "--features"),
    "finetune": (["--mode", "nope"], "--mode"),
    "predict": (["--window", "30"], "--window"),  # not a multiple of the 14 px patch
    "embed": (["--dtype", "int8"], "--dtype"),
}


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_bad_option_value_exits_2_naming_it_and_writes_nothing(command, work, tmp_path):
    extra, named = BAD_OPTION[command]
    out = tmp_path / OUTPUT_NAME[command]
    code, stdout, stderr = run_cli(*invocation(command, work, out), *extra)
    assert named in assert_one_line_error(code, stdout, stderr)
    assert list(tmp_path.iterdir()) == []


def test_missing_required_option_is_a_usage_error_2_without_traceback(work, tmp_path):
    code, stdout, stderr = run_cli("predict", str(work.task_model), str(SCENE))
    assert code == 2 and stdout == ""
    assert "Missing option '-o'" in stderr and "Traceback" not in stderr


def test_verbose_error_shows_the_traceback(tmp_path):
    code, _, stderr = run_cli("-v", "info", str(tmp_path / "missing.tif"))
    assert code == 2
    assert "Traceback" in stderr and stderr.endswith(
        f"geoexplora: error: {tmp_path / 'missing.tif'}: no such file\n"
    )


def test_runtime_failure_exits_1_with_one_line_and_no_model(work, tmp_path):
    out = tmp_path / "out.pt"
    code, stdout, stderr = run_cli("-q", *invocation("finetune", work, out), "--lr", "1e30")
    message = assert_one_line_error(code, stdout, stderr, expected_code=1)
    assert message.startswith("the loss is nan at step")
    assert not out.exists()


# --- the --overwrite guard --------------------------------------------------------------------


def existing_output(command: str, folder: Path) -> Path:
    """An output left by an earlier run: a chips folder with a file, or a file."""
    out = folder / OUTPUT_NAME[command]
    if command == "tile":
        out.mkdir()
        (out / "dataset.json").write_text('{"earlier": true}\n')
    else:
        out.write_bytes(b"an earlier run's output")
    return out


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_existing_output_is_refused_untouched_and_nothing_written(command, work, tmp_path):
    out = existing_output(command, tmp_path)
    before = tree(tmp_path)
    code, stdout, stderr = run_cli(*invocation(command, work, out))
    message = assert_one_line_error(code, stdout, stderr)
    ways = "--append to add to it or --overwrite" if command == "tile" else "--overwrite"
    assert message == f"{out} exists; pass {ways} to replace it"
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["tile", "predict", "embed"])
def test_overwrite_replaces_an_existing_output(command, work, tmp_path):
    out = existing_output(command, tmp_path)
    code, _, stderr = run_cli("-q", *invocation(command, work, out), "--overwrite")
    assert code == 0, stderr
    produced = out / "dataset.json" if command == "tile" else out
    assert b"earlier" not in produced.read_bytes()


@pytest.mark.parametrize(
    "option,sibling", [("--probabilities", "out_probabilities.tif"), (None, "out.tif.json")]
)
def test_predict_refuses_an_existing_secondary_output(option, sibling, work, tmp_path):
    (tmp_path / sibling).write_text("an earlier run's output")
    before = tree(tmp_path)
    args = invocation("predict", work, tmp_path / "out.tif") + ([option] if option else [])
    message = assert_one_line_error(*run_cli(*args))
    assert message == f"{tmp_path / sibling} exists; pass --overwrite to replace it"
    assert tree(tmp_path) == before


def test_training_refuses_an_earlier_runs_log_beside_its_output_without_overwrite(work, tmp_path):
    (tmp_path / "out.log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "out.pt").write_bytes(b"an earlier run's model")
    before = tree(tmp_path)
    code, stdout, stderr = run_cli(*invocation("finetune", work, tmp_path / "out.pt"))
    assert_one_line_error(code, stdout, stderr)
    assert tree(tmp_path) == before


def test_training_replaces_the_log_of_a_run_that_wrote_no_checkpoint(work, tmp_path):
    """A log with neither a checkpoint nor an output beside it is a failed run's leftover (issue
    20: a full disk before the first checkpoint); it must not block a plain rerun."""
    (tmp_path / "out.log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    code, _, stderr = run_cli(*invocation("finetune", work, tmp_path / "out.pt"))
    assert code == 0, stderr
    assert "left by a run that wrote no checkpoint; replacing it" in " ".join(stderr.split())
    assert (tmp_path / "out.pt").exists()
    assert '"loss": 1.0}' not in (tmp_path / "out.log.jsonl").read_text()


# --- a real terminal and a pipe ---------------------------------------------------------------


def run_in_terminal(
    argv: list[str], cwd: Path, columns: int = 120, timeout: float = 120
) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a new pseudo-terminal; (exit code, what the
    terminal received)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")
    }
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            received += chunk
        else:
            proc.kill()
            pytest.fail(f"{argv} still running after {timeout} s")
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    return code, received.decode("utf-8", errors="replace")


def tile_args(out: Path) -> list[str]:
    return [
        str(GEOEXPLORA),
        "tile",
        str(SCENE),
        "--bands",
        ",".join(BANDS),
        "--size",
        "28",
        "-o",
        str(out),
    ]


def test_tile_in_a_terminal_shows_a_live_progress_bar(tmp_path):
    code, screen = run_in_terminal(tile_args(tmp_path / "chips"), tmp_path)
    assert code == 0, screen
    assert "\x1b[?25l" in screen  # rich's live display hides the cursor while it redraws
    text = ANSI.sub("", screen)
    assert re.search(rf"tile {PROGRESS_BAR}+ 9/9 100%", text), text
    assert f"{tmp_path / 'chips'}: 9 chips" in text  # the result line


def test_quiet_in_a_terminal_shows_only_the_result(tmp_path):
    script, *args = tile_args(tmp_path / "chips")
    code, screen = run_in_terminal([script, "-q", *args], tmp_path)
    assert code == 0, screen
    lines = [ln for ln in ANSI.sub("", screen).splitlines() if ln.strip()]
    result = f"{tmp_path / 'chips'}: 9 chips (train 8, val 1) of 28 px, task none; dropped: none"
    assert lines == [result]


def test_predict_json_piped_to_json_tool_is_clean_while_progress_shows_in_terminal(work, tmp_path):
    doc_path = tmp_path / "doc.json"
    pipeline = (
        f"set -o pipefail; '{GEOEXPLORA}' predict '{work.task_model}' '{SCENE}' "
        f"-o '{tmp_path / 'out.tif'}' --device cpu --json "
        f"| '{sys.executable}' -m json.tool > '{doc_path}'"
    )
    code, screen = run_in_terminal(["bash", "-c", pipeline], tmp_path)
    assert code == 0, screen  # geoexplora and json.tool both succeeded
    (result,) = json.loads(doc_path.read_text())["results"]
    assert result["outputs"] == {"classes": str(tmp_path / "out.tif")}
    text = ANSI.sub("", screen)
    assert re.search(rf"predict out\.tif {PROGRESS_BAR}+ \d+/\d+ 100%", text), text
    assert '"results"' not in text  # the document went down the pipe, not to the terminal
