"""Hugging Face tokenizers for the tests of RL prompt sets (scripts/prepare_data.py --rl, and `moetrain rl`
on them: tests/rl/test_hf_prompts.cpp), and transformers as the reference for what the set must hold.

  hf_prompts_fixture.py setup DIR
      DIR/bpe    byte-level BPE (as Qwen's) with ChatML special tokens and a ChatML chat template;
                 tokenizer_config.json's eos_token <|im_end|>, generation_config.json's eos_token_id
                 [<|im_end|>, <|endoftext|>]
      DIR/spm    SentencePiece-style BPE (as Mixtral's): "▁" for spaces, byte fallback for what the vocabulary
                 lacks, <s> added in front of every text, EOS </s>
      DIR/words  word-level without a decoder (refused: its decode is not a concatenation)
      DIR/plain.jsonl, DIR/chat.jsonl   prompts and answers; chats as messages
  hf_prompts_fixture.py reference TOK_DIR INPUT OUT [plain|chat|chat-prompt]
      transformers' ids of each record's prompt (tokenizer(prompt), or apply_chat_template(messages or
      the prompt as a user turn, add_generation_prompt=True)) and their decode(skip_special_tokens=False):
      {"ids": [[...]], "texts": [...]}
  hf_prompts_fixture.py decode TOK_DIR IN OUT
      IN a JSON list of id lists (and texts); OUT their transformers decode(skip_special_tokens=False) (and
      the texts' encode(add_special_tokens=False))

Run with third_party/venv/bin/python; transformers is read from the same venv, offline.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

CORPUS = ["Question: what is 12 plus 30? Answer: 42.", "The quick brown fox jumps over the lazy dog.",
          "Think step by step, then give the answer in <answer></answer> tags.", "7 + 5 = 12; 30 - 8 = 22"] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = [("What is 12 plus 30?", "42"), ("Compute 7 + 5, think first.", "12"),
           ("Née à Zürich: 日本 🙂 what is 30 - 8?", "22"), ("  leading spaces and a\ttab", {"value": 3})]


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)


def setup(out_dir):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_tokens([AddedToken("<answer>", special=False), AddedToken("</answer>", special=False)])
    os.makedirs(os.path.join(out_dir, "bpe"), exist_ok=True)
    bpe.save(os.path.join(out_dir, "bpe", "tokenizer.json"))
    write_json(os.path.join(out_dir, "bpe", "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "clean_up_tokenization_spaces": False, "chat_template": CHATML})
    write_json(os.path.join(out_dir, "bpe", "generation_config.json"),
               {"eos_token_id": [bpe.token_to_id("<|im_end|>"), bpe.token_to_id("<|endoftext|>")]})

    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    spm.train_from_iterator([c.replace(" ", "▁") for c in CORPUS], trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=[], show_progress=False))
    spec = json.loads(spm.to_str())  # the byte pieces join the model's vocabulary, as in Mixtral's tokenizer.json
    vocab = spec["model"]["vocab"]
    for piece in byte_tokens:
        vocab.setdefault(piece, len(vocab))
    spm = Tokenizer.from_str(json.dumps(spec))
    spm.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", spm.token_to_id("<s>"))])
    os.makedirs(os.path.join(out_dir, "spm"), exist_ok=True)
    spm.save(os.path.join(out_dir, "spm", "tokenizer.json"))
    write_json(os.path.join(out_dir, "spm", "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "clean_up_tokenization_spaces": False})

    words = Tokenizer(models.WordLevel({"what": 0, "is": 1, "[UNK]": 2, "<eos>": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(os.path.join(out_dir, "words"), exist_ok=True)
    words.save(os.path.join(out_dir, "words", "tokenizer.json"))
    write_json(os.path.join(out_dir, "words", "tokenizer_config.json"), {"eos_token": "<eos>"})

    with open(os.path.join(out_dir, "plain.jsonl"), "w", encoding="utf-8") as f:
        for prompt, answer in PROMPTS:
            f.write(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "chat.jsonl"), "w", encoding="utf-8") as f:
        for prompt, answer in PROMPTS:
            messages = [{"role": "system", "content": "Answer in <answer></answer>."}, {"role": "user", "content": prompt}]
            f.write(json.dumps({"messages": messages, "answer": answer}, ensure_ascii=False) + "\n")


def reference(tok_dir, input_path, out_path, mode):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    with open(input_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    ids = []
    for record in records:
        if mode == "plain":
            ids.append(list(tokenizer(record["prompt"])["input_ids"]))
            continue
        messages = record["messages"] if mode == "chat" else [{"role": "user", "content": record["prompt"]}]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids.append(list(out["input_ids"]))
    named = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<s>", "</s>")
             if t in tokenizer.get_vocab()}
    write_json(out_path, {"ids": ids, "texts": [tokenizer.decode(i, skip_special_tokens=False) for i in ids],
                          "token_ids": named})


def decode(tok_dir, in_path, out_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    with open(in_path, encoding="utf-8") as f:
        items = json.load(f)
    write_json(out_path, [tokenizer.decode(x, skip_special_tokens=False) if isinstance(x, list)
                          else tokenizer.encode(x, add_special_tokens=False) for x in items])


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "setup":
        setup(args[1])
    elif len(args) == 5 and args[0] == "reference":
        reference(args[1], args[2], args[3], args[4])
    elif len(args) == 4 and args[0] == "decode":
        decode(args[1], args[2], args[3])
    else:
        raise SystemExit(__doc__)
