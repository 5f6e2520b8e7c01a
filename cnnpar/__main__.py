"""`python -m cnnpar COMMAND ...` is the `cnnpar` command."""

from .cli import main

raise SystemExit(main())
