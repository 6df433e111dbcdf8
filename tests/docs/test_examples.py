"""Every script of ``examples/`` runs at its tiny size as a user would run it (a fresh process; the
distributed ones under ``torchrun`` with 2 gloo processes), and its loss goes down."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# script -> the argument lists it is run with (each a separate test); torchrun for the distributed ones
RUNS: dict[str, list[list[str]]] = {
    "preconditioner_loop.py": [["--tiny"]],  # --kfac: cgfac.KFAC, tested throughout the suite
    "optim_closure.py": [["--tiny"]],  # --cgfac: cgfac.optim.CGFAC, as in tests/optim
    "wide_layers.py": [["--tiny"]],
    "hf_trainer.py": [["--tiny"]],
    "lightning_module.py": [["--tiny"]],
    "ddp_torchrun.py": [["--tiny"]],
    "fsdp2_torchrun.py": [["--tiny"]],
}
DISTRIBUTED = {"ddp_torchrun.py", "fsdp2_torchrun.py"}


def run(args: list[str], timeout: int = 240) -> str:
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MASTER_ADDR": "127.0.0.1",
           "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
           "HOME": os.environ.get("HOME", "/tmp"),
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(stdout: str) -> tuple[float, float]:
    """The ``loss FIRST -> LAST`` line every example prints last."""
    found = re.findall(r"^loss (\S+) -> (\S+)$", stdout, flags=re.M)
    assert found, stdout[-2000:]
    first, last = (float(v) for v in found[-1])
    return first, last


def test_every_example_is_run_and_shown_in_the_docs() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(RUNS) | {"checkpoint_resume.py"}
    page = (ROOT / "docs" / "examples.md").read_text()
    for name in scripts:
        assert f'--8<-- "examples/{name}"' in page, name


@pytest.mark.parametrize(("script", "args"), [(s, a) for s, runs in RUNS.items() for a in runs],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_example_runs_and_its_loss_goes_down(script: str, args: list[str]) -> None:
    launcher = TORCHRUN if script in DISTRIBUTED else [sys.executable]
    first, last = losses(run([*launcher, str(EXAMPLES / script), *args]))
    assert math.isfinite(first) and math.isfinite(last)
    assert last < first, (first, last)


def test_checkpoint_saved_on_two_processes_resumes_on_one_as_an_uninterrupted_run(tmp_path) -> None:
    script = str(EXAMPLES / "checkpoint_resume.py")

    def steps(stdout: str) -> dict[int, float]:
        return {int(s): float(v) for s, v in re.findall(r"^step (\d+) loss (\S+)$", stdout, flags=re.M)}

    saved = steps(run([*TORCHRUN, script, "--ckpt", str(tmp_path / "a.pt"), "--steps", "3"]))
    resumed_out = run([sys.executable, script, "--ckpt", str(tmp_path / "a.pt"), "--steps", "6"])
    assert "resumed at step 3 on 1 process(es)" in resumed_out
    resumed = steps(resumed_out)
    uninterrupted = steps(run([sys.executable, script, "--ckpt", str(tmp_path / "b.pt"), "--steps", "6"]))
    assert sorted(saved) == [0, 1, 2] and sorted(resumed) == [3, 4, 5]  # no step lost or repeated
    assert sorted(uninterrupted) == list(range(6))
    for step, loss in {**saved, **resumed}.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-4), step
    assert uninterrupted[5] < uninterrupted[0]
