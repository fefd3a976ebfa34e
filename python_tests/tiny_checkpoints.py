"""Tiny local checkpoints of the supported families, built offline, for tests that need a ``--model PATH``.

:func:`make_tiny_checkpoint` writes a directory that looks like a hub download (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) for a model with hidden size 32,
two layers and a vocabulary of a few hundred tokens.  Nothing touches a hub: the config is written by
hand, the weights are drawn from a seeded stream (the global RNG is left as it was, and the same
arguments give the same files), and the tokenizer is built in-process:

* ``bert``, ``distilbert``: WordPiece over a vocabulary of the corpus' words and characters
  (``[PAD]`` is a token, as in real BERT checkpoints);
* ``gpt2``, ``roberta``: byte-level BPE trained on :data:`CORPUS`; GPT-2's has ``<|endoftext|>`` as
  bos/eos and **no pad token** (as the real one), so the "pad = eos" rule of
  :func:`sft_kernels.split.pretrained.load_classifier` is exercised; RoBERTa's has ``<pad>``;
* ``llama``: SentencePiece-style BPE (``▁`` word marker, byte fallback) with ``<s>``/``</s>``/``<unk>``
  and no pad token, adding ``<s>`` in front as Llama's tokenizer does;
* ``qwen2``, ``mistral`` (:data:`LLAMA_STYLE`, built on request, not in :data:`FAMILIES`): their own
  model classes (Mistral with a sliding window); Qwen2's tokenizer is byte-level BPE with
  ``<|endoftext|>`` as eos and pad (as the real one), Mistral's is the ``llama`` one (as the real one).

Any text can be tokenized (the byte-level and byte-fallback vocabularies cover every byte; WordPiece
falls back to characters, then ``[UNK]``).  Building one takes well under a second once transformers
is imported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

#: The families :func:`make_tiny_checkpoint` builds (and tests parametrize over).
FAMILIES = ("bert", "distilbert", "roberta", "gpt2", "llama")
#: More Llama-style families it builds on request (a Llama tokenizer, their own model classes).
LLAMA_STYLE = ("qwen2", "mistral")

#: The text the tokenizers are built from; tests may tokenize anything, these words just get merges.
CORPUS = (
    "the cat sat on the mat",
    "a dog ran in the park with the ball",
    "edge devices keep their text private",
    "the cloud runs the rest of the model",
    "fine tuning a split transformer is cheap",
    "hello world, this is a tiny checkpoint!",
)

_HIDDEN, _HEADS, _FFN, _POSITIONS = 32, 4, 64, 128
_BYTE_FALLBACK = [f"<0x{i:02X}>" for i in range(256)]


def make_tiny_checkpoint(family: str, path: Union[str, Path], *, with_head: bool = False, num_labels: int = 2,
                         num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny ``family`` checkpoint and its tokenizer into directory ``path`` (created); return it.

    ``with_head=False`` saves the base model (``BertModel``, ``GPT2Model``...), as a pretrained encoder
    or decoder is published; ``with_head=True`` saves a ``*ForSequenceClassification`` with a
    ``num_labels``-class head, as a fine-tuned checkpoint is.  ``num_layers`` >= 2 lets a split at
    layer 1 exist.  ``seed`` picks the weights; the global RNG is not touched.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    from sft_kernels.split.rng import seeded

    if family not in FAMILIES + LLAMA_STYLE:
        raise ValueError(f"family must be one of {FAMILIES + LLAMA_STYLE}, got {family!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    path = Path(path)
    tok = _make_tokenizer(family)
    config = _make_config(family, tok, num_layers)
    if with_head:
        config.num_labels = num_labels
    with seeded(seed):
        model = (AutoModelForSequenceClassification if with_head else AutoModel).from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_checkpoints(root: Union[str, Path], families: tuple[str, ...] = FAMILIES,
                          **kw: Any) -> dict[str, Path]:
    """``{family: directory}``: one :func:`make_tiny_checkpoint` per family under ``root/family``."""
    return {f: make_tiny_checkpoint(f, Path(root) / f, **kw) for f in families}


# ------------------------------------------------------------------------------------------ configs
def _make_config(family: str, tok: Any, num_layers: int) -> Any:
    """The hand-written config of a tiny ``family`` model whose vocabulary and special ids are ``tok``'s."""
    from transformers import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, \
        RobertaConfig

    vocab = len(tok)
    if family == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=_HIDDEN, num_hidden_layers=num_layers,
                          num_attention_heads=_HEADS, intermediate_size=_FFN, max_position_embeddings=_POSITIONS,
                          type_vocab_size=2, pad_token_id=tok.pad_token_id)
    if family == "distilbert":
        return DistilBertConfig(vocab_size=vocab, dim=_HIDDEN, n_layers=num_layers, n_heads=_HEADS, hidden_dim=_FFN,
                                max_position_embeddings=_POSITIONS, pad_token_id=tok.pad_token_id)
    if family == "roberta":  # positions start after pad_token_id, hence the + 2
        return RobertaConfig(vocab_size=vocab, hidden_size=_HIDDEN, num_hidden_layers=num_layers,
                             num_attention_heads=_HEADS, intermediate_size=_FFN,
                             max_position_embeddings=_POSITIONS + 2, type_vocab_size=1,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    if family == "gpt2":  # like the real one: no pad_token_id
        return GPT2Config(vocab_size=vocab, n_embd=_HIDDEN, n_layer=num_layers, n_head=_HEADS, n_inner=_FFN,
                          n_positions=_POSITIONS, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    llama_style = dict(vocab_size=vocab, hidden_size=_HIDDEN, num_hidden_layers=num_layers,
                       num_attention_heads=_HEADS, num_key_value_heads=_HEADS // 2, intermediate_size=_FFN,
                       max_position_embeddings=_POSITIONS, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=None)
    if family == "qwen2":
        return Qwen2Config(**llama_style)
    if family == "mistral":
        return MistralConfig(**llama_style, sliding_window=4)
    return LlamaConfig(**llama_style)


# ------------------------------------------------------------------------------------------ tokenizers
def _make_tokenizer(family: str) -> Any:
    """The family's own transformers tokenizer class over a vocabulary built from :data:`CORPUS`."""
    from tokenizers import pre_tokenizers
    from transformers import BertTokenizer, GPT2Tokenizer, LlamaTokenizer, Qwen2Tokenizer, RobertaTokenizer

    if family in ("bert", "distilbert"):
        return BertTokenizer(vocab=_wordpiece_vocab())
    if family == "gpt2":
        vocab, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                                   pre_tokenizers.ByteLevel.alphabet(), ["<|endoftext|>"])
        return GPT2Tokenizer(vocab=vocab, merges=merges)  # pad_token=None, as GPT-2's
    if family == "qwen2":
        vocab, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                                   pre_tokenizers.ByteLevel.alphabet(), ["<|endoftext|>"])
        return Qwen2Tokenizer(vocab=vocab, merges=merges)  # eos = pad = <|endoftext|>, no bos, as Qwen2's
    if family == "roberta":
        vocab, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                                   pre_tokenizers.ByteLevel.alphabet(), ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return RobertaTokenizer(vocab=vocab, merges=merges)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    vocab, merges = _train_bpe(metaspace, [], ["<unk>", "<s>", "</s>", *_BYTE_FALLBACK])
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _wordpiece_vocab() -> dict[str, int]:
    """BERT-style vocabulary: the special tokens, the corpus' words, and every printable ASCII character
    alone and as a ``##`` continuation (so unseen words split into characters rather than ``[UNK]``)."""
    chars = [chr(c) for c in range(33, 127)]
    words = sorted({w.strip(",!") for line in CORPUS for w in line.split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def _train_bpe(pre_tokenizer: Any, alphabet: list[str], special: list[str],
               vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of a BPE trained on :data:`CORPUS` with ``pre_tokenizer``, special tokens first."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=special,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]
