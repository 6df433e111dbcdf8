"""Each ``cgfac-bench train`` run in processes of its own (:func:`run_isolated`), so that its peak
memory is its own: a fresh spawned process, or ``--nproc`` ranks launched by torchrun.

Run as ``python -m cgfac_bench.isolation WORK_DIR``, this module is one such rank (:func:`torchrun_worker`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import queue
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from cgfac_bench.analysis import finite_json
from cgfac_bench.loop import train_run


def _child_main(cfg: dict[str, Any], messages: Any) -> None:
    """Entry point of a spawned run: posts ``("progress", seconds)`` and one ``("result", record)``."""
    try:
        record = train_run(cfg, lambda seconds: messages.put(("progress", seconds)))
    except Exception as err:  # reported in the comparison instead of ending it
        record = {"optimizer": cfg["optimizer"], "lr": cfg["lr"], "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
    messages.put(("result", record))


def run_torchrun(cfg: dict[str, Any], on_progress: Callable[[float], None]) -> dict[str, Any]:
    """Run :func:`train_run` on ``cfg["nproc"]`` processes launched by ``torchrun --standalone``
    (gloo on CPU, NCCL on CUDA); rank 0 reports progress through a file and writes the record."""
    work = Path(tempfile.mkdtemp(prefix="cgfac-torchrun-", dir=cfg["data_dir"]))
    (work / "cfg.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg["nproc"]),
           "-m", "cgfac_bench.isolation", str(work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None:
        time.sleep(1.0)
        with contextlib.suppress(OSError, ValueError):
            on_progress(float((work / "progress").read_text()))
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode == 0 and (work / "result.json").exists():
        return json.loads((work / "result.json").read_text())
    return {"optimizer": cfg["optimizer"], "lr": cfg["lr"],
            "error": f"torchrun exited with code {proc.returncode}", "traceback": output[-4000:]}


def torchrun_worker(work: Path) -> None:
    """One rank under torchrun: join the process group, train, rank 0 writes the record."""
    cfg = json.loads((work / "cfg.json").read_text())
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(seconds=300))
    try:
        rank = dist.get_rank()

        def progress(seconds: float) -> None:
            (work / "progress").write_text(str(seconds))

        record = train_run(cfg, progress if rank == 0 else None)
        if rank == 0:
            (work / "result.json").write_text(json.dumps(finite_json(record)))
        dist.barrier()  # rank 0 evaluates and writes last: tearing gloo down under it aborted it
    finally:
        dist.destroy_process_group()


def run_isolated(cfg: dict[str, Any], on_progress: Callable[[float], None]) -> dict[str, Any]:
    """Run :func:`train_run` in a fresh spawned process (or under torchrun) and return its record."""
    if cfg.get("nproc", 1) > 1:
        return run_torchrun(cfg, on_progress)
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(cfg, messages), daemon=True)
    proc.start()
    record = None
    while record is None:
        try:
            kind, payload = messages.get(timeout=1.0 if proc.is_alive() else 5.0)
        except queue.Empty:
            if proc.is_alive():
                continue
            break
        if kind == "progress":
            on_progress(payload)
        else:
            record = payload
    proc.join()
    if record is None:
        record = {"optimizer": cfg["optimizer"], "lr": cfg["lr"],
                  "error": f"worker process exited with code {proc.exitcode} and no result"}
    return record


if __name__ == "__main__":  # a rank launched by run_torchrun: python -m cgfac_bench.isolation WORK_DIR
    torchrun_worker(Path(sys.argv[1]))
