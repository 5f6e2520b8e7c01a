#!/usr/bin/env python3
"""`cnnpar report` from a checkout: the command lives in cnnpar.analysis.map_report (installed with the package)."""

if __name__ == "__main__":  # a guard, not a formality: the map's worker processes import this file again
    from cnnpar.analysis.map_report import main

    raise SystemExit(main())
