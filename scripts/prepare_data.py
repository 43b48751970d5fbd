"""Fine-tuning data: tokenizes text and chats with a Hugging Face tokenizer into moetrain's token shards.

  prepare_data.py --tokenizer HF_DIR --input FILE(.txt|.jsonl) --out DIR [--val-fraction F]
                  [--text-field text] [--prompt-field prompt --response-field response]
                  [--messages-field messages] [--learn assistant|last-assistant|all]
                  [--chat-template FILE] [--chat-template-name NAME]
                  [--append-eos] [--eos-token TOKEN] [--workers N] [--shard-tokens N]

Reads HF_DIR/tokenizer.json with the `tokenizers` package (no network; chats need jinja2, not transformers).
Writes DIR/train.bin and DIR/val.bin in the shard format of csrc/data/shard.h (uint8, uint16 or uint32
tokens: the narrowest that holds the vocabulary), byte for byte what the C++ writer writes.

- .txt: the whole file, learned everywhere. The last F of it (split after a newline) is validation.
- .jsonl with a text field: one document per line, learned everywhere.
- .jsonl with prompt and response fields (when the first record has both): prompt tokens then
  response tokens, and loss masks DIR/train.mask.bin and DIR/val.mask.bin (1 byte per token,
  1 = learned) so that only response tokens are learned.
- .jsonl with a messages field (when the first record has one): chats, below.
The last F of the records (at least one) is validation; records keep their order.
--append-eos ends each document (each record; for .txt each of the two parts) with the EOS token:
--eos-token, else tokenizer_config.json's eos_token, else config.json's eos_token_id. It is learned.

Chats. A record is {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]} (tools optional;
messages may carry tool_calls, and role "tool" answers them). Each record is rendered with the
tokenizer's chat template as transformers' apply_chat_template(messages, tools=tools,
add_generation_prompt=False, tokenize=True) renders and tokenizes it, token for token:
- the template: --chat-template FILE; else HF_DIR/chat_template.jinja (and the named ones in
  HF_DIR/additional_chat_templates/NAME.jinja), else tokenizer_config.json's chat_template (a string,
  or a list of {name, template}). Of several named templates, --chat-template-name picks one, else
  "tool_use" for a record with tools (when there is one), else "default". Files win over the config,
  as in transformers.
- the same sandboxed jinja2 environment (trim_blocks, lstrip_blocks, loop controls, the generation
  tag, tojson without HTML escaping, raise_exception, strftime_now, dict, namespace); the template
  sees messages (null fields dropped, reasoning fields aliased), tools, documents (none),
  add_generation_prompt and the special tokens of tokenizer_config.json (bos_token, eos_token, ...,
  and other *_token entries) as strings.
- the text is encoded whole without added special tokens; special tokens named in
  tokenizer_config.json that tokenizer.json lacks as added tokens are added first, as transformers does.
--learn picks what the loss mask learns: `assistant` (default) every assistant turn, `last-assistant`
the final one, `all` every token (no mask is written then). An assistant turn's text is what the
render gains from the conversation up to it with the generation prompt (say "...<|im_start|>assistant\n")
to the conversation including it: its content and the template's end-of-turn markup (ChatML's
"<|im_end|>\n", Llama 3's "<|eot_id|>"), never its header. Every record's renders must nest (the
prompt render a prefix of the turn's, that a prefix of the whole chat's); a template that is not
prefix-stable (one that rewrites earlier turns, say drops their reasoning) is refused, naming the
record. A token is learned when its characters (the tokenizer's offsets) overlap a learned turn's
text; so a token that straddles a turn's boundary is learned; a token with no characters of its
own counts as the character where it stands. This is transformers' rule for {% generation %} masks.
Errors name the file, the line and the field: a record without messages, a message without a role
or a string content (content may be null or absent only beside tool_calls), a template that raises,
no chat template, no assistant turn to learn.

Documents. Every shard written from .jsonl is version 2 of the format: after the tokens, the
8 bytes "MOEDOCS\0", a uint64 document count D and D uint64 token offsets where documents start (one
per record, its EOS included; a record of no tokens has none, and a shard of none stays version 1);
a .txt gives version 1 shards.

Big corpora: with --workers N or --shard-tokens N the input is streamed, never held whole. A first
pass counts it (characters of a .txt, records of a .jsonl) to place the validation split exactly
where the in-memory path puts it; the second encodes batches (text chunks ending at a newline, or
records) on N worker processes, in order, and writes each split as it comes. With --shard-tokens
the splits become DIR/train-00000.bin, train-00001.bin, ... (and val-*), each of at most N tokens,
cut between documents where one fits (a longer document is cut where the shard is full, and is a
document in each shard it lies in), with a mask beside each shard; moetrain reads such a folder as
one split (data.dir). The tokens, in order, are exactly those of the in-memory path whatever the
number of workers.

RL prompt sets: --rl writes DIR/prompts.bin, its token table and answers for `moetrain rl` (the
prompts plain or rendered with the chat template's generation prompt); scripts/rl_prompts.py says how.

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
from datetime import datetime

import numpy as np
from tokenizers import AddedToken, Tokenizer

SHARD_MAGIC = b"MOETOKS\0"
SHARD_VERSION = 1  # a shard without document boundaries
SHARD_VERSION_DOCUMENTS = 2  # the tokens are followed by a document table
DOCUMENTS_MAGIC = b"MOEDOCS\0"
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


def write_shard(path, tokens, vocab_size, doc_starts=None):
    """A 32-byte header (magic, version, bytes per token, count, vocabulary size), then the tokens; with
    doc_starts (the token offset where each document starts), version 2 and the document table after them."""
    if not 1 <= vocab_size <= 1 << 32:
        raise ValueError(f"{path}: vocab_size {vocab_size} must be in [1, 2^32]")
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
        raise ValueError(f"{path}: token {int(ids[bad])} at index {bad} is outside the vocabulary [0, {vocab_size})")
    width = bytes_per_token(vocab_size)
    starts = np.asarray(doc_starts if doc_starts is not None else [], dtype=np.int64)
    if (ids.size or starts.size) and doc_starts is not None and (
            starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= ids.size):
        raise ValueError(f"{path}: document starts must begin at 0, increase strictly and stay below the "
                         f"{ids.size} tokens")
    # No documents (no starts, or a shard of no tokens) is version 1, as the C++ writer writes it.
    version = SHARD_VERSION_DOCUMENTS if starts.size else SHARD_VERSION
    header = SHARD_MAGIC + struct.pack("<IIQQ", version, width, ids.size, vocab_size)
    body = ids.astype({1: "<u1", 2: "<u2", 4: "<u4"}[width]).tobytes()
    table = DOCUMENTS_MAGIC + struct.pack("<Q", starts.size) + starts.astype("<u8").tobytes() if starts.size else b""
    write_atomically(path, header + body + table)
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


# ---- chats: rendered with the tokenizer's chat template, as transformers' apply_chat_template does --------

class RecordError(Exception):
    """A record (or template) that cannot be prepared: one line naming the file, the line and the field.
    Raised rather than fail()ed so that it crosses from a worker process to the parent."""


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, first is canonical


def read_tokenizer_config(hf_dir):
    path = os.path.join(hf_dir, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        fail(f"{path} is not a JSON object")
    return config


def token_text(value):
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's {"content": ...}."""
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return value if isinstance(value, str) else None


def config_special_tokens(config):
    """The named special tokens transformers gives a template ({"bos_token": "<s>", ...}), in its order:
    the seven standard names, then other *_token entries and a named extra_special_tokens map."""
    named = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
    named += [k for k in config if k.endswith("_token") and k not in named]
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    tokens = {name: token_text(config.get(name)) for name in named}
    if isinstance(extra, dict):
        tokens.update({name: token_text(value) for name, value in extra.items()})
    return {name: text for name, text in tokens.items() if text is not None}


def load_tokenizer(tokenizer_path, config=None):
    """tokenizer.json, never truncated or padded. With config (chats): as transformers loads it for
    apply_chat_template, the special tokens it names added where tokenizer.json lacks them as added tokens,
    and no post-processor (it adds nothing without special tokens, and its offset trimming would hide
    whitespace tokens from the loss mask)."""
    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if config is not None:
        held = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        wanted = list(config_special_tokens(config).values())
        wanted += [token_text(t) for t in extra] if isinstance(extra, list) else []
        missing = list(dict.fromkeys(t for t in wanted if t is not None and t not in held))
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True) for t in missing])
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        tokenizer.post_processor = None
    return tokenizer


def find_chat_templates(hf_dir, config, template_file):
    """{name: template source} and where they came from, with transformers' precedence (see the docstring)."""
    if template_file is not None:
        if not os.path.isfile(template_file):
            fail(f"--chat-template {template_file} does not exist")
        with open(template_file, encoding="utf-8") as f:
            return {"default": f.read()}, template_file
    templates = {}
    jinja_path = os.path.join(hf_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            templates["default"] = f.read()
    for path in sorted(glob.glob(os.path.join(glob.escape(hf_dir), "additional_chat_templates", "*.jinja"))):
        with open(path, encoding="utf-8") as f:
            templates[os.path.basename(path)[: -len(".jinja")]] = f.read()
    if templates:
        return templates, os.path.join(hf_dir, "chat_template.jinja" if "default" in templates
                                       else "additional_chat_templates")
    where = f"{hf_dir}/tokenizer_config.json"
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}, where
    if isinstance(value, list):
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                fail(f"{where}: chat_template must be a string or a list of {{name, template}} objects")
            templates[entry["name"]] = entry["template"]
        return templates, where
    fail(f"{hf_dir} has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json): "
         f"pass --chat-template FILE")


def chat_environment():
    """A jinja2 environment that renders as transformers' chat templates do (the same options, the same
    extension tags and the same globals), written here so that transformers is not needed."""
    import jinja2
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(ext.Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for transformers' masks; it renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class DictMaker:  # dict(...) and dict.fromkeys(...) without exposing the type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython internals
        def __init__(*args, **kwargs):
            self, values = args[0], dict(*args[1:], **kwargs)
            for name in values:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, values)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=DictMaker(), namespace=Namespace)
    return env


def one_line(text):
    return " ".join(str(text).split())


class ChatEncoder:
    """Renders and tokenizes chat records and marks the tokens --learn learns. Built in each worker too."""

    def __init__(self, settings):
        import jinja2
        self.field, self.learn, self.name = settings["messages_field"], settings["learn"], settings["template_name"]
        config = read_tokenizer_config(settings["hf_dir"])
        self.special_tokens = config_special_tokens(config)
        self.tokenizer = load_tokenizer(settings["tokenizer_path"], config)
        sources, self.where = find_chat_templates(settings["hf_dir"], config, settings["template_file"])
        if self.name is not None and self.name not in sources:
            fail(f"--chat-template-name {self.name}: {self.where} has the templates {', '.join(sorted(sources))}")
        if self.name is None and len(sources) > 1 and "default" not in sources and "tool_use" not in sources:
            fail(f"{self.where} has several chat templates ({', '.join(sorted(sources))}) and none named default: "
                 f"pass --chat-template-name")
        env = chat_environment()
        self.templates = {}
        for name, source in sources.items():
            try:
                self.templates[name] = env.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                fail(f"{self.where}: chat template {name!r} line {e.lineno}: {one_line(e.message)}")

    def template_for(self, where, tools):
        if self.name is not None:
            return self.name
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise RecordError(f"{where}: {self.where} has no default chat template and this record has no tools: pass "
                          f"--chat-template-name")

    def render(self, where, name, messages, tools, add_generation_prompt):
        try:
            return self.templates[name].render(messages=messages, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as e:  # a template is code: whatever it raises is the record's error
            raise RecordError(f"{where}: the chat template ({self.where}, {name}) raised {type(e).__name__}: "
                              f"{one_line(e)}") from None

    def encode(self, path, line_number, record):
        """(token ids, loss mask or None for --learn all) of one record."""
        where = f"{path}:{line_number}"
        messages, tools = chat_record(where, record, self.field)
        name = self.template_for(where, tools)
        chat = self.render(where, name, messages, tools, False)
        encoding = self.tokenizer.encode(chat, add_special_tokens=False)
        if self.learn == "all":
            return encoding.ids, None
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise RecordError(f"{where}: field {self.field!r} has no assistant message to learn (--learn {self.learn})")
        if self.learn == "last-assistant":
            turns = turns[-1:]
        spans = []
        for k in turns:
            prompt = self.render(where, name, messages[:k], tools, True)
            with_turn = self.render(where, name, messages[: k + 1], tools, False)
            if not (with_turn.startswith(prompt) and chat.startswith(with_turn)):
                raise RecordError(f"{where}: {self.field}[{k}]: the chat template ({self.where}, {name}) is not "
                                  f"prefix-stable: rendering the chat up to this assistant turn does not begin the "
                                  f"same as rendering it whole; train with --learn all, or use a template that does "
                                  f"not rewrite earlier turns")
            if k == turns[0] and prompt == self.render(where, name, messages[:k], tools, False):
                raise RecordError(f"{where}: the chat template ({self.where}, {name}) writes no generation prompt, so "
                                  f"an assistant turn's header cannot be told from its text; train with --learn all")
            spans.append((len(prompt), len(with_turn)))
        return encoding.ids, learned_tokens(encoding.offsets, spans)


def learned_tokens(offsets, spans):
    """1 for each token whose characters [start, end) overlap a span; an empty token counts as [start, start + 1)."""
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    ends = np.maximum(np.array([e for _, e in offsets], dtype=np.int64), starts + 1)
    learned = np.zeros(len(offsets), dtype=bool)
    for lo, hi in spans:
        if hi > lo:
            learned |= (starts < hi) & (ends > lo)
    return learned.astype(np.uint8).tolist()


def chat_record(where, record, field_name):
    """A record's messages as transformers hands them to the template (null fields dropped, reasoning
    aliased), and its tools (None without), or a RecordError naming the field."""
    if field_name not in record:
        raise RecordError(f"{where}: field {field_name!r} is missing")
    messages = record[field_name]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: field {field_name!r} is {'empty' if messages == [] else 'not a list'}")
    out = []
    for i, message in enumerate(messages):
        at = f"{where}: {field_name}[{i}]"
        if not isinstance(message, dict):
            raise RecordError(f"{at} is not an object")
        if not isinstance(message.get("role"), str):
            raise RecordError(f"{at}: 'role' is {'missing' if message.get('role') is None else 'not a string'}")
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise RecordError(f"{at}: 'tool_calls' is not a list of objects")
        content = message.get("content")
        if content is None and not calls:
            raise RecordError(f"{at}: 'content' is {'null' if 'content' in message else 'missing'} (only a message "
                              f"with tool_calls may leave it out or null)")
        if content is not None and not isinstance(content, str):
            raise RecordError(f"{at}: 'content' is not a string")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RecordError(f"{where}: field 'tools' is not a list of objects")
    return out, tools


def input_kind(args, first):
    """What the first record of a .jsonl says the records are: "chat", "pairs" or "text"."""
    if args.messages_field in first:
        return "chat"
    if args.prompt_field in first and args.response_field in first:
        return "pairs"
    if args.text_field in first:
        return "text"
    return None


def documents_from_jsonl(args, tokenizer, eos, chat):
    """Per record: (token ids, mask or None), and whether there are masks."""
    records = read_jsonl(args.input)
    if len(records) < 2:
        fail(f"{args.input} has {len(records)} records; train and validation need at least one each")
    tail = [eos] if eos is not None else []
    if chat is not None:
        documents = []
        for n, r in records:
            ids, mask = chat.encode(args.input, n, r)
            documents.append((ids + tail, None if mask is None else mask + [1] * len(tail)))
        return documents, chat.learn != "all"
    if input_kind(args, records[0][1]) != "pairs":
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


def document_starts(lengths):
    """Where each document of these lengths starts when they lie back to back (empty ones have no start)."""
    starts, at = [], 0
    for n in lengths:
        if n:
            starts.append(at)
        at += n
    return starts


# ---- streaming: inputs larger than memory, several workers, bounded shards ---------------------------

_worker_tokenizer = None
_worker_chat = None


def _load_worker(tokenizer_path, chat_settings):
    global _worker_tokenizer, _worker_chat
    if chat_settings is None:
        _worker_tokenizer = load_tokenizer(tokenizer_path)
    else:
        _worker_chat = ChatEncoder(chat_settings)


def _encode_job(job):
    """One batch of work: ("text", chunk, add_special_tokens), ("records", texts, prompts, responses) or
    ("chat", path, [(line number, record), ...]). Records come back as (ids, mask or None)."""
    if job[0] == "text":
        return [_worker_tokenizer.encode(job[1], add_special_tokens=job[2]).ids]
    if job[0] == "chat":
        return [_worker_chat.encode(job[1], n, record) for n, record in job[2]]
    _, texts, prompts, responses = job
    if texts is not None:
        return [(e.ids, None) for e in _worker_tokenizer.encode_batch(texts)]
    p = _worker_tokenizer.encode_batch(prompts)
    r = _worker_tokenizer.encode_batch(responses, add_special_tokens=False)
    return [(a.ids + b.ids, [0] * len(a.ids) + [1] * len(b.ids)) for a, b in zip(p, r)]


class ShardWriter:
    """Writes one split as it comes: one shard (NAME.bin) or, with a limit, NAME-00000.bin, ... each of at
    most `limit` tokens, cut between documents where the next document fits. With `documented` each add()
    is a document, kept in the shard's document table; a document cut across shards is one in each."""

    def __init__(self, out_dir, name, vocab_size, limit, masked, documented):
        self.out_dir, self.name, self.vocab_size, self.limit, self.masked = out_dir, name, vocab_size, limit, masked
        self.documented = documented
        self.ids, self.mask, self.starts, self.files, self.tokens, self.learned = [], [], [], [], 0, 0

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
        if self.documented and len(ids):
            self.starts.append(len(self.ids))
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
        width = write_shard(path, self.ids, self.vocab_size, self.starts if self.documented else None)
        if self.masked:
            write_mask(path, self.mask)
            self.learned += sum(self.mask)
        self.files.append((path, len(self.ids), width))
        self.tokens += len(self.ids)
        self.ids, self.mask, self.starts = [], [], []


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


def record_batches(args, kind, start, end, batch):
    """Records [start, end) of a .jsonl (blank lines skipped) as jobs of up to `batch` records."""
    chunk, index = [], 0
    with open(args.input, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if start <= index < end:
                chunk.append((line_number, parse_record(args.input, line_number, line)))
                if len(chunk) == batch:
                    yield records_job(args, chunk, kind)
                    chunk = []
            index += 1
    if chunk:
        yield records_job(args, chunk, kind)


def records_job(args, chunk, kind):
    if kind == "chat":
        return ("chat", args.input, chunk)
    if kind == "text":
        return ("records", [field(args.input, n, r, args.text_field) for n, r in chunk], None, None)
    return ("records", None, [field(args.input, n, r, args.prompt_field) for n, r in chunk],
            [field(args.input, n, r, args.response_field) for n, r in chunk])


def first_record(path):
    """The first record of a .jsonl (it decides text, prompt/response or chat) and its line number."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                return parse_record(path, line_number, line), line_number
    fail(f"{path} has no records; train and validation need at least one each")


def count_records(path):
    """Non-blank lines."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def prepare_streaming(args, tokenizer_path, vocab_size, eos, kind, chat_settings):
    tail = [eos] if eos is not None else []
    os.makedirs(args.out, exist_ok=True)
    started, total_tokens, written = time.monotonic(), 0, set()
    with multiprocessing.Pool(args.workers, initializer=_load_worker, initargs=(tokenizer_path, chat_settings)) as pool:
        if kind == "txt":
            split, total = text_split_point(args.input, args.val_fraction)
            for name, (lo, hi) in (("train", (0, split)), ("val", (split, total))):
                writer = ShardWriter(args.out, name, vocab_size, args.shard_tokens, masked=False, documented=False)
                jobs = (("text", chunk, first) for chunk, first in text_chunks(args.input, lo, hi))
                for (ids,) in pool.imap(_encode_job, jobs):
                    writer.add(ids)
                writer.add(tail)
                writer.flush()
                report(writer, vocab_size)
                total_tokens += writer.tokens
                written |= writer.written()
        else:
            count = count_records(args.input)
            if count < 2:
                fail(f"{args.input} has {count} records; train and validation need at least one each")
            masked = kind == "pairs" or (kind == "chat" and chat_settings["learn"] != "all")
            n_val = max(1, min(count - 1, round(count * args.val_fraction)))
            for name, (lo, hi) in (("train", (0, count - n_val)), ("val", (count - n_val, count))):
                writer = ShardWriter(args.out, name, vocab_size, args.shard_tokens, masked, documented=True)
                for documents in pool.imap(_encode_job, record_batches(args, kind, lo, hi, args.batch_records)):
                    for ids, mask in documents:
                        writer.add(ids + tail, None if mask is None else mask + [1] * len(tail))
                writer.flush()
                report(writer, vocab_size)
                total_tokens += writer.tokens
                written |= writer.written()
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
    parser.add_argument("--messages-field", default="messages", help="jsonl field of chat messages (default messages)")
    parser.add_argument("--learn", choices=("assistant", "last-assistant", "all"),
                        help="chats: the tokens learned (default assistant: every assistant turn)")
    parser.add_argument("--chat-template", metavar="FILE", help="chats: a jinja template instead of the tokenizer's")
    parser.add_argument("--chat-template-name", metavar="NAME", help="chats: which of the tokenizer's named templates")
    parser.add_argument("--append-eos", action="store_true", help="end each document with the EOS token")
    parser.add_argument("--eos-token", help="the EOS token's text (default: from tokenizer_config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--workers", type=int, default=1, help="processes encoding batches in parallel (streams the input)")
    parser.add_argument("--shard-tokens", type=int, default=0,
                        help="at most this many tokens per shard: train-00000.bin, ... (streams the input)")
    parser.add_argument("--batch-records", type=int, default=1000, help="jsonl records per worker batch (default 1000)")
    rl = parser.add_argument_group("RL prompt sets (--rl; see scripts/rl_prompts.py)")
    rl.add_argument("--rl", action="store_true", help="write a prompt set for moetrain rl: prompts.bin, its token table "
                    "and answers")
    rl.add_argument("--answer-field", default="answer", help="--rl: jsonl field of answers (default answer)")
    rl.add_argument("--chat-prompt", action="store_true", help="--rl: render each prompt as a user turn of the chat template")
    rl.add_argument("--stop-token", action="append", metavar="TEXT",
                    help="--rl: a token that ends completions (repeatable; default the EOS tokens)")
    args = parser.parse_args()
    if args.rl:
        import rl_prompts
        rl_prompts.prepare_rl(args, sys.modules[__name__])
        return
    if args.chat_prompt or args.stop_token or args.answer_field != "answer":
        fail("--chat-prompt, --stop-token and --answer-field are for prompt sets (--rl)")

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
    if args.input.endswith(".txt"):
        kind = "txt"
    elif args.input.endswith(".jsonl"):
        first, line_number = first_record(args.input)
        kind = input_kind(args, first)
        if kind is None:
            fail(f"{args.input}:{line_number}: has neither the messages field {args.messages_field!r}, the text "
                 f"field {args.text_field!r} nor the prompt and response fields {args.prompt_field!r}, "
                 f"{args.response_field!r}")
    else:
        fail(f"input file {args.input} must end in .txt or .jsonl")
    chat_flags = [flag for flag, value in (("--learn", args.learn), ("--chat-template", args.chat_template),
                                           ("--chat-template-name", args.chat_template_name)) if value is not None]
    if kind != "chat" and chat_flags:
        fail(f"{' and '.join(chat_flags)}: only for chat records (a .jsonl whose first record has the field "
             f"{args.messages_field!r})")

    chat_settings, chat = None, None
    if kind == "chat":
        chat_settings = {"hf_dir": args.tokenizer, "tokenizer_path": tokenizer_path,
                         "template_file": args.chat_template, "template_name": args.chat_template_name,
                         "learn": args.learn or "assistant", "messages_field": args.messages_field}
        chat = ChatEncoder(chat_settings)
        tokenizer = chat.tokenizer
    else:
        tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = vocab_size_of(tokenizer)
    eos = find_eos(tokenizer, args.tokenizer, args.eos_token) if args.append_eos else None
    if args.workers > 1 or args.shard_tokens > 0:
        written = prepare_streaming(args, tokenizer_path, vocab_size, eos, kind, chat_settings)
        remove_stale(args.out, held, written)
        return

    if kind == "txt":
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
        parts = split_text(text, args.val_fraction, args.input)
        tail = [eos] if eos is not None else []
        splits = {name: (encode_text(tokenizer, part) + tail, None, None)
                  for name, part in zip(("train", "val"), parts)}
        masked = False
    else:
        documents, masked = documents_from_jsonl(args, tokenizer, eos, chat)
        n_val = max(1, min(len(documents) - 1, round(len(documents) * args.val_fraction)))
        splits = {}
        for name, docs in (("train", documents[:-n_val]), ("val", documents[-n_val:])):
            ids = [t for d, _ in docs for t in d]
            mask = [m for _, ms in docs for m in ms] if masked else None
            splits[name] = (ids, mask, document_starts(len(d) for d, _ in docs))

    os.makedirs(args.out, exist_ok=True)
    for name, (ids, mask, starts) in splits.items():
        shard = os.path.join(args.out, f"{name}.bin")
        try:
            width = write_shard(shard, ids, vocab_size, starts)
            if mask is not None:
                write_mask(shard, mask)
        except (OSError, ValueError) as e:
            fail(str(e))
        documents = f", {len(starts)} document{'s' if len(starts) != 1 else ''}" if starts is not None else ""
        learned = f", {sum(mask)} learned" if mask is not None else ""
        print(f"[prepare_data] wrote {shard}: {len(ids)} tokens of uint{8 * width} (vocabulary {vocab_size})"
              f"{documents}{learned}")
    if masked:
        what = "response tokens" if chat is None else f"{chat.learn.replace('-', ' ')} turns"
        print(f"[prepare_data] loss masks: {mask_path_for(os.path.join(args.out, 'train.bin'))} and "
              f"{mask_path_for(os.path.join(args.out, 'val.bin'))} (only {what} are learned)")
    remove_stale(args.out, held, {f"{name}.bin" for name in splits} | ({f"{name}.mask.bin" for name in splits} if masked else set()))


def remove_stale(out_dir, held, written):
    """Once the new shards are written: the old ones they did not replace (a stale train-00007.bin or
    mask would join or mask the new data)."""
    for name in held:
        if name not in written and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


if __name__ == "__main__":
    try:
        main()
    except RecordError as e:
        fail(str(e))
