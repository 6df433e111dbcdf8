"""``cgfac-bench``: the benchmark command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``:

* ``train``     training comparison of optimizers on one task (``cgfac_bench.train``)
* ``layer``     one layer's preconditioning time and memory against width (``cgfac_bench.layer``)
* ``choice``    the automatic method choice against every candidate (``cgfac_bench.choice``)
* ``cg-iters``  CG iterations to tolerance along a real training run (``cgfac_bench.cg_iters``)
* ``comm``      bytes sent per rank and step by formula, projected to 8/64/512 ranks (``cgfac_bench.comm``)
* ``soak``      many training steps with the resident memory sampled along (``cgfac_bench.soak``)
* ``profile``   one optimizer step itemised against Adam's (``cgfac_bench.profile``)
* ``sweep``     ``train`` over widths: time to a fixed loss per optimizer and width (``cgfac_bench.sweep``)
* ``memory``    GPT-2 small at its real size: ms per step and peak memory per optimizer (``cgfac_bench.memory``)
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("cgfac_bench.train", "training comparison of optimizers on one task"),
    "layer": ("cgfac_bench.layer", "one layer's preconditioning cost against width"),
    "choice": ("cgfac_bench.choice", "automatic solve-method choice against every candidate"),
    "cg-iters": ("cgfac_bench.cg_iters", "CG iterations to tolerance along a training run"),
    "comm": ("cgfac_bench.comm", "bytes sent per rank and step, projected to many ranks"),
    "soak": ("cgfac_bench.soak", "many training steps, resident memory sampled along"),
    "profile": ("cgfac_bench.profile", "one optimizer step itemised against Adam's"),
    "sweep": ("cgfac_bench.sweep", "train over widths: time to a fixed loss per optimizer and width"),
    "memory": ("cgfac_bench.memory", "GPT-2 small: ms per step and peak memory per optimizer"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``COMMAND [options]``; only the chosen subcommand's module is imported."""
    listing = "\n".join(f"  {name:<9} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(prog="cgfac-bench", description=__doc__.splitlines()[0],
                                     epilog="commands:\n" + listing,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=list(SUBCOMMANDS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options (COMMAND --help)")
    top = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[top.command][0])
    sub = argparse.ArgumentParser(prog=f"cgfac-bench {top.command}", description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(top.options)) or 0)


if __name__ == "__main__":
    sys.exit(main())
