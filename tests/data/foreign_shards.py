"""Writers of the token formats other trainers use, for tests/data/test_formats.cpp. Written from the
published layouts, independently of moetrain's C++ reader:

  Megatron-LM indexed dataset (NVIDIA/Megatron-LM, megatron/core/datasets/indexed_dataset.py,
  _IndexWriter): PREFIX.bin holds the tokens of every document back to back; PREFIX.idx holds
  b"MMIDIDX\\x00\\x00", uint64 version 1, uint8 dtype code (8 = uint16, 4 = int32), uint64 sequence count,
  uint64 document-index count, int32 sequence lengths, int64 byte pointers, int64 document indices
  (0, then the end of each document in sequences).

  llm.c token shard (karpathy/llm.c, dev/data/data_common.py, write_datafile): 256 int32 header, [0] magic
  20240520, [1] version 1, [2] token count; then uint16 tokens.

  foreign_shards.py megatron PREFIX TOKENS DOC_LENGTHS DTYPE   DTYPE: uint16 or int32
  foreign_shards.py llmc OUT.bin TOKENS

TOKENS and DOC_LENGTHS are text files of whitespace-separated integers. Run with third_party/venv/bin/python.
"""
import struct
import sys

import numpy as np


def read_ints(path):
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def write_megatron(prefix, tokens, doc_lengths, dtype_name):
    assert sum(doc_lengths) == len(tokens), "document lengths must add up to the tokens"
    dtype, code = {"uint16": (np.uint16, 8), "int32": (np.int32, 4)}[dtype_name]
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        f.write(np.asarray(tokens, dtype=dtype).tobytes())
    pointers, at = [], 0
    for n in doc_lengths:
        pointers.append(at)
        at += n * itemsize
    document_indices = list(range(len(doc_lengths) + 1))  # one sequence per document
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(doc_lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(np.asarray(doc_lengths, dtype=np.int32).tobytes())
        f.write(np.asarray(pointers, dtype=np.int64).tobytes())
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes())


def write_llmc(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def main(argv):
    if len(argv) == 5 and argv[0] == "megatron":
        write_megatron(argv[1], read_ints(argv[2]), read_ints(argv[3]), argv[4])
    elif len(argv) == 3 and argv[0] == "llmc":
        write_llmc(argv[1], read_ints(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
