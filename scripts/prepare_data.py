"""Fine-tuning data: tokenizes text with a Hugging Face tokenizer into moetrain's token shards.

  prepare_data.py --tokenizer HF_DIR --input FILE(.txt|.jsonl) --out DIR [--val-fraction F]
                  [--text-field text] [--prompt-field prompt --response-field response]
                  [--append-eos] [--eos-token TOKEN]

Reads HF_DIR/tokenizer.json with the `tokenizers` package (no network, no transformers). Writes
DIR/train.bin and DIR/val.bin in the shard format of csrc/data/shard.h (uint8, uint16 or uint32
tokens: the narrowest that holds the vocabulary), byte for byte what the C++ writer writes.

- .txt: the whole file, learned everywhere. The last F of it (split after a newline) is validation.
- .jsonl with a text field: one document per line, learned everywhere.
- .jsonl with prompt and response fields (when the first record has both): prompt tokens then
  response tokens, and loss masks DIR/train.mask.bin and DIR/val.mask.bin (1 byte per token,
  1 = learned) so that only response tokens are learned.
The last F of the records (at least one) is validation; records keep their order.
--append-eos ends each document (each record; for .txt each of the two parts) with the EOS token:
--eos-token, else tokenizer_config.json's eos_token, else config.json's eos_token_id.

Run with third_party/venv/bin/python.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

SHARD_MAGIC = b"MOETOKS\0"
SHARD_VERSION = 1
MASK_MAGIC = b"MOEMASK\0"
MASK_VERSION = 1
MASK_HEADER_BYTES = 64
MASK_NAME_BYTES = MASK_HEADER_BYTES - 24
TEXT_CHUNK_CHARS = 1 << 20  # .txt is encoded in chunks of about this size, each ending at a newline


def fail(message):
    """One line on stderr, exit 1 (the convention of every moetrain command)."""
    print(f"[prepare_data] {message}", file=sys.stderr)
    sys.exit(1)


def bytes_per_token(vocab_size):
    """The narrowest width that holds every token id < vocab_size (shard.cpp's bytes_for_vocab)."""
    if vocab_size <= 1 << 8:
        return 1
    if vocab_size <= 1 << 16:
        return 2
    return 4


def write_atomically(path, data):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path, tokens, vocab_size):
    """A 32-byte header (magic, version, bytes per token, count, vocabulary size), then the tokens."""
    if not 1 <= vocab_size <= 1 << 32:
        raise ValueError(f"{path}: vocab_size {vocab_size} must be in [1, 2^32]")
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
        raise ValueError(f"{path}: token {int(ids[bad])} at index {bad} is outside the vocabulary [0, {vocab_size})")
    width = bytes_per_token(vocab_size)
    header = SHARD_MAGIC + struct.pack("<IIQQ", SHARD_VERSION, width, ids.size, vocab_size)
    body = ids.astype({1: "<u1", 2: "<u2", 4: "<u4"}[width]).tobytes()
    write_atomically(path, header + body)
    return width


def mask_path_for(shard_path):
    return shard_path[: -len(".bin")] + ".mask.bin" if shard_path.endswith(".bin") else shard_path + ".mask.bin"


def write_mask(shard_path, learned):
    """A 64-byte header (magic, version, reserved, count, the shard's file name), then 1 byte per token."""
    name = os.path.basename(shard_path).encode()
    if not 1 <= len(name) < MASK_NAME_BYTES:
        raise ValueError(f"{shard_path}: file name must be 1 to {MASK_NAME_BYTES - 1} bytes to fit the mask header")
    values = np.asarray(learned, dtype=np.uint8)
    if values.size and values.max() > 1:
        raise ValueError(f"{mask_path_for(shard_path)}: mask entries must be 0 or 1")
    header = MASK_MAGIC + struct.pack("<IIQ", MASK_VERSION, 0, values.size) + name.ljust(MASK_NAME_BYTES, b"\0")
    write_atomically(mask_path_for(shard_path), header + values.tobytes())


def vocab_size_of(tokenizer):
    """One past the largest id, added tokens included (ids may have gaps)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def find_eos(tokenizer, hf_dir, eos_token):
    if eos_token is None:
        config_path = os.path.join(hf_dir, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            eos_token = eos.get("content") if isinstance(eos, dict) else eos
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            fail(f"--append-eos: the EOS token {eos_token!r} is not in {hf_dir}/tokenizer.json")
        return eos_id
    config_path = os.path.join(hf_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            eos_id = json.load(f).get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if isinstance(eos_id, int):
            return eos_id
    fail(f"--append-eos: no EOS token: pass --eos-token, or put eos_token in {hf_dir}/tokenizer_config.json "
         f"or eos_token_id in {hf_dir}/config.json")


def split_text(text, val_fraction, path):
    """Right after the last newline at or before the target point, else the first one after it."""
    target = int(len(text) * (1.0 - val_fraction))
    split = text.rfind("\n", 0, target) + 1 if target > 0 else 0
    if split == 0:
        split = text.find("\n", target) + 1
    if split <= 0 or split >= len(text):
        fail(f"{path} ({len(text)} characters) is too small to split into non-empty train and validation parts at a "
             f"line boundary (val_fraction {val_fraction})")
    return text[:split], text[split:]


def encode_text(tokenizer, text):
    """tokenizer.encode(text) for a text of any size: chunks end at newlines; special tokens once, at the start."""
    ids, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= TEXT_CHUNK_CHARS else text.find("\n", start + TEXT_CHUNK_CHARS) + 1
        if end <= 0:
            end = len(text)
        ids.extend(tokenizer.encode(text[start:end], add_special_tokens=start == 0).ids)
        start = end
    return ids


def read_jsonl(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{line_number}: not valid JSON ({e.msg})")
            if not isinstance(record, dict):
                fail(f"{path}:{line_number}: expected a JSON object")
            records.append((line_number, record))
    return records


def field(path, line_number, record, name):
    value = record.get(name)
    if not isinstance(value, str):
        fail(f"{path}:{line_number}: field {name!r} is {'missing' if value is None else 'not a string'}")
    return value


def documents_from_jsonl(args, tokenizer, eos):
    """Per record: (token ids, mask or None)."""
    records = read_jsonl(args.input)
    if len(records) < 2:
        fail(f"{args.input} has {len(records)} records; train and validation need at least one each")
    first = records[0][1]
    pairs = args.prompt_field in first and args.response_field in first
    if not pairs and args.text_field not in first:
        fail(f"{args.input}:{records[0][0]}: has neither the text field {args.text_field!r} nor the prompt and "
             f"response fields {args.prompt_field!r}, {args.response_field!r}")
    tail = [eos] if eos is not None else []
    if not pairs:
        texts = [field(args.input, n, r, args.text_field) for n, r in records]
        return [(e.ids + tail, None) for e in tokenizer.encode_batch(texts)], False
    prompts = [field(args.input, n, r, args.prompt_field) for n, r in records]
    responses = [field(args.input, n, r, args.response_field) for n, r in records]
    prompt_ids = tokenizer.encode_batch(prompts)
    response_ids = tokenizer.encode_batch(responses, add_special_tokens=False)
    documents = []
    for p, r in zip(prompt_ids, response_ids):
        ids = p.ids + r.ids + tail
        documents.append((ids, [0] * len(p.ids) + [1] * (len(ids) - len(p.ids))))
    return documents, True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="folder holding tokenizer.json (a Hugging Face model)")
    parser.add_argument("--input", required=True, help=".txt or .jsonl file")
    parser.add_argument("--out", required=True, help="output folder: train.bin, val.bin (and their masks)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share kept for validation (default 0.05)")
    parser.add_argument("--text-field", default="text", help="jsonl field of plain documents (default text)")
    parser.add_argument("--prompt-field", default="prompt", help="jsonl field of prompts (default prompt)")
    parser.add_argument("--response-field", default="response", help="jsonl field of responses (default response)")
    parser.add_argument("--append-eos", action="store_true", help="end each document with the EOS token")
    parser.add_argument("--eos-token", help="the EOS token's text (default: from tokenizer_config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = parser.parse_args()

    # Shards a run may be reading are never replaced unless asked.
    held = [n for n in ("train.bin", "val.bin", "train.mask.bin", "val.mask.bin")
            if os.path.exists(os.path.join(args.out, n))]
    if held and not args.overwrite:
        fail(f"{args.out} already holds {', '.join(held)}: pass --overwrite to replace them, or choose another --out")

    if not 0.0 < args.val_fraction < 1.0:
        fail(f"--val-fraction {args.val_fraction} must be in (0, 1)")
    tokenizer_path = os.path.join(args.tokenizer, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        fail(f"{tokenizer_path} does not exist (--tokenizer names a Hugging Face folder)")
    if not os.path.isfile(args.input):
        fail(f"input file {args.input} does not exist")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    vocab_size = vocab_size_of(tokenizer)
    eos = find_eos(tokenizer, args.tokenizer, args.eos_token) if args.append_eos else None

    if args.input.endswith(".txt"):
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
        parts = split_text(text, args.val_fraction, args.input)
        tail = [eos] if eos is not None else []
        splits = {name: (encode_text(tokenizer, part) + tail, None) for name, part in zip(("train", "val"), parts)}
        masked = False
    elif args.input.endswith(".jsonl"):
        documents, masked = documents_from_jsonl(args, tokenizer, eos)
        n_val = max(1, min(len(documents) - 1, round(len(documents) * args.val_fraction)))
        splits = {}
        for name, docs in (("train", documents[:-n_val]), ("val", documents[-n_val:])):
            ids = [t for d, _ in docs for t in d]
            mask = [m for _, ms in docs for m in ms] if masked else None
            splits[name] = (ids, mask)
    else:
        fail(f"input file {args.input} must end in .txt or .jsonl")

    os.makedirs(args.out, exist_ok=True)
    for name, (ids, mask) in splits.items():
        shard = os.path.join(args.out, f"{name}.bin")
        try:
            width = write_shard(shard, ids, vocab_size)
            if mask is not None:
                write_mask(shard, mask)
            elif os.path.exists(mask_path_for(shard)):
                os.remove(mask_path_for(shard))  # a stale mask would mask these tokens
        except (OSError, ValueError) as e:
            fail(str(e))
        learned = f", {sum(mask)} learned" if mask is not None else ""
        print(f"[prepare_data] wrote {shard}: {len(ids)} tokens of uint{8 * width} (vocabulary {vocab_size}){learned}")
    if masked:
        print(f"[prepare_data] loss masks: {mask_path_for(os.path.join(args.out, 'train.bin'))} and "
              f"{mask_path_for(os.path.join(args.out, 'val.bin'))} (only response tokens are learned)")


if __name__ == "__main__":
    main()
