"""The bad-input and fault matrix of issue 20, run against the installed CLI.

Each case runs one command in a fresh work folder and reports, as one JSON line: its exit code
(and the one expected), whether stderr is a single line without a traceback, whether every input
is byte-identical afterwards, and whether anything was left at the output path. The demo's
models and chips are built once first (``geoexplora demo``, a few minutes on two cores).

Usage: python benchmarks/fault_matrix.py [--work DIR] [--only SUBSTRING]
Disk-full cases need root (they mount a small tmpfs) and are skipped otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLOVENIA = ROOT / "geoexplora" / "data" / "slovenia"
SHARED = Path(os.environ.get("GEOEXPLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))
CASE_TIMEOUT_S = 300
L8 = SHARED / "landsat8-224078-2020-05-18" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def md5(path: Path) -> str:
    if path.is_dir():
        digest = hashlib.md5()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f.read_bytes())
        return digest.hexdigest()
    return hashlib.md5(path.read_bytes()).hexdigest()


def geoexplora(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geoexplora", "-q", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def cases(demo: Path, work: Path) -> list[dict]:
    """``{"name", "args", "expect", "inputs", "output"}``; ``{S}`` is a copy of a Slovenia
    scene made for the case, ``{W}`` the case's folder."""
    model, adapted, chips = demo / "model.pt", demo / "adapted.pt", demo / "chips"
    s = "{S}"
    return [
        {
            "name": "1 tile dry run at 0.001 m (memory guard)",
            "expect": 2,
            "output": "t",
            "args": [
                "tile",
                s,
                "--bands",
                "B2,B3",
                "--resolution",
                "0.001",
                "--size",
                "28",
                "-o",
                "t",
                "--dry-run",
            ],
        },
        {
            "name": "1 predict --window 14000 (memory guard)",
            "expect": 2,
            "output": "p.tif",
            "args": ["predict", str(model), s, "--window", "14000", "-o", "p.tif"],
        },
        {
            "name": "1 finetune --batch-size 100000 (memory guard)",
            "expect": 2,
            "output": "f.pt",
            "args": ["finetune", str(adapted), str(chips), "--batch-size", "100000", "-o", "f.pt"],
        },
        {
            "name": "2 predict -o INPUT --overwrite",
            "expect": 2,
            "output": None,
            "args": ["predict", str(model), s, "-o", s, "--overwrite"],
        },
        {
            "name": "2 adapt -o INPUT --overwrite",
            "expect": 2,
            "output": None,
            "args": ["adapt", s, "-o", s, "--overwrite", "--steps", "1"],
        },
        {
            "name": "2 tile -o INPUT --overwrite",
            "expect": 2,
            "output": None,
            "args": ["tile", s, "-o", s, "--overwrite"],
        },
        {
            "name": "3 tile --bands B2,B2,B4,B8",
            "expect": 2,
            "output": "t",
            "args": ["tile", s, "--bands", "B2,B2,B4,B8", "-o", "t"],
        },
        {
            "name": "3 tile --bands B2,blue,B4",
            "expect": 2,
            "output": "t",
            "args": ["tile", s, "--bands", "B2,blue,B4", "-o", "t"],
        },
        {
            "name": "3 adapt --bands B2,B2,B4",
            "expect": 2,
            "output": "a.pt",
            "args": ["adapt", s, "--bands", "B2,B2,B4", "-o", "a.pt", "--steps", "1"],
        },
        {
            "name": "4 tile --crs EPSG:99999",
            "expect": 2,
            "output": "t",
            "args": ["tile", s, "--crs", "EPSG:99999", "-o", "t"],
        },
        {
            "name": "5 probe --steps 0",
            "expect": 2,
            "output": None,
            "args": ["probe", str(adapted), str(chips), "--steps", "0"],
        },
        {
            "name": "5 probe --batch-size 0",
            "expect": 2,
            "output": None,
            "args": ["probe", str(adapted), str(chips), "--batch-size", "0"],
        },
        {
            "name": "5 probe --knn-k 0",
            "expect": 2,
            "output": None,
            "args": ["probe", str(adapted), str(chips), "--knn-k", "0"],
        },
        {
            "name": "5 predict --window 0",
            "expect": 2,
            "output": "p.tif",
            "args": ["predict", str(model), s, "--window", "0", "-o", "p.tif"],
        },
        {
            "name": "5 embed --window 0",
            "expect": 2,
            "output": "e.tif",
            "args": ["embed", str(adapted), s, "--window", "0", "-o", "e.tif"],
        },
        {
            "name": "5 adapt --frames 0",
            "expect": 2,
            "output": "a.pt",
            "args": ["adapt", s, "--frames", "0", "-o", "a.pt", "--steps", "1"],
        },
        {
            "name": "5 adapt --lr -1",
            "expect": 2,
            "output": "a.pt",
            "args": ["adapt", s, "--lr", "-1", "-o", "a.pt", "--steps", "1"],
        },
        {
            "name": "6 predict with a code-running pickle as the model",
            "expect": 2,
            "output": "p.tif",
            "args": ["predict", "{PICKLE}", s, "-o", "p.tif"],
        },
        {
            "name": "9 predict --window -1",
            "expect": 2,
            "output": "p.tif",
            "args": ["predict", str(model), s, "--window", "-1", "-o", "p.tif"],
        },
        {
            "name": "9 tile --resolution -10",
            "expect": 2,
            "output": "t",
            "args": ["tile", s, "--resolution", "-10", "-o", "t"],
        },
        {
            "name": "9 predict --co COMPRESS=BOGUS",
            "expect": 2,
            "output": "p.tif",
            "args": ["predict", str(model), s, "--co", "COMPRESS=BOGUS", "-o", "p.tif"],
        },
        {
            "name": "9 info a 3-band Landsat-8 file with --sensor landsat8",
            "expect": 2,
            "output": None,
            "args": ["tile", str(L8), "--sensor", "landsat8", "-o", "t"],
        },
        {
            "name": "- info on a URL that cannot be reached",
            "expect": 2,
            "output": None,
            "args": ["info", "/vsicurl/http://127.0.0.1:9/x.tif"],
        },
        {
            "name": "4 tile into a full disk (2 MiB tmpfs)",
            "tmpfs": "2m",
            "expect": 1,
            "output": "{FULL}/t",
            "args": ["tile", s, "-o", "{FULL}/t", "--size", "16"],
            "disk_full": True,
        },
        {
            "name": "4 predict into a full disk (16 KiB tmpfs)",
            "may_leave": [".p.tif.parts"],  # its resumable work folder (--resume continues)
            "tmpfs": "16k",
            "expect": 1,
            "output": "{FULL}/p.tif",
            "args": ["predict", str(model), s, "-o", "{FULL}/p.tif"],
            "disk_full": True,
        },
        {
            "name": "4 adapt into a full disk (256 KiB tmpfs)",
            "tmpfs": "256k",
            "expect": 1,
            "output": "{FULL}/a.pt",
            "args": [
                "adapt",
                s,
                "--init",
                str(demo / "source.pt"),
                "-o",
                "{FULL}/a.pt",
                "--steps",
                "2",
                "--crop-size",
                "56",
                "--batch-size",
                "2",
            ],
            "disk_full": True,
        },
    ]


def write_pickle_payload(path: Path) -> None:
    """A torch.save file whose unpickling would run code (never run here: weights_only)."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch /tmp/geoexplora-pwned",))

    torch.save({"meta_json": "{}", "state": Payload()}, path)


def run_case(case: dict, scene: Path, work: Path) -> dict:
    folder = work / case["name"].split()[0] / str(abs(hash(case["name"])))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    copy = folder / scene.name
    shutil.copy(scene, copy)
    mounted = None
    subs = {"{S}": str(copy), "{W}": str(folder)}
    if case.get("disk_full"):
        if os.geteuid() != 0:
            return {"case": case["name"], "skipped": "needs root to mount a tmpfs"}
        mounted = folder / "full"
        mounted.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={case['tmpfs']}", "tmpfs", str(mounted)],
            check=True,
        )
        subs["{FULL}"] = str(mounted)
    if "{PICKLE}" in case["args"]:
        write_pickle_payload(folder / "hostile.pt")
        subs["{PICKLE}"] = str(folder / "hostile.pt")
    args = [subs.get(a, a) for a in case["args"]]
    args = [a.replace("{FULL}", subs.get("{FULL}", "{FULL}")) for a in args]
    before = md5(copy)
    start = time.perf_counter()
    try:
        proc = geoexplora(*args, cwd=folder, timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # a hang is a failed case, not the end of the matrix
        proc = subprocess.CompletedProcess(
            exc.cmd, "timeout", "", f"(no exit after {exc.timeout} s)"
        )
    finally:
        output = case["output"]
        if output is not None:
            output = output.replace("{FULL}", subs.get("{FULL}", ""))
            left = sorted(
                p.name
                for p in (folder / output).parent.iterdir()
                if p.name.startswith(Path(output).name)
                or ".partial" in p.name
                or ".parts" in p.name
            )
        else:
            left = []
        left = [name for name in left if name not in case.get("may_leave", [])]
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {
        "case": case["name"],
        "exit": proc.returncode,
        "expected": case["expect"],
        "ok": proc.returncode == case["expect"]
        and len(lines) == 1
        and "Traceback" not in proc.stderr
        and md5(copy) == before
        and not left,
        "stderr_lines": len(lines),
        "message": lines[-1][:200] if lines else "",
        "input_unchanged": md5(copy) == before,
        "left_behind": left,
        "seconds": round(time.perf_counter() - start, 1),
        "pwned": Path("/tmp/geoexplora-pwned").exists(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/geoexplora-fault-matrix"))
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    demo = args.work / "demo-out"
    if not (demo / "model.pt").is_file():
        proc = geoexplora("demo", "--out", str(demo), "--overwrite", cwd=args.work, timeout=1800)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
    scene = min(SLOVENIA.glob("S2L1C_*.tif"))
    failures = 0
    for case in cases(demo, args.work):
        if args.only not in case["name"]:
            continue
        result = run_case(case, scene, args.work)
        failures += not result.get("ok", True)
        print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
