#!/usr/bin/env python3
"""`cnnpar table` from a checkout: the command lives in cnnpar.analysis.table (installed with the package)."""

if __name__ == "__main__":  # a guard, not a formality: the map's worker processes import this file again
    from cnnpar.analysis.table import main

    raise SystemExit(main())
