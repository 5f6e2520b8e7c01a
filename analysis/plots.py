#!/usr/bin/env python3
"""`cnnpar plots` from a checkout: the command lives in cnnpar.analysis.plots (installed with the package)."""

if __name__ == "__main__":  # a guard, not a formality: the map's worker processes import this file again
    from cnnpar.analysis.plots import main

    raise SystemExit(main())
