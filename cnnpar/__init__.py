"""cnnpar: data-parallel CNN training over MPI, one sample per rank, with numba kernels.

Importing this package starts no MPI and compiles nothing; those happen in the
entry points (`python -m cnnpar.train`, `python -m cnnpar.data`).
"""

__version__ = "0.1.0"
