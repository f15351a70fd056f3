"""token_logprobs (ours) vs naive ``log_softmax(h @ W.T).gather`` : extra peak memory and time.

Each measurement runs in a fresh child process so that one method's freed memory
(kept by the allocator) cannot hide the next one's peak:

- CPU: extra peak = peak resident set size during the call (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``) minus the resident size just before.
- CUDA: extra peak = ``torch.cuda.max_memory_allocated`` during the call minus the
  memory allocated before it.

Time is the median of ``--repeats`` calls after one warm-up call.

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
    import torch

    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, device: str, tokens: int, vocab: int, dim: int, dtype: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from gristmill.ext import backend, token_logprobs

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, dim, generator=gen) * 0.5).to(device=device, dtype=dt)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device=device, dtype=dt)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    if method == "ours":
        fn, used = (lambda: token_logprobs(hidden, weight, targets)), backend(device)
    else:
        fn, used = (lambda: naive(hidden, weight, targets)), "naive"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        if device == "cuda":
            fn()  # the first call loads cuBLAS handles and workspaces: not the op's memory
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            sync()
            extra = torch.cuda.max_memory_allocated() - before
        else:
            # A tiny call starts the thread pool and BLAS (one-time costs, not the op's
            # memory); no full-size warm-up, whose freed buffers the allocator would keep.
            tiny = (hidden[:4], weight[:10], targets[:4] % 10)
            token_logprobs(*tiny) if method == "ours" else naive(*tiny)
            Path("/proc/self/clear_refs").write_text("5")
            before = _rss_bytes("VmRSS")
            fn()
            extra = _rss_bytes("VmHWM") - before
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return {"method": method, "backend": used, "extra_bytes": extra, "seconds": statistics.median(times)}


def run_child(args: argparse.Namespace, method: str, vocab: int) -> dict:
    cmd = [
        sys.executable, __file__, "--child", method, "--device", args.device,
        "--tokens", str(args.tokens), "--vocabs", str(vocab), "--dim", str(args.dim),
        "--dtype", args.dtype, "--repeats", str(args.repeats),
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
    parser.add_argument("--child", choices=["ours", "naive"])
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.device, args.tokens, int(args.vocabs), args.dim,
                       args.dtype, args.repeats)  # fmt: skip
        print(json.dumps(result))
        return 0
    print(f"device={args.device} N={args.tokens} d={args.dim} dtype={args.dtype}")
    header = f"{'V':>7} {'naive MiB':>10} {'ours MiB':>9} {'mem ratio':>9} {'naive s':>8} {'ours s':>8} {'time ratio':>10} backend"
    print(header)
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        base = run_child(args, "naive", vocab)
        ours = run_child(args, "ours", vocab)
        mem_ratio = ours["extra_bytes"] / base["extra_bytes"]
        time_ratio = ours["seconds"] / base["seconds"]
        rows.append({"vocab": vocab, "naive": base, "ours": ours, "mem_ratio": mem_ratio,
                     "time_ratio": time_ratio})  # fmt: skip
        print(
            f"{vocab:>7} {base['extra_bytes'] / 2**20:>10.1f} {ours['extra_bytes'] / 2**20:>9.1f} "
            f"{mem_ratio:>9.4f} {base['seconds']:>8.4f} {ours['seconds']:>8.4f} {time_ratio:>10.3f} "
            f"{ours['backend']}"
        )
    if os.environ.get("BENCH_JSON"):
        Path(os.environ["BENCH_JSON"]).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
