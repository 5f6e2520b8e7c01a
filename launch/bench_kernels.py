#!/usr/bin/env python3
"""`cnnpar bench kernels` from a checkout: the command lives in cnnpar.bench.kernels (installed with the package)."""

if __name__ == "__main__":  # a guard, not a formality: the map's worker processes import this file again
    from cnnpar.bench.kernels import main

    raise SystemExit(main())
