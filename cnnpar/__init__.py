"""cnnpar: data-parallel CNN training over MPI, one sample per rank, with numba kernels.

Importing this package starts no MPI and compiles nothing; those happen in the
entry points (`python -m cnnpar.train`, `python -m cnnpar.data`). It only points
numba's on-disk cache at cnnpar's folder for these sources (see cnnpar.warmup).
"""

__version__ = "0.1.0"

from .kernel_cache import use_kernel_cache as _use_kernel_cache

_use_kernel_cache()  # before any cnnpar module imports numba: a cache folder per version of the kernels
del _use_kernel_cache
