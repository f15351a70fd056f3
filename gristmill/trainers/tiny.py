"""Tiny tokenizers and language models built from a config, for tests and demos.

Nothing here downloads anything: a byte-level BPE is trained with the
``tokenizers`` library on the texts you give it, and a causal LM is
initialised at random from a small ``transformers`` config. Both are saved
with ``save_pretrained`` so the rest of gristmill loads them by path, exactly
as it would load a real checkpoint::

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> tok = build_tokenizer(["hello world"] * 10, vocab_size=300, path=d)
    >>> build_tiny_lm(d, d, n_layer=1, n_embd=32, n_head=2)  # doctest: +ELLIPSIS
    PosixPath(...)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
FAMILIES = ("llama", "gpt2")
# A byte-level BPE needs the 256 byte symbols plus the special tokens before
# it can learn a single merge.
MIN_VOCAB = 256 + 3


def build_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it to ``path``.

    Parameters
    ----------
    texts : iterable of str
        Training texts (streamed once).
    vocab_size : int
        Target vocabulary size including the special tokens; at least 259
        (256 bytes + bos/eos/pad). The result may be smaller when the texts
        offer fewer merges.
    path : str or Path
        Folder written with ``save_pretrained``; load it back with
        ``AutoTokenizer.from_pretrained(path)``.

    Returns
    -------
    PreTrainedTokenizerFast
        Loaded back from ``path`` (so ``name_or_path`` is ``path``), with ``bos_token``, ``eos_token`` and ``pad_token`` set. It adds no
        special tokens when encoding; callers append ``eos`` where they want
        document boundaries.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 bytes + 3 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    Path(path).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    # Reloaded so that ``name_or_path`` is the folder, which is what tokenized
    # corpora record as their tokenizer.
    return AutoTokenizer.from_pretrained(str(path))


def tiny_lm_config(
    vocab_size: int,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
    family: str = "llama",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """A small causal-LM config of the ``llama`` or ``gpt2`` family.

    Parameters
    ----------
    vocab_size : int
        Size of the embedding table (``len(tokenizer)``).
    n_layer, n_embd, n_head : int
        Depth, width and attention heads; ``n_embd`` must be divisible by
        ``n_head``.
    n_positions : int
        Longest sequence the model accepts.
    family : {"llama", "gpt2"}
        Architecture: Llama (RMSNorm, rotary, SwiGLU) or GPT-2 (learned
        positions, GELU MLP).
    bos_token_id, eos_token_id, pad_token_id : int, optional
        Special token ids, copied into the config.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for name, value in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_embd", n_embd),
                        ("n_head", n_head), ("n_positions", n_positions)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                          n_positions=n_positions, **ids)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=4 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=n_positions,
        tie_word_embeddings=True,
        **ids,
    )


def build_tiny_lm(tokenizer_path: str | Path, path: str | Path, **config_kw) -> Path:
    """Initialise a tiny causal LM at random for the tokenizer at ``tokenizer_path``.

    The model and a copy of the tokenizer are saved to ``path`` (which may be
    ``tokenizer_path`` itself), so ``AutoModelForCausalLM.from_pretrained(path)``
    and ``AutoTokenizer.from_pretrained(path)`` both work.

    Parameters
    ----------
    tokenizer_path : str or Path
        A folder saved by ``build_tokenizer`` (or any tokenizer folder).
    path : str or Path
        Output folder.
    **config_kw
        Passed to ``tiny_lm_config`` (``n_layer``, ``n_embd``, ``n_head``,
        ``n_positions``, ``family``). A ``seed`` keyword seeds the
        initialisation (default 0).

    Returns
    -------
    Path
        ``path``.
    """
    import torch

    seed = config_kw.pop("seed", 0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    config = tiny_lm_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
