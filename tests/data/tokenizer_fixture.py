"""Tokenizers for the tests of scripts/prepare_data.py (tests/data/test_prepare_data.cpp), built with the
`tokenizers` package, and the tokenizer's own encoding as the reference.

  tokenizer_fixture.py bpe DIR             byte-level BPE trained on a fixed text (a few hundred tokens),
                                           EOS "<|endoftext|>"; DIR/tokenizer.json, DIR/tokenizer_config.json
  tokenizer_fixture.py words DIR N         word-level, words w0 .. w{N-1} plus [UNK] and <eos>
  tokenizer_fixture.py encode DIR IN OUT   IN: a JSON list of [text, add_special_tokens]; OUT: their ids

Run with third_party/venv/bin/python.
"""
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four.",
    "Mixture-of-experts models route each token to a few experts.",
    "Fine-tuning teaches a pretrained model to answer in a given way.",
] * 20


def save(tokenizer, out_dir, eos):
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": eos}, f)


def bpe(out_dir):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    save(tokenizer, out_dir, "<|endoftext|>")


def words(out_dir, n):
    vocab = {f"w{i}": i for i in range(n)}
    vocab["[UNK]"] = n
    vocab["<eos>"] = n + 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    save(tokenizer, out_dir, "<eos>")


def encode(tokenizer_dir, in_file, out_file):
    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    with open(in_file, encoding="utf-8") as f:
        items = json.load(f)
    ids = [tokenizer.encode(text, add_special_tokens=special).ids for text, special in items]
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(ids, f)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "bpe":
        bpe(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "words":
        words(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "encode":
        encode(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(__doc__)
