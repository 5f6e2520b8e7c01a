"""Compile (or load from numba's on-disk cache) every kernel float32 training and evaluation use.

    python -m cnnpar.warmup [ARCH ...]      # default: small; prints the seconds it took

The trainer has rank 0 of each node call warm_up() while the node's other ranks wait at a barrier,
then they load the machine code from the cache instead of all compiling at once. Where the cache
lives: numba writes it to __pycache__ beside cnnpar/kernels.py when that folder is writable
(a source checkout, an editable install, a user-owned virtualenv), else to a per-user folder
(~/.cache/numba or $NUMBA_CACHE_DIR). Every kernel the drivers call lives in kernels.py, so editing
that file invalidates the lot; nothing stale can be loaded after an edit elsewhere.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def warm_up(archs=("small",)) -> float:
    """Run forward_backward, evaluate and one SGD step on a 2-sample batch for each architecture
    (float32, 1x28x28 input, 10 classes); returns the seconds taken."""
    start = time.perf_counter()
    from .model import build_network
    from .optim import SGD

    for arch in archs:
        network = build_network(arch)
        params = network.init_params(0)
        grads = np.zeros_like(params)
        images = np.zeros((2,) + network.input_shape, np.float32)
        labels = np.zeros(2, np.int32)
        network.forward_backward(params, grads, images, labels)
        network.sampled_forward_backward(images, labels)(params, grads, np.arange(2, dtype=np.int64), 0, 2)
        network.evaluate(params, images, labels, np.empty(2, np.int32))
        SGD(network.n_params, lr=0.01).step(params, grads, 2)
    return time.perf_counter() - start


def main(argv=None) -> int:
    from .errors import exit_on_user_error

    archs = tuple(sys.argv[1:] if argv is None else argv) or ("small",)
    seconds = exit_on_user_error(warm_up)(archs)
    print(f"cnnpar: kernels ready for {', '.join(archs)} in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
