#!/usr/bin/env python3
"""`cnnpar bench flush` from a checkout: the command lives in cnnpar.bench.flush (installed with the package)."""

if __name__ == "__main__":  # a guard, not a formality: the map's worker processes import this file again
    from cnnpar.bench.flush import main

    raise SystemExit(main())
