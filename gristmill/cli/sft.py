"""``gristmill sft``: fine-tune a causal LM on SFT shards (``gristmill.trainers.sft``).

::

    gristmill sft --model base/ --data out/shards --out sft-model --steps 1000
    torchrun --nproc_per_node 8 -m gristmill.cli sft --model base/ --data out/shards \\
        --out sft-model --bf16
"""

from __future__ import annotations

import argparse
import os

from gristmill.cli.errors import CommandError, config_error


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gristmill.trainers.sft import SFTConfig, train_sft

    try:
        cfg = SFTConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        lr=args.lr, min_lr=args.lr / 10, max_length=args.max_length,
                        seed=args.seed, bf16=args.bf16, device=args.device)
    except ValidationError as e:
        raise config_error("sft", e) from None
    if not os.path.isdir(args.model):
        raise CommandError(f"sft: --model {args.model} is not a folder (a saved model and "
                           f"tokenizer)")
    curves = train_sft(args.model, args.data, args.out, cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        import numpy as np

        print(f"sft: {cfg.steps} steps, final train loss {np.mean(curves.train_loss[-10:]):.4f}, "
              f"{curves.tokens:,} response tokens, {curves.seconds:.1f}s; saved to {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sft", help="fine-tune a causal LM on SFT shards (prompt, response)",
                              description="Fine-tune a causal LM on SFT shards, loss on the "
                              "response tokens only; under torchrun, DistributedDataParallel.")
    p.add_argument("--model", required=True, help="folder with the base model and tokenizer")
    p.add_argument("--data", required=True, nargs="+", help="parquet shards, folders or globs")
    p.add_argument("--out", required=True, help="folder for the fine-tuned model")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the init")
    p.add_argument("--bf16", action="store_true", help="autocast the forward pass to bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_run)
