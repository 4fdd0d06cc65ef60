"""`python -m pykprobes ...`: the same entry point as the `pykprobes` console script."""

from __future__ import annotations

import sys

from pykprobes.cli.main import main

# Guarded so that a tool importing every submodule (a doc builder, a test collector) does not
# run the CLI and exit.
if __name__ == "__main__":
    sys.exit(main())
