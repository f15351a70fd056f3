"""token_logprobs (ours) vs naive ``log_softmax(h @ W.T).gather``: extra peak memory and time.

Extra peak memory is measured in a fresh child process per method, so that one
method's freed buffers (kept by the allocator) cannot hide the other's peak; each
child first makes a tiny call of its method (thread pool, BLAS, cuBLAS handles are
one-time costs, not the op's memory), then one full call:

- CPU: peak resident set size during the call (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``) minus the resident size just before.
- CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory
  allocated before it.

Time is measured in one child that alternates the two methods (``--repeats``
rounds after a warm-up round) and takes each one's median, so that load from other
jobs on a shared machine falls on both alike.

Usage::

    python benchmarks/bench_logprob.py --device cpu --tokens 1024
    python benchmarks/bench_logprob.py --device cuda --tokens 8192 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def naive(hidden, weight, targets):
    """What a scorer would write without the op: full logits, then log_softmax."""
    import torch

    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(device: str, tokens: int, vocab: int, dim: int, dtype: str):
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, dim, generator=gen) * 0.5).to(device=device, dtype=dt)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device=device, dtype=dt)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    return hidden, weight, targets


def _methods():
    from gristmill.ext import token_logprobs

    return {"ours": token_logprobs, "naive": naive}


def child_memory(method: str, device: str, tokens: int, vocab: int, dim: int, dtype: str) -> dict:
    import torch

    hidden, weight, targets = _inputs(device, tokens, vocab, dim, dtype)
    fn = _methods()[method]
    with torch.no_grad():
        fn(hidden[:4], weight[:10], targets[:4] % 10)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn(hidden, weight, targets)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
        else:
            Path("/proc/self/clear_refs").write_text("5")
            before = _proc_status_bytes("VmRSS")
            fn(hidden, weight, targets)
            extra = _proc_status_bytes("VmHWM") - before
    return {"extra_bytes": extra}


def _timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def child_time(device: str, tokens: int, vocab: int, dim: int, dtype: str, repeats: int) -> dict:
    import torch

    from gristmill.ext import backend

    hidden, weight, targets = _inputs(device, tokens, vocab, dim, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in _methods()}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for name, fn in _methods().items():
                seconds = _timed(lambda fn=fn: fn(hidden, weight, targets), sync)
                if round_:  # round 0 warms up
                    times[name].append(seconds)
    result = {name: statistics.median(ts) for name, ts in times.items()}
    result["backend"] = backend(device)
    return result


def child_sweep(device: str, tokens: int, vocab: int, dim: int, dtype: str, repeats: int,
                tiles: str) -> list:  # fmt: skip
    """Time the compiled kernel at several ``TOKENSxVOCAB`` tiles in one process.

    On CUDA the extra peak per tile is exact (the caching allocator's counters); on
    the CPU only the time is reported.
    """
    import torch

    from gristmill.ext import build

    module = build.extension(device, required=True)
    hidden, weight, targets = _inputs(device, tokens, vocab, dim, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for tile in tiles.split(","):
        tt, vt = (int(x) for x in tile.split("x"))

        def fn(tt=tt, vt=vt):
            return module.token_logprobs(hidden, weight, targets, None, -100, tt, vt)

        fn()
        sync()
        extra = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            sync()
            extra = torch.cuda.max_memory_allocated() - before
        seconds = statistics.median(_timed(fn, sync) for _ in range(repeats))
        rows.append({"tile": tile, "extra_bytes": extra, "seconds": seconds})
    return rows


def run_child(args: argparse.Namespace, mode: str, vocab: int):
    cmd = [
        sys.executable, __file__, "--child", mode, "--device", args.device,
        "--tokens", str(args.tokens), "--vocabs", str(vocab), "--dim", str(args.dim),
        "--dtype", args.dtype, "--repeats", str(args.repeats), "--tiles", args.tiles,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocabs", default="32768,131072")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", default="", help="also time TOKENSxVOCAB tiles, comma-separated")
    parser.add_argument("--child", choices=["memory-ours", "memory-naive", "time", "sweep"])
    args = parser.parse_args()
    shape = (args.device, args.tokens, int(args.vocabs.split(",")[0]), args.dim, args.dtype)
    if args.child:
        if args.child.startswith("memory-"):
            result = child_memory(args.child.removeprefix("memory-"), *shape)
        elif args.child == "time":
            result = child_time(*shape, args.repeats)
        else:
            result = child_sweep(*shape, args.repeats, args.tiles)
        print(json.dumps(result))
        return 0

    print(f"device={args.device} N={args.tokens} d={args.dim} dtype={args.dtype}")
    print(f"{'V':>7} {'naive MiB':>10} {'ours MiB':>9} {'mem ratio':>9} {'naive s':>8} "
          f"{'ours s':>8} {'time ratio':>10} backend")  # fmt: skip
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        naive_mem = run_child(args, "memory-naive", vocab)["extra_bytes"]
        ours_mem = run_child(args, "memory-ours", vocab)["extra_bytes"]
        times = run_child(args, "time", vocab)
        row = {
            "vocab": vocab, "naive_extra_bytes": naive_mem, "ours_extra_bytes": ours_mem,
            "mem_ratio": ours_mem / naive_mem, "naive_seconds": times["naive"],
            "ours_seconds": times["ours"], "time_ratio": times["ours"] / times["naive"],
            "backend": times["backend"],
        }  # fmt: skip
        rows.append(row)
        print(
            f"{vocab:>7} {naive_mem / 2**20:>10.1f} {ours_mem / 2**20:>9.1f} "
            f"{row['mem_ratio']:>9.4f} {times['naive']:>8.4f} {times['ours']:>8.4f} "
            f"{row['time_ratio']:>10.3f} {times['backend']}"
        )
        if args.tiles:
            row["tiles"] = run_child(args, "sweep", vocab)
            for t in row["tiles"]:
                mib = "n/a" if t["extra_bytes"] is None else f"{t['extra_bytes'] / 2**20:.1f}"
                print(
                    f"{'':>7}   tile {t['tile']:>10}: extra {mib} MiB, {t['seconds']:.4f} s, "
                    f"time ratio {t['seconds'] / times['naive']:.3f}"
                )
    if os.environ.get("BENCH_JSON"):
        Path(os.environ["BENCH_JSON"]).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
