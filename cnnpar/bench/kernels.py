"""Benchmark the compute core on ONE core: per-sample forward+backward, the full step with SGD.

    cnnpar bench kernels [--arch small|lenet|GRAMMAR] [--vs-torch] [--k N] [--layers]

Prints a readable table, then, as its LAST line, one JSON object with every figure. The step is what a
rank does per step: zero the grads, forward+backward of k samples (one numba call), one SGD step.
GFLOP/s are nominal (Network.flops_per_sample: dense multiply-adds x 2, forward + backward) over the
forward+backward time, and are compared with the core's float32 peak measured here by a numba loop of
independent fused multiply-adds on vectors (fma_peak_gflops; numpy's BLAS matmul 192x192 on one
thread is printed beside it). --vs-torch runs PyTorch eager on the same
architecture, one thread, at batch 1 and batch 64 (zero_grad, forward, summed cross-entropy,
backward, SGD step) in the same run. --layers adds a roofline table: each kernel's forward and backward
time (run many times inside one numba call: no Python call cost, data hot in cache, so the parts sum
to less than the whole step), its nominal FLOPs and the bytes it reads and writes per sample, its
GFLOP/s and their fraction of the measured peak. A conv followed by pool and relu runs as one kernel
('conv+pool+relu'), so its row holds all three. Timings are medians of many runs, each repeated in rounds, the
best round's median kept (other processes on a shared machine only ever slow a round down).
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"   # before numpy / numba / torch are imported: one core, as each MPI rank

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402


from cnnpar import kernels as K  # noqa: E402
from cnnpar.model import build_network  # noqa: E402
from cnnpar.optim import SGD  # noqa: E402


def _median_us(fn, calls: int, rounds: int) -> float:
    """Best, over rounds, of the median per-call time in microseconds."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        times = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter()
            fn()
            times[i] = time.perf_counter() - t0
        best = min(best, float(np.median(times)))
    return best * 1e6


@njit(cache=True, fastmath={"reassoc", "contract"})
def _fma_loop(x, rounds, c):
    # twelve independent accumulators per input load, each vectorised: the loop is bound by the
    # FMA units, not by loads or by an FMA's latency
    zero = x.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = s10 = s11 = zero
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 = (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8],
                                                        c[9], c[10], c[11])
    for _ in range(rounds):
        for i in range(x.shape[0]):
            v = x[i]
            s0 += v * c0
            s1 += v * c1
            s2 += v * c2
            s3 += v * c3
            s4 += v * c4
            s5 += v * c5
            s6 += v * c6
            s7 += v * c7
            s8 += v * c8
            s9 += v * c9
            s10 += v * c10
            s11 += v * c11
    return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7 + s8 + s9 + s10 + s11


def fma_peak_gflops(rounds: int = 15) -> float:
    """The core's float32 peak as this numba/LLVM build reaches it: the best of `rounds` runs of ~0.5 ms
    (short, so the best one dodges preemption on a shared machine)."""
    x = np.random.default_rng(0).random(2048, dtype=np.float32)
    c = np.random.default_rng(1).random(12, dtype=np.float32) * np.float32(1e-3)
    repeats = 10
    _fma_loop(x, 1, c)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        _fma_loop(x, repeats, c)
        best = min(best, time.perf_counter() - t0)
    return 2 * 12 * x.shape[0] * repeats / best / 1e9


def peak_gflops() -> float:
    # 192^3: big enough for BLAS to run near peak, short enough (~0.2 ms) that the median of many
    # calls dodges preemption on a shared machine
    a = np.random.default_rng(0).random((192, 192), dtype=np.float32)
    b = a.T.copy()
    seconds = _median_us(lambda: a @ b, 300, 5) / 1e6
    return 2 * 192 ** 3 / seconds / 1e9


def bench_numba(arch: str, k: int, calls: int, rounds: int) -> dict:
    network = build_network(arch)
    params = network.init_params(0)
    grads = np.zeros_like(params)
    rng = np.random.default_rng(1)
    images = rng.random((k,) + network.input_shape, dtype=np.float32)
    labels = rng.integers(0, network.n_classes, k).astype(np.int32)
    optimizer = SGD(network.n_params, lr=1e-4)

    def forward_backward():
        network.forward_backward(params, grads, images, labels)

    def step():
        grads.fill(0.0)
        network.forward_backward(params, grads, images, labels)
        optimizer.step(params, grads, k)

    def step_fused_zero():   # the same step with the zeroing folded into the SGD pass
        network.forward_backward(params, grads, images, labels)
        optimizer.step(params, grads, k, zero_grads=True)

    fb_us = _median_us(forward_backward, calls, rounds) / k
    step_us = _median_us(step, calls, rounds)
    step_fused_us = _median_us(step_fused_zero, calls, rounds)
    flops = network.flops_per_sample()
    return {"arch": arch, "grammar": network.grammar, "n_params": network.n_params, "k": k,
            "fwd_bwd_us_per_sample": fb_us, "step_us": step_us, "step_us_per_sample": step_us / k,
            "step_us_zero_in_sgd": step_fused_us,
            "samples_per_s": k / (step_us / 1e6), "flops_per_sample": flops["total"],
            "gflops": flops["total"] / (fb_us * 1e3)}


@njit(cache=True)
def _repeat_layer(n, backward, params, grads, work, iwork, row, image):
    for _ in range(n):
        if backward:
            K._layer_backward(params, grads, work, iwork, row, image)
        else:
            K._layer_forward(params, work, iwork, row, image)


def layer_costs(network, row) -> dict:
    """Nominal FLOPs (multiply-adds x 2) and bytes read + written (float32 and int32 arrays, each once)
    per sample, forward and backward, of one table row's kernels."""
    op, fused = int(row[K.T_OP]), int(row[K.T_FUSED])
    C, H, W, F, OH, OW, Kk, P = (int(row[c]) for c in (K.T_C, K.T_H, K.T_W, K.T_F, K.T_OH, K.T_OW, K.T_K, K.T_P))
    need_dx = int(row[K.T_DIN] >= 0)
    n_in, n_out = C * H * W, F * OH * OW
    bytes_ = 4
    if op == K.OP_CONV:
        macs = n_out * C * Kk * Kk
        n_weights = F * C * Kk * Kk + F
        padded = C * (H + 2 * P) * (W + 2 * P)
        forward_bytes = (n_in + padded + n_weights + n_out) * bytes_
        backward_bytes = (n_out + padded + 2 * n_weights + (n_weights + 2 * n_in) * need_dx) * bytes_
        if fused == K.FUSED_CONV:
            pooled = F * (OH // 2) * (OW // 2)
            forward_bytes += (3 * pooled - n_out) * bytes_      # the pooled values and argmax, not the plane
            backward_bytes += (3 * pooled + n_out) * bytes_     # dpooled, pooled, argmax read; the plane written
        return {"forward_flops": 2 * macs, "backward_flops": 2 * macs * (1 + need_dx),
                "forward_bytes": forward_bytes, "backward_bytes": backward_bytes}
    if op == K.OP_DENSE:
        macs = n_in * F
        return {"forward_flops": 2 * macs, "backward_flops": 2 * macs * (1 + need_dx),
                "forward_bytes": (macs + n_in + 2 * F) * bytes_,
                "backward_bytes": (2 * macs + n_in + 3 * F + (macs + n_in) * need_dx) * bytes_}
    if op == K.OP_POOL:
        return {"forward_flops": 0, "backward_flops": 0, "forward_bytes": (n_in + 2 * n_out) * bytes_,
                "backward_bytes": (2 * n_out + n_in) * bytes_}
    return {"forward_flops": 0, "backward_flops": 0, "forward_bytes": 2 * n_in * bytes_,
            "backward_bytes": 3 * n_in * bytes_}


def bench_layers(arch: str, calls: int, rounds: int, peak: float) -> list[dict]:
    """Per table row (the order the kernels run: 'relu,pool' runs as 'pool,relu'; rows run by a fused
    conv are left out), microseconds of its forward and its backward kernel on one sample, repeated
    `calls` times inside numba, with layer_costs' figures and GFLOP/s against `peak`."""
    network = build_network(arch)
    params = network.init_params(0)
    grads = np.zeros_like(params)
    rng = np.random.default_rng(1)
    images = rng.random((1,) + network.input_shape, dtype=np.float32)
    labels = rng.integers(0, network.n_classes, 1).astype(np.int32)
    network.forward_backward(params, grads, images, labels)   # every activation and delta in place
    names = {K.OP_CONV: "conv", K.OP_RELU: "relu", K.OP_POOL: "pool", K.OP_DENSE: "dense"}
    rows = []
    for index, row in enumerate(network.table):
        if row[K.T_FUSED] == K.FUSED_DONE:
            continue
        op = names[int(row[K.T_OP])] + ("+pool+relu" if row[K.T_FUSED] == K.FUSED_CONV else "")
        figures = {"layer": index, "op": op, **layer_costs(network, row)}
        for way, backward in (("forward", False), ("backward", True)):
            def run(n, backward=backward, row=row):
                _repeat_layer(n, backward, params, grads, network._work, network._iwork, row, images[0])
            run(1)
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                run(calls)
                best = min(best, (time.perf_counter() - t0) / calls)
            figures[f"{way}_us"] = best * 1e6
            figures[f"{way}_gflops"] = figures[f"{way}_flops"] / (best * 1e9)
            figures[f"{way}_fraction_of_peak"] = figures[f"{way}_gflops"] / peak
            figures[f"{way}_flops_per_byte"] = figures[f"{way}_flops"] / figures[f"{way}_bytes"]
        rows.append(figures)
    return rows


def print_roofline(rows: list[dict], peak: float) -> None:
    print(f"  roofline, one sample, peak {peak:.0f} GFLOP/s (FMA loop):")
    print(f"  {'layer':>5} {'kernel':<16} {'way':<8} {'us':>7} {'kFLOP':>8} {'KB':>7} {'FLOP/B':>7} "
          f"{'GFLOP/s':>8} {'of peak':>8}")
    for figures in rows:
        for way in ("forward", "backward"):
            print(f"  {figures['layer']:5d} {figures['op']:<16} {way:<8} {figures[f'{way}_us']:7.2f} "
                  f"{figures[f'{way}_flops'] / 1e3:8.1f} {figures[f'{way}_bytes'] / 1e3:7.1f} "
                  f"{figures[f'{way}_flops_per_byte']:7.2f} {figures[f'{way}_gflops']:8.1f} "
                  f"{100 * figures[f'{way}_fraction_of_peak']:7.0f}%")


def bench_torch(grammar: str, batch: int, calls: int, rounds: int) -> float:
    """Microseconds per step of PyTorch eager on the same layer stack at this batch size."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    modules, shape = [], (1, 28, 28)
    for token in grammar.split(","):
        if token.startswith("conv"):
            f, rest = token[4:].split("k")
            k, p = (rest.split("p") + ["0"])[:2]
            modules.append(nn.Conv2d(shape[0], int(f), int(k), padding=int(p)))
            side = shape[1] + 2 * int(p) - int(k) + 1
            shape = (int(f), side, side)
        elif token == "relu":
            modules.append(nn.ReLU())
        elif token == "pool":
            modules.append(nn.MaxPool2d(2))
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        else:
            if len(shape) == 3:
                modules.append(nn.Flatten())
                shape = (shape[0] * shape[1] * shape[2],)
            modules.append(nn.Linear(shape[0], int(token[5:])))
            shape = (int(token[5:]),)
    model = nn.Sequential(*modules)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    images = torch.rand(batch, 1, 28, 28)
    labels = torch.randint(0, shape[0], (batch,))

    def step():
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()

    for _ in range(5):
        step()
    return _median_us(step, calls, rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="small", help="architecture, as the trainer's --arch (default small)")
    parser.add_argument("--k", type=int, default=1, help="samples per rank per step (default 1)")
    parser.add_argument("--vs-torch", action="store_true", help="also time PyTorch eager (needs torch: "
                        "pip install -e '.[torch]')")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median round is reported "
                        "(default 5)")
    parser.add_argument("--layers", action="store_true", help="also time each layer's kernels on their own")
    args = parser.parse_args(argv)
    if args.vs_torch and importlib.util.find_spec("torch") is None:
        print("cnnpar: error: --vs-torch: needs PyTorch, which is not installed: pip install -e '.[torch]'",
              file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    result = bench_numba(args.arch, 1, args.calls, args.rounds)
    if args.k != 1:
        batched = bench_numba(args.arch, args.k, max(args.calls // args.k, 20), args.rounds)
        result[f"step_us_per_sample_k{args.k}"] = batched["step_us_per_sample"]
    peak = fma_peak_gflops()
    result["peak_gflops"] = peak
    result["peak_method"] = "numba float32 FMA loop, 12 independent vector accumulators, 1 thread"
    result["blas_gflops"] = peak_gflops()
    result["blas_method"] = "numpy float32 matmul 192x192, BLAS pinned to 1 thread"
    result["fraction_of_peak"] = result["gflops"] / peak
    print(f"arch {args.arch} ({result['grammar']}), {result['n_params']} params, one core")
    print(f"  forward+backward per sample  {result['fwd_bwd_us_per_sample']:8.1f} us")
    print(f"  full step (zero, fwd+bwd, SGD){result['step_us']:8.1f} us   {result['samples_per_s']:.0f} samples/s")
    print(f"  {result['gflops']:.1f} GFLOP/s nominal = {100 * result['fraction_of_peak']:.0f}% of the "
          f"{peak:.0f} GFLOP/s peak ({result['peak_method']}; BLAS matmul {result['blas_gflops']:.0f})")
    print(f"  full step, grads zeroed inside the SGD pass (SGD.step(..., zero_grads=True)) "
          f"{result['step_us_zero_in_sgd']:.1f} us")
    if args.k != 1:
        print(f"  k={args.k}: {result[f'step_us_per_sample_k{args.k}']:.1f} us per sample")
    if args.layers:
        result["layers"] = bench_layers(args.arch, max(args.calls // 10, 50), 4 * args.rounds, peak)
        print_roofline(result["layers"], peak)
    if args.vs_torch:
        import torch

        torch_calls = max(args.calls // 10, 50)
        b1 = bench_torch(result["grammar"], 1, torch_calls, args.rounds)
        b64 = bench_torch(result["grammar"], 64, max(torch_calls // 10, 10), args.rounds)
        result.update({"torch_version": torch.__version__, "torch_b1_step_us": b1, "torch_b64_step_us": b64,
                       "torch_b64_step_us_per_sample": b64 / 64,
                       "speedup_vs_torch_b1": b1 / result["step_us"],
                       "speedup_vs_torch_b1_zero_in_sgd": b1 / result["step_us_zero_in_sgd"],
                       "speedup_vs_torch_b64_per_sample": (b64 / 64) / result["step_us"]})
        print(f"  PyTorch {torch.__version__} eager, 1 thread: batch 1 {b1:.1f} us/step (numba "
              f"{result['speedup_vs_torch_b1']:.1f}x faster), batch 64 {b64 / 64:.1f} us/sample (numba "
              f"{result['speedup_vs_torch_b64_per_sample']:.1f}x faster per sample)")
    result["bench_s"] = time.perf_counter() - t0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
