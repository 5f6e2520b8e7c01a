#!/usr/bin/env python3
"""`cnnpar sweep` from a checkout: the command lives in cnnpar.experiments.sweep (installed with the package)."""

if __name__ == "__main__":  # a guard, not a formality: the map's worker processes import this file again
    from cnnpar.experiments.sweep import main

    raise SystemExit(main())
