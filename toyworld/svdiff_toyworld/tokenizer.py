"""The toy world's tokenizer: a real `CLIPTokenizer` whose vocabulary has every grammar word as one token.

The vocabulary is CLIP's byte-level layout (256 byte symbols, each also with the end-of-word mark `</w>`)
plus the merges that BPE learns on the grammar's words (`tokenizers`' `BpeTrainer`, trained until every
word is a single token), then `<|startoftext|>` and `<|endoftext|>`. Any other text still tokenizes (into
pieces), as with the real CLIP vocabulary. `write_tokenizer_files` makes `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from svdiff_trainer.tiny import bytes_to_unicode

from .world import vocabulary

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_merges(words: List[str]) -> List[Tuple[str, str]]:
    """BPE merges (in rank order) that make each of `words` one token, learned with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, end_of_word_suffix="</w>",
                                  show_progress=False, initial_alphabet=[])
    tok.train_from_iterator([" ".join(words)], trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_vocab() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = learn_merges(vocabulary())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt in CLIP's format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
                         model_max_length=MAX_LENGTH, pad_token=EOS)
