"""From a scene and a model to finished output files: strips, resume, shards, assembly, sidecar.

The work folder ``.<output name>.parts/`` next to the output holds ``run.json`` (what is being
computed: a fingerprint of model, inputs and settings), one strip folder per product, and one
``shard-I-of-N.json`` with the timings of each run. Strips are the unit of resumption and
sharding: shard ``i/n`` owns a contiguous range of strips and runs every window that touches it
(windows at a range boundary are computed by both neighbours, each keeping only its own rows, so
no window is lost and no pixel written twice). Whoever completes the last strip assembles the
COGs (one process, guarded by a lock file) and removes the work folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from geoexplora.errors import UserError, opt
from geoexplora.inference import engine
from geoexplora.inference.products import Product
from geoexplora.inference.windows import WindowPlan
from geoexplora.io.outputs import atomic_output
from geoexplora.io.writers import STRIP_ROWS, StripStore, write_sidecar
from geoexplora.log import logger, make_progress


@dataclass
class RunOptions:
    blend: str = "cosine"
    batch_size: int = 8
    prefetch: int = 4
    resume: bool = False
    shard: tuple[int, int] | None = None  # (i, n), 0-based i
    overwrite: bool = False
    creation_options: dict = field(default_factory=dict)
    strip_rows: int = STRIP_ROWS


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def work_folder(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` (1-based, as users count) -> ``(1, 4)``."""
    if not text:
        return None
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit():
        raise UserError(f"'{text}' is not I/N (e.g. 1/4)", option="shard")
    i, n = int(i), int(n)
    if not 1 <= i <= n:
        raise UserError(f"{text}: I must be between 1 and N", option="shard")
    return i - 1, n


def shard_strips(count: int, shard: tuple[int, int] | None) -> range:
    """The contiguous strip indices shard ``i`` of ``n`` owns (all strips without a shard)."""
    if shard is None:
        return range(count)
    i, n = shard
    return range(i * count // n, (i + 1) * count // n)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive strip indices -> ``[(first, last + 1), ...]``."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


# Work folders this process is writing: their open descriptors hold the flock that tells a
# second run that the folder is in use (exclusive for a whole run, shared by shards).
_CLAIMS: dict[Path, int] = {}
WRITER_PID = "writer.pid"


def _claim(work: Path, output: Path, shared: bool) -> None:
    """Lock ``work`` for this run; UserError naming the other run (and its pid) when one is
    writing it. The lock goes with the process, so a killed run never leaves it behind."""
    import fcntl

    release_work(work)
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid_file = work / WRITER_PID
        pid = pid_file.read_text().strip() if pid_file.is_file() else ""
        who = f"another run (pid {pid})" if pid.isdigit() else "another run"
        raise UserError(
            f"{who} is writing {output} (work folder {work}); wait for it to finish"
        ) from None
    _CLAIMS[work] = fd
    tmp = work / f".{WRITER_PID}.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, work / WRITER_PID)


def release_work(work: Path) -> None:
    """Give up this process's claim on ``work`` (no-op without one)."""
    fd = _CLAIMS.pop(work, None)
    if fd is not None:
        os.close(fd)


def prepare_work(output: Path, fingerprint: dict, opts: RunOptions) -> Path:
    """The work folder of ``output``, checked against ``fingerprint`` (a folder left by another
    run is reused only with --resume or --shard and the same settings) and claimed for this run
    until ``run_to_files`` (or ``release_work``) ends."""
    work = work_folder(output)
    try:
        _prepare(work, output, fingerprint, opts)
    except BaseException:
        release_work(work)
        raise
    return work


def _prepare(work: Path, output: Path, fingerprint: dict, opts: RunOptions) -> None:
    run_json = work / "run.json"
    if work.exists():
        _claim(work, output, shared=bool(opts.shard))
        previous = json.loads(run_json.read_text()) if run_json.exists() else None
        if previous == fingerprint and (opts.resume or opts.shard):
            return
        if opts.shard and previous is not None and previous != fingerprint:
            raise UserError(
                f"{work} holds a run with other settings (model, inputs or options); "
                "every shard must be started with the same ones, or remove it"
            )
        if not opts.overwrite and not opts.shard:
            what = "with other settings " if previous != fingerprint else ""
            raise UserError(
                f"an interrupted or sharded run {what}left {work}; pass {opt('resume')} to "
                f"continue it or {opt('overwrite')} to start over"
            )
        if not opts.shard:
            release_work(work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if work not in _CLAIMS:
        _claim(work, output, shared=bool(opts.shard))
    tmp = work / f".run.json.{os.getpid()}"
    tmp.write_text(json.dumps(fingerprint, indent=2))
    os.replace(tmp, run_json)


def run_to_files(
    scene,
    plan: WindowPlan,
    forwards,
    channels: int,
    products: list[Product],
    opts: RunOptions,
    provenance: dict,
    votes: bool = False,
) -> dict:
    """Compute (this shard's part of) the outputs; assemble them when every strip exists.
    The work folder must have been prepared (``prepare_work``); its claim ends here.

    Returns ``{"status": "complete" | "partial", "outputs", "stats", "timings", ...}``.
    """
    try:
        return _run_to_files(scene, plan, forwards, channels, products, opts, provenance, votes)
    finally:
        release_work(work_folder(products[0].path))


def _run_to_files(scene, plan, forwards, channels, products, opts, provenance, votes) -> dict:
    main = products[0].path
    work = work_folder(main)
    stores = [StripStore(work / p.key, p.spec, opts.strip_rows) for p in products]
    count = stores[0].strip_count
    mine = shard_strips(count, opts.shard)
    done = set.intersection(*(s.done() for s in stores)) if opts.resume else set()
    todo = [i for i in mine if i not in done]
    runs = _runs(todo)
    row_ranges = [(a * opts.strip_rows, min(b * opts.strip_rows, plan.out_height)) for a, b in runs]
    total = sum(plan.count(r) for r in row_ranges)
    if done & set(mine):
        logger.info("resuming: %d of %d strips already done", len(done & set(mine)), len(mine))
    timings = engine.Timings()
    with make_progress() as progress:
        verb = "embed" if products[0].key == "embedding" else "predict"
        task = progress.add_task(f"{verb} {main.name}", total=total, info="")
        offset = 0

        def tick(_n):
            progress.update(task, completed=offset + timings.windows + timings.skipped)

        for rows in row_ranges:
            for strip in engine.run(
                scene,
                plan,
                forwards,
                channels,
                blend=opts.blend,
                batch_size=opts.batch_size,
                out_rows=rows,
                votes=votes,
                prefetch=opts.prefetch,
                timings=timings,
                on_batch=tick,
            ):
                for product, store in zip(products, stores):
                    store.write(strip.row, product.render(strip))
            for store in stores:
                store.assert_idle()
        progress.update(task, completed=total)
    shard_name = f"shard-{opts.shard[0] + 1}-of-{opts.shard[1]}" if opts.shard else "shard-1-of-1"
    record = {"strips": todo, "timings": timings.as_dict()}
    (work / f"{shard_name}.{os.getpid()}.json").write_text(json.dumps(record))

    result = {
        "work_folder": str(work),
        "strips": {"total": count, "this_run": len(todo), "mine": len(mine)},
        "timings": timings.as_dict(),
    }
    if set(range(count)) - set.intersection(*(s.done() for s in stores)):
        missing = len(set(range(count)) - set.intersection(*(s.done() for s in stores)))
        logger.info(
            "%s: %d strip(s) still to come from other shards; the last shard to finish "
            "writes the outputs (or rerun with --resume to assemble)",
            main.name,
            missing,
        )
        return {"status": "partial", **result}
    return {**result, **_assemble(products, stores, work, opts, provenance, plan)}


@contextlib.contextmanager
def _assembly_lock(work: Path, force: bool):
    lock = work / "assemble.lock"
    if force and lock.exists():
        lock.unlink()
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        yield False
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    yield True


def _assemble(
    products, stores, work: Path, opts: RunOptions, provenance: dict, plan: WindowPlan
) -> dict:
    with _assembly_lock(work, force=opts.resume) as mine:
        if not mine:
            logger.info("another process is assembling %s", products[0].path.name)
            return {"status": "partial"}
        t0 = time.perf_counter()
        stats = stores[0].stats()
        shard_records = [json.loads(p.read_text()) for p in sorted(work.glob("shard-*.json"))]
        with contextlib.ExitStack() as stack:
            for product, store in zip(products, stores):
                tmp = stack.enter_context(atomic_output(product.path, opts.overwrite))
                store.assemble(tmp, opts.creation_options)
            sidecar = sidecar_path(products[0].path)
            doc = {
                **provenance,
                "plan": plan.describe(),
                "blend": opts.blend,
                "batch_size": opts.batch_size,
                "outputs": {p.key: str(p.path) for p in products},
                **stats,
                "runs": shard_records,
                "assemble_s": round(time.perf_counter() - t0, 3),
            }
            tmp_sidecar = stack.enter_context(atomic_output(sidecar, opts.overwrite))
            write_sidecar(tmp_sidecar, doc)
        shutil.rmtree(work)
    return {
        "status": "complete",
        "outputs": {p.key: str(p.path) for p in products},
        "sidecar": str(sidecar),
        **stats,
    }
