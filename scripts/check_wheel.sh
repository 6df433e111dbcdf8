#!/usr/bin/env bash
# Build cgfac's sdist and wheel (python -m build: the wheel is built from the sdist, each in its own
# isolated build environment), install the wheel in a fresh virtual environment outside the
# checkout, and smoke-test it there: import, py.typed, two steps of each preconditioner and
# optimizer, and the requirements of the base package and of the `hf` and `lightning` extras.
#
# Dependencies (the choice that keeps .ci/run within its 10 minutes): the fresh environment has no
# system site-packages and gets cgfac from the wheel alone (pip install --no-deps); torch, numpy,
# transformers, accelerate and lightning are not installed again (torch alone is ~1 GB unpacked,
# ~40 s): a .pth file appends the site-packages of the interpreter that builds (.venv, already set
# up by scripts/setup.sh) to the fresh environment's path. A .pth line only adds a directory, so
# .venv's editable install of cgfac (its own .pth) is not processed there: the smoke test checks that
# cgfac, its metadata and py.typed come from the fresh environment and that nothing of the
# checkout is on sys.path. The extras are checked against that metadata: each requirement of the
# base package, `hf` and `lightning` must name an installed distribution whose version satisfies it,
# and the integrations must import. CHECK_WHEEL_DEPS=install instead installs the wheel with the
# hf and lightning extras and resolves every dependency from the package index (minutes).
#
# Usage: bash scripts/check_wheel.sh          (PYTHON=... to build with another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
CHECKOUT=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cgfac-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "[check_wheel] building the sdist and the wheel"
if ! "$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log"
  exit 1
fi
SDIST=$(ls "$WORK"/dist/cgfac-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/cgfac-*-py3-none-any.whl)

# What each archive carries: the sources, py.typed and the metadata; never the tests.
"$PY" - "$SDIST" "$WHEEL" <<'PY'
import sys
import tarfile
import zipfile

sdist, wheel = sys.argv[1:]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
for need in ("pyproject.toml", "README.md", "src/cgfac/__init__.py", "src/cgfac/py.typed",
             "src/cgfac/integrations/transformers.py", "src/cgfac_bench/cli.py"):
    assert need in names, f"sdist lacks {need}"
files = set(zipfile.ZipFile(wheel).namelist())
for need in ("cgfac/__init__.py", "cgfac/py.typed", "cgfac/optim/__init__.py", "cgfac/optim/base.py",
             "cgfac/optim/transformer_kfac.py", "cgfac/optim/transformer_factors.py", "cgfac/layers/__init__.py",
             "cgfac/precondition/__init__.py", "cgfac/capture/__init__.py", "cgfac/distributed/__init__.py",
             "cgfac/curvature/__init__.py", "cgfac/solvers/__init__.py",
             "cgfac/integrations/transformers.py", "cgfac/integrations/lightning.py", "cgfac_bench/cli.py"):
    assert need in files, f"wheel lacks {need}"
assert not any(f.startswith(("tests/", "benchmarks/", "examples/", "docs/")) for f in files), sorted(files)
print(f"[check_wheel] {sdist.rsplit('/', 1)[1]} ({len(names)} files), {wheel.rsplit('/', 1)[1]} ({len(files)} files)")
PY

echo "[check_wheel] a fresh virtual environment in $WORK/venv"
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
if [ "${CHECK_WHEEL_DEPS:-link}" = install ]; then
  TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  "$PY" -m pip --python "$VPY" install -q "torch==$TORCH" "$WHEEL[hf,lightning]"
else
  "$PY" -c "import sysconfig; print(sysconfig.get_path('purelib'))" >"$SITE/_cgfac_check_dependencies.pth"
  "$PY" -m pip --python "$VPY" install -q --no-deps "$WHEEL"
fi

echo "[check_wheel] smoke test outside the checkout"
cd "$WORK"
env -i PATH=/usr/bin:/bin HOME="$WORK" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 CHECKOUT="$CHECKOUT" \
  "$VPY" - <<'PY'
import importlib.metadata as md
import os
import sys
from pathlib import Path

import torch
from torch import nn

import cgfac

try:
    from packaging.requirements import Requirement
except ImportError:  # pip's copy
    from pip._vendor.packaging.requirements import Requirement

prefix, checkout = Path(sys.prefix).resolve(), Path(os.environ["CHECKOUT"]).resolve()
package = Path(cgfac.__file__).resolve().parent
assert package.is_relative_to(prefix), f"cgfac imported from {package}, not from {prefix}"
assert (package / "py.typed").is_file(), "py.typed is not installed"
# Nothing of the checkout's sources: neither its root nor src/ (the linked site-packages of .venv may
# lie inside the checkout; its editable install's .pth, which would add src/, is not processed).
for entry in sys.path:
    path = Path(entry or ".").resolve()
    assert path != checkout and not path.is_relative_to(checkout / "src"), f"{entry} on sys.path"
dist = md.distribution("cgfac")
assert Path(dist.locate_file("cgfac")).resolve() == package and dist.version == cgfac.__version__

requirements = [Requirement(r) for r in dist.requires or []]
for extra in ("", "hf", "lightning"):
    if extra:
        reqs = [r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": extra})]
    else:
        reqs = [r for r in requirements if r.marker is None]
    assert reqs, f"no requirements for extra {extra!r}"
    for r in reqs:
        version = md.version(r.name)
        assert r.specifier.contains(version, prereleases=True), f"{r} (extra {extra!r}) but {r.name} {version}"
    print(f"[check_wheel] requirements of {extra or 'cgfac'}: " + ", ".join(f"{r} ({md.version(r.name)})" for r in reqs))
import cgfac.integrations.lightning  # the extras' modules import
import cgfac.integrations.transformers

torch.manual_seed(0)
x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


for make in (lambda m: cgfac.CGFAC(m, damping=1e-3), lambda m: cgfac.KFAC(m, damping=1e-3, inv_update_steps=1)):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = make(model)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    assert pre.steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())
for make in (lambda m: cgfac.optim.KFAC(m, loss_type="cross_entropy"),
             lambda m: cgfac.optim.CGFAC(m, loss_type="cross_entropy"),
             lambda m: cgfac.optim.TransformerKFAC(m, lr=1e-2)):
    model = net()
    opt = make(model)
    losses = []
    for _ in range(2):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
print(f"[check_wheel] cgfac {cgfac.__version__} from {package}: py.typed, two steps of CGFAC, KFAC, "
      "optim.KFAC, optim.CGFAC, optim.TransformerKFAC: ok")
PY
test -x "$WORK/venv/bin/cgfac-bench" || { echo "the wheel installs no cgfac-bench command"; exit 1; }
echo "[check_wheel] ok"
