"""`prepare_data.py --rl`: RL prompt sets tokenized with a Hugging Face tokenizer, for `moetrain rl`.

  prepare_data.py --rl --tokenizer HF_DIR --input FILE.jsonl --out DIR
                  [--prompt-field prompt | --messages-field messages] [--answer-field answer]
                  [--chat-prompt] [--chat-template FILE] [--chat-template-name NAME]
                  [--stop-token TEXT ...] [--overwrite]

Each record holds a prompt and its answer: {"prompt": "...", "answer": "..."} (the prompt tokenized as
`tokenizer(prompt)` does, the tokenizer's own special tokens such as BOS included), or a chat
{"messages": [...], "answer": "..."} rendered with the tokenizer's chat template and its generation
prompt, as apply_chat_template(messages, add_generation_prompt=True) renders it, then tokenized without
added special tokens. --chat-prompt turns a "prompt" string into one user message first. A non-string
answer is kept as its compact JSON text, as `moetrain prepare-data --rl` keeps it. The set is three
files in DIR:

  prompts.bin            a version-2 shard (csrc/data/shard.h): each prompt one document
  prompts.tokens.json    the token table: each token id's bytes, so that moetrain (which cannot run a
                         Hugging Face tokenizer) decodes completions for the rewards as the tokenizer's
                         own decode(ids, skip_special_tokens=False) does
  prompts.answers.jsonl  line 1 a header naming the shard, its sizes, a checksum of its tokens, the
                         tokenizer (and the sha256 of its tokenizer.json), the token table (and its
                         sha256) and the stop token ids; then one {"answer": ...} per prompt

Completions stop at the stop tokens: --stop-token TEXT (repeatable), else the EOS token of
tokenizer_config.json or config.json and every eos_token_id of generation_config.json (an instruct
model's end of turn). The stop token ends the completion and is not part of its text.

The token table covers the decoders of the MoE families moetrain imports: byte-level BPE (Qwen, DeepSeek,
OLMoE, GLM, gpt-oss), and SentencePiece-style ones (Metaspace, or Replace/ByteFallback/Fuse/Strip as
Mixtral's). Another decoder is refused. Before anything is written the table is checked against the
tokenizer: every token that decodes to text on its own, and every prompt of the set, decode through the
table exactly as the tokenizer decodes them.
"""
import hashlib
import json
import os

from tokenizers import Tokenizer

FORMAT = "moetrain-rl-prompts"
VERSION = 1
TABLE_FORMAT = "moetrain-token-table"
SHARD_NAME, TABLE_NAME, ANSWERS_NAME = "prompts.bin", "prompts.tokens.json", "prompts.answers.jsonl"


def byte_level_chars():
    """GPT-2's byte-to-character map, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """Token string -> its bytes under a tokenizer.json decoder, and the characters the decoder strips
    from the start of a whole text (SentencePiece's prefix space)."""

    def __init__(self, decoder, where, fail):
        self.steps, self.strip = [], None
        fused = False
        kinds = decoder.get("decoders", []) if decoder and decoder.get("type") == "Sequence" else [decoder]
        for d in kinds:
            kind = d.get("type") if isinstance(d, dict) else None
            if kind == "ByteLevel":
                self.steps.append(("byte_level", byte_level_chars()))
            elif kind == "ByteFallback":
                self.steps.append(("byte_fallback", None))
            elif kind == "Replace" and isinstance(d.get("pattern"), dict) and "String" in d["pattern"]:
                self.steps.append(("replace", (d["pattern"]["String"], d.get("content", ""))))
            elif kind == "Metaspace":
                self.steps.append(("replace", (d.get("replacement", "▁"), " ")))
                scheme = d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never")
                if scheme != "never":
                    self.strip = (" ", 1)
            elif kind == "Fuse":
                fused = True
            elif kind == "Strip" and not d.get("stop") and len(d.get("content", "")) == 1:
                if not fused:
                    fail(f"{where}: decoder Strip before Fuse strips every token; moetrain's token table "
                         f"cannot hold it")
                self.strip = (d["content"], int(d.get("start", 0)))
            else:
                fail(f"{where}: the decoder {kind or 'null'} is not one whose tokens moetrain can turn into bytes "
                     f"(ByteLevel, Metaspace, or Replace/ByteFallback/Fuse/Strip)")

    def piece(self, token):
        value = token  # a str, or bytes once a step has made the token bytes
        for step, arg in self.steps:
            if isinstance(value, bytes):
                break
            if step == "byte_level":  # a token with a character outside the map is kept whole, as tokenizers does
                if all(c in arg for c in value):
                    value = bytes(arg[c] for c in value)
            elif step == "byte_fallback":
                if len(value) == 6 and value.startswith("<0x") and value.endswith(">"):
                    try:
                        value = bytes([int(value[3:5], 16)])
                    except ValueError:
                        pass
            elif step == "replace":
                value = value.replace(*arg)
        return value if isinstance(value, bytes) else value.encode("utf-8")

    def text(self, pieces):
        data = b"".join(pieces)
        if self.strip:
            char, count = self.strip[0].encode("utf-8"), self.strip[1]
            for _ in range(count):
                if data.startswith(char):
                    data = data[len(char):]
        return data


def token_table(tokenizer, tokenizer_path, fail):
    """(table document, the TokenBytes that made it). Holes in the ids get no bytes (decode skips them)."""
    with open(tokenizer_path, encoding="utf-8") as f:
        decoder = json.load(f).get("decoder")
    rules = TokenBytes(decoder, tokenizer_path, fail)
    size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    pieces = []
    for i in range(size):
        token = tokenizer.id_to_token(i)
        pieces.append(b"" if token is None else rules.piece(token))
    # Every token that is text on its own decodes as the tokenizer decodes it.
    ids = [i for i in range(size) if tokenizer.id_to_token(i) is not None]
    decoded = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    for i, want in zip(ids, decoded):
        try:
            got = rules.text([pieces[i]]).decode("utf-8")
        except UnicodeDecodeError:
            continue  # a byte or part of a character: checked within the prompts below
        if got != want:
            fail(f"{tokenizer_path}: token {i} {tokenizer.id_to_token(i)!r} decodes to {want!r}, the token table "
                 f"gives {got!r}")
    document = {"format": TABLE_FORMAT, "version": 1, "size": size,
                "strip": {"char": rules.strip[0], "count": rules.strip[1]} if rules.strip else None,
                "pieces": [p.hex() for p in pieces]}
    return document, rules


def fnv1a(tokens):
    """csrc/data/prompts.cpp's checksum of a set's tokens: FNV-1a 64, one step per token id."""
    h = 0xCBF29CE484222325
    for t in tokens:
        h = ((h ^ int(t)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def stop_ids(tokenizer, hf_dir, stop_tokens, fail):
    """--stop-token's ids, else every EOS the folder names: tokenizer_config.json's eos_token, config.json's
    and generation_config.json's eos_token_id (an int or a list)."""
    if stop_tokens:
        ids = []
        for text in stop_tokens:
            i = tokenizer.token_to_id(text)
            if i is None:
                fail(f"--stop-token {text!r} is not a token of {hf_dir}/tokenizer.json")
            ids.append(i)
        return sorted(set(ids))
    ids = set()
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id"),
                      ("generation_config.json", "eos_token_id")):
        path = os.path.join(hf_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                i = tokenizer.token_to_id(v)
                if i is None:
                    fail(f"{path}: {key} {v!r} is not a token of {hf_dir}/tokenizer.json")
                ids.add(i)
            elif isinstance(v, int) and not isinstance(v, bool):
                ids.add(v)
    if not ids:
        fail(f"no stop token: {hf_dir} names no EOS (tokenizer_config.json eos_token, or eos_token_id in config.json "
             f"or generation_config.json); pass --stop-token TEXT")
    return sorted(ids)


def prepare_rl(args, helpers):
    """helpers: prepare_data.py (its fail, load_tokenizer, ChatEncoder, chat_record, read_jsonl, write_shard and
    write_atomically)."""
    fail = helpers.fail
    tokenizer_path = os.path.join(args.tokenizer, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        fail(f"{tokenizer_path} does not exist (--tokenizer names a Hugging Face folder)")
    if not args.input.endswith(".jsonl") or not os.path.isfile(args.input):
        fail(f"--rl: input {args.input} must be an existing .jsonl of prompts and answers")
    paths = {name: os.path.join(args.out, name) for name in (SHARD_NAME, TABLE_NAME, ANSWERS_NAME)}
    held = [name for name, path in paths.items() if os.path.exists(path)]
    if held and not args.overwrite:
        fail(f"{args.out} already holds a prompt set ({', '.join(held)}): pass --overwrite to replace it, or choose "
             f"another --out")
    records = helpers.read_jsonl(args.input)
    if not records:
        fail(f"{args.input} holds no prompt")
    chat_wanted = args.chat_prompt or args.messages_field in records[0][1]
    chat = None
    if chat_wanted:
        chat = helpers.ChatEncoder({"hf_dir": args.tokenizer, "tokenizer_path": tokenizer_path,
                                    "template_file": args.chat_template, "template_name": args.chat_template_name,
                                    "learn": "all", "messages_field": args.messages_field})
    elif args.chat_template or args.chat_template_name:
        fail("--chat-template and --chat-template-name: only for chat prompts (a messages field, or --chat-prompt)")
    tokenizer = chat.tokenizer if chat else helpers.load_tokenizer(tokenizer_path)

    prompts, answers = [], []
    for n, record in records:
        where = f"{args.input}:{n}"
        if args.answer_field not in record:
            fail(f"{where}: field {args.answer_field!r} is missing")
        answer = record[args.answer_field]
        answers.append(answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False,
                                                                         separators=(",", ":")))
        if chat is not None and args.messages_field in record:
            messages, tools = helpers.chat_record(where, record, args.messages_field)
        else:
            prompt = record.get(args.prompt_field)
            if not isinstance(prompt, str) or not prompt:
                fail(f"{where}: field {args.prompt_field!r} is "
                     f"{'missing' if prompt is None else 'not a non-empty string'} (or give chats in "
                     f"{args.messages_field!r})")
            messages, tools = [{"role": "user", "content": prompt}], record.get("tools")
        if chat is not None:  # the chat, or the prompt as a user turn, with the generation prompt
            text = chat.render(where, chat.template_for(where, tools), messages, tools, True)
            prompts.append(tokenizer.encode(text, add_special_tokens=False).ids)
        else:
            prompts.append(tokenizer.encode(prompt).ids)
        if not prompts[-1]:
            fail(f"{where}: the prompt has no tokens")

    table, rules = token_table(tokenizer, tokenizer_path, fail)
    pieces = [bytes.fromhex(p) for p in table["pieces"]]
    for (n, _), ids, want in zip(records, prompts, tokenizer.decode_batch(prompts, skip_special_tokens=False)):
        got = rules.text([pieces[i] for i in ids]).decode("utf-8", errors="replace")
        if got != want:
            fail(f"{args.input}:{n}: the prompt decodes to {want[:60]!r} with the tokenizer, {got[:60]!r} through the "
                 f"token table")
    stops = stop_ids(tokenizer, args.tokenizer, args.stop_token, fail)

    tokens = [t for ids in prompts for t in ids]
    starts, at = [], 0
    for ids in prompts:
        starts.append(at)
        at += len(ids)
    table_bytes = json.dumps(table, separators=(",", ":")).encode("utf-8")
    with open(tokenizer_path, "rb") as f:
        tokenizer_sha = sha256_of(f.read())
    header = {"format": FORMAT, "version": VERSION, "shard": SHARD_NAME, "prompts": len(prompts), "tokens": len(tokens),
              "tokenizer": os.path.basename(os.path.normpath(args.tokenizer)), "tokenizer_sha256": tokenizer_sha,
              "checksum": fnv1a(tokens), "token_table": TABLE_NAME, "token_table_sha256": sha256_of(table_bytes),
              "stop_ids": stops}
    lines = [json.dumps(header)] + [json.dumps({"answer": a}, ensure_ascii=False) for a in answers]
    os.makedirs(args.out, exist_ok=True)
    # The shard and table first, the answers (whose header names both) last: a set cut off half-way is
    # refused by the reader, never read with the wrong prompts.
    try:
        width = helpers.write_shard(paths[SHARD_NAME], tokens, table["size"], starts)
        helpers.write_atomically(paths[TABLE_NAME], table_bytes)
        helpers.write_atomically(paths[ANSWERS_NAME], ("\n".join(lines) + "\n").encode("utf-8"))
    except (OSError, ValueError) as e:
        fail(str(e))
    print(f"[prepare_data] wrote {paths[SHARD_NAME]}: {len(prompts)} prompts, {len(tokens)} tokens of uint{8 * width} "
          f"(vocabulary {table['size']}); stop tokens {stops}; {paths[TABLE_NAME]}; {paths[ANSWERS_NAME]}")
