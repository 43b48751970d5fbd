"""Fine-tuning data: tokenizes text with a Hugging Face tokenizer into moetrain's token shards.

  prepare_data.py --tokenizer HF_DIR --input FILE(.txt|.jsonl) --out DIR [--val-fraction F]
                  [--text-field text] [--prompt-field prompt --response-field response]
                  [--append-eos] [--eos-token TOKEN] [--workers N] [--shard-tokens N]

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

Big corpora: with --workers N or --shard-tokens N the input is streamed, never held whole. A first
pass counts it (characters of a .txt, records of a .jsonl) to place the validation split exactly
where the in-memory path puts it; the second encodes batches (text chunks ending at a newline, or
records) on N worker processes, in order, and writes each split as it comes. With --shard-tokens
the splits become DIR/train-00000.bin, train-00001.bin, ... (and val-*), each of at most N tokens,
cut between documents where one fits (a longer document is cut where the shard is full), with a
mask beside each shard; moetrain reads such a folder as one split (data.dir). The tokens, in order,
are exactly those of the in-memory path whatever the number of workers.

Run with third_party/venv/bin/python.
"""
import argparse
import glob
import json
import multiprocessing
import os
import struct
import sys
import time

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


def parse_record(path, line_number, line):
    """One jsonl line as a JSON object, or a one-line error naming the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        fail(f"{path}:{line_number}: not valid JSON ({e.msg})")
    if not isinstance(record, dict):
        fail(f"{path}:{line_number}: expected a JSON object")
    return record


def read_jsonl(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                records.append((line_number, parse_record(path, line_number, line)))
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


# ---- streaming: inputs larger than memory, several workers, bounded shards ---------------------------

_worker_tokenizer = None


def _load_worker(tokenizer_path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def _encode_job(job):
    """One batch of work: ("text", chunk, add_special_tokens) or ("records", texts, prompts, responses)."""
    if job[0] == "text":
        return [_worker_tokenizer.encode(job[1], add_special_tokens=job[2]).ids]
    _, texts, prompts, responses = job
    if texts is not None:
        return [(e.ids, None) for e in _worker_tokenizer.encode_batch(texts)]
    p = _worker_tokenizer.encode_batch(prompts)
    r = _worker_tokenizer.encode_batch(responses, add_special_tokens=False)
    return [(a.ids + b.ids, len(a.ids)) for a, b in zip(p, r)]


class ShardWriter:
    """Writes one split as it comes: one shard (NAME.bin) or, with a limit, NAME-00000.bin, ... each of at
    most `limit` tokens, cut between documents where the next document fits."""

    def __init__(self, out_dir, name, vocab_size, limit, masked):
        self.out_dir, self.name, self.vocab_size, self.limit, self.masked = out_dir, name, vocab_size, limit, masked
        self.ids, self.mask, self.files, self.tokens, self.learned = [], [], [], 0, 0

    def add(self, ids, mask=None):
        if self.limit and self.ids and len(self.ids) + len(ids) > self.limit:
            self.flush()  # the document starts the next shard
        while self.limit and len(ids) > self.limit - len(self.ids):  # a document longer than a shard
            room = self.limit - len(self.ids)
            self._append(ids[:room], None if mask is None else mask[:room])
            self.flush()
            ids, mask = ids[room:], None if mask is None else mask[room:]
        self._append(ids, mask)

    def _append(self, ids, mask):
        self.ids.extend(ids)
        if self.masked:
            self.mask.extend(mask if mask is not None else [1] * len(ids))

    def written(self):
        names = {os.path.basename(path) for path, _, _ in self.files}
        return names | ({os.path.basename(mask_path_for(os.path.join(self.out_dir, n))) for n in names} if self.masked else set())

    def flush(self):
        if not self.ids and self.files:
            return
        path = os.path.join(self.out_dir, f"{self.name}-{len(self.files):05d}.bin" if self.limit else f"{self.name}.bin")
        width = write_shard(path, self.ids, self.vocab_size)
        if self.masked:
            write_mask(path, self.mask)
            self.learned += sum(self.mask)
        self.files.append((path, len(self.ids), width))
        self.tokens += len(self.ids)
        self.ids, self.mask = [], []


def text_chunks(path, start_char, end_char):
    """The characters [start_char, end_char) of a .txt in chunks of about TEXT_CHUNK_CHARS, each ending at
    a newline (as encode_text cuts them, counted from start_char): (chunk, is_first)."""
    with open(path, encoding="utf-8") as f:
        skip = start_char
        while skip > 0:
            skip -= len(f.read(min(skip, TEXT_CHUNK_CHARS)))
        left, pending, first = end_char - start_char, "", True
        while left > 0 or pending:
            while len(pending) <= TEXT_CHUNK_CHARS and left > 0:
                piece = f.read(min(left, TEXT_CHUNK_CHARS))
                if not piece:
                    left = 0
                    break
                left -= len(piece)
                pending += piece
            if len(pending) <= TEXT_CHUNK_CHARS:
                end = len(pending)
            else:
                end = pending.find("\n", TEXT_CHUNK_CHARS) + 1
                while end <= 0 and left > 0:  # no newline yet: read on until one comes
                    piece = f.read(min(left, TEXT_CHUNK_CHARS))
                    left -= len(piece)
                    pending += piece
                    end = pending.find("\n", TEXT_CHUNK_CHARS) + 1
                if end <= 0:
                    end = len(pending)
            yield pending[:end], first
            pending, first = pending[end:], False


def text_split_point(path, val_fraction):
    """split_text's boundary, found by streaming: the characters of the file and where train ends."""
    total, newlines = 0, []  # the last newline at or before the target, and the first after it
    with open(path, encoding="utf-8") as f:
        for piece in iter(lambda: f.read(TEXT_CHUNK_CHARS), ""):
            total += len(piece)
    target = int(total * (1.0 - val_fraction))
    before, after, seen = -1, -1, 0
    with open(path, encoding="utf-8") as f:
        for piece in iter(lambda: f.read(TEXT_CHUNK_CHARS), ""):
            lo = max(0, min(len(piece), target - seen))  # newlines at index < target count as "before"
            i = piece.rfind("\n", 0, lo)
            if i >= 0:
                before = seen + i
            if after < 0:
                j = piece.find("\n", lo)
                if j >= 0 and seen + j >= target:
                    after = seen + j
            seen += len(piece)
    split = before + 1 if target > 0 and before >= 0 else 0
    if split == 0:
        split = after + 1 if after >= 0 else 0
    if split <= 0 or split >= total:
        fail(f"{path} ({total} characters) is too small to split into non-empty train and validation parts at a "
             f"line boundary (val_fraction {val_fraction})")
    return split, total


def record_batches(args, first_record, start, end, batch):
    """Records [start, end) of a .jsonl (blank lines skipped) as jobs of up to `batch` records."""
    pairs = args.prompt_field in first_record and args.response_field in first_record
    chunk, index = [], 0
    with open(args.input, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if start <= index < end:
                chunk.append((line_number, parse_record(args.input, line_number, line)))
                if len(chunk) == batch:
                    yield records_job(args, chunk, pairs)
                    chunk = []
            index += 1
    if chunk:
        yield records_job(args, chunk, pairs)


def records_job(args, chunk, pairs):
    if not pairs:
        return ("records", [field(args.input, n, r, args.text_field) for n, r in chunk], None, None)
    return ("records", None, [field(args.input, n, r, args.prompt_field) for n, r in chunk],
            [field(args.input, n, r, args.response_field) for n, r in chunk])


def count_records(args):
    """Non-blank lines, and the first record (which decides text or prompt/response)."""
    count, first = 0, None
    with open(args.input, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if first is None:
                first = parse_record(args.input, line_number, line)
                if args.prompt_field not in first or args.response_field not in first:
                    if args.text_field not in first:
                        fail(f"{args.input}:{line_number}: has neither the text field {args.text_field!r} nor the "
                             f"prompt and response fields {args.prompt_field!r}, {args.response_field!r}")
            count += 1
    return count, first


def prepare_streaming(args, tokenizer_path, vocab_size, eos):
    tail = [eos] if eos is not None else []
    os.makedirs(args.out, exist_ok=True)
    started, total_tokens, written = time.monotonic(), 0, set()
    with multiprocessing.Pool(args.workers, initializer=_load_worker, initargs=(tokenizer_path,)) as pool:
        if args.input.endswith(".txt"):
            split, total = text_split_point(args.input, args.val_fraction)
            masked = False
            for name, (lo, hi) in (("train", (0, split)), ("val", (split, total))):
                writer = ShardWriter(args.out, name, vocab_size, args.shard_tokens, masked)
                jobs = (("text", chunk, first) for chunk, first in text_chunks(args.input, lo, hi))
                for (ids,) in pool.imap(_encode_job, jobs):
                    writer.add(ids)
                writer.add(tail)
                writer.flush()
                report(writer, vocab_size)
                total_tokens += writer.tokens
                written |= writer.written()
        elif args.input.endswith(".jsonl"):
            count, first = count_records(args)
            if count < 2:
                fail(f"{args.input} has {count} records; train and validation need at least one each")
            masked = args.prompt_field in first and args.response_field in first
            n_val = max(1, min(count - 1, round(count * args.val_fraction)))
            for name, (lo, hi) in (("train", (0, count - n_val)), ("val", (count - n_val, count))):
                writer = ShardWriter(args.out, name, vocab_size, args.shard_tokens, masked)
                for documents in pool.imap(_encode_job, record_batches(args, first, lo, hi, args.batch_records)):
                    for ids, prompt_len in documents:
                        mask = None if prompt_len is None else [0] * prompt_len + [1] * (len(ids) - prompt_len + len(tail))
                        writer.add(ids + tail, mask)
                writer.flush()
                report(writer, vocab_size)
                total_tokens += writer.tokens
                written |= writer.written()
        else:
            fail(f"input file {args.input} must end in .txt or .jsonl")
    took = time.monotonic() - started
    print(f"[prepare_data] {total_tokens} tokens in {took:.2f} s ({total_tokens / max(took, 1e-9):.0f} tokens/s, "
          f"{args.workers} worker{'s' if args.workers > 1 else ''})")
    return written


def report(writer, vocab_size):
    for path, n, width in writer.files:
        print(f"[prepare_data] wrote {path}: {n} tokens of uint{8 * width} (vocabulary {vocab_size})")
    if writer.masked:
        print(f"[prepare_data] {writer.name}: {writer.learned} of {writer.tokens} tokens learned (loss masks beside "
              f"each shard)")


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
    parser.add_argument("--workers", type=int, default=1, help="processes encoding batches in parallel (streams the input)")
    parser.add_argument("--shard-tokens", type=int, default=0,
                        help="at most this many tokens per shard: train-00000.bin, ... (streams the input)")
    parser.add_argument("--batch-records", type=int, default=1000, help="jsonl records per worker batch (default 1000)")
    args = parser.parse_args()

    # Shards a run may be reading are never replaced unless asked; old shards of a split are removed
    # with --overwrite (a stale train-00007.bin would join the new ones).
    held = sorted(os.path.basename(p) for pattern in ("train*.bin", "val*.bin")
                  for p in glob.glob(os.path.join(glob.escape(args.out), pattern)))
    if held and not args.overwrite:
        fail(f"{args.out} already holds {', '.join(held)}: pass --overwrite to replace them, or choose another --out")

    if not 0.0 < args.val_fraction < 1.0:
        fail(f"--val-fraction {args.val_fraction} must be in (0, 1)")
    if args.workers < 1:
        fail(f"--workers {args.workers} must be at least 1")
    if args.shard_tokens < 0 or args.batch_records < 1:
        fail(f"--shard-tokens {args.shard_tokens} must be >= 0 and --batch-records {args.batch_records} >= 1")
    tokenizer_path = os.path.join(args.tokenizer, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        fail(f"{tokenizer_path} does not exist (--tokenizer names a Hugging Face folder)")
    if not os.path.isfile(args.input):
        fail(f"input file {args.input} does not exist")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    vocab_size = vocab_size_of(tokenizer)
    eos = find_eos(tokenizer, args.tokenizer, args.eos_token) if args.append_eos else None
    if args.workers > 1 or args.shard_tokens > 0:
        written = prepare_streaming(args, tokenizer_path, vocab_size, eos)
        remove_stale(args.out, held, written)
        return

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
        except (OSError, ValueError) as e:
            fail(str(e))
        learned = f", {sum(mask)} learned" if mask is not None else ""
        print(f"[prepare_data] wrote {shard}: {len(ids)} tokens of uint{8 * width} (vocabulary {vocab_size}){learned}")
    if masked:
        print(f"[prepare_data] loss masks: {mask_path_for(os.path.join(args.out, 'train.bin'))} and "
              f"{mask_path_for(os.path.join(args.out, 'val.bin'))} (only response tokens are learned)")
    remove_stale(args.out, held, {f"{name}.bin" for name in splits} | ({f"{name}.mask.bin" for name in splits} if masked else set()))


def remove_stale(out_dir, held, written):
    """Once the new shards are written: the old ones they did not replace (a stale train-00007.bin or
    mask would join or mask the new data)."""
    for name in held:
        if name not in written and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


if __name__ == "__main__":
    main()
