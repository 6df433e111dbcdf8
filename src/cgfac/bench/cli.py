"""``cgfac-bench``: the benchmark command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``:

* ``train``     training comparison of optimizers on one task (``cgfac.bench.train``)
* ``layer``     one layer's preconditioning time and memory against width (``cgfac.bench.layer``)
* ``choice``    the automatic method choice against every candidate (``cgfac.bench.choice``)
* ``cg-iters``  CG iterations to tolerance along a real training run (``cgfac.bench.cg_iters``)
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("cgfac.bench.train", "training comparison of optimizers on one task"),
    "layer": ("cgfac.bench.layer", "one layer's preconditioning cost against width"),
    "choice": ("cgfac.bench.choice", "automatic solve-method choice against every candidate"),
    "cg-iters": ("cgfac.bench.cg_iters", "CG iterations to tolerance along a training run"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cgfac-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
