#!/usr/bin/env python3
"""`cnnpar predict` from a checkout: the command lives in cnnpar.analysis.predict (installed with the package)."""

if __name__ == "__main__":
    from cnnpar.analysis.predict import main

    raise SystemExit(main())
