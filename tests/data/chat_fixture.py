"""Chat data for the tests of scripts/prepare_data.py (tests/data/test_chat_data.cpp): a tokenizer folder
with three chat templates, conversations, transformers' apply_chat_template as the reference, and a
reader of the shard files' bytes that does not share code with the script.

  chat_fixture.py setup DIR
      DIR/tok        byte-level BPE with ChatML and Llama 3 special tokens; tokenizer_config.json holds
                     the templates "default" (ChatML-like), "llama3" and "tool_use" (system prompt, tools,
                     tool calls, tool role)
      DIR/tok-jinja  the same tokenizer, the Llama 3 template in chat_template.jinja only
      DIR/tok-bare   the same tokenizer without a chat template
      DIR/templates/{chatml,llama3,tool_use}.jinja
      DIR/chat.jsonl (single- and multi-turn chats), DIR/tools.jsonl (chats with tools)
  chat_fixture.py reference TOK_DIR INPUT N_VAL LEARN OUT [--template NAME] [--append-eos]
      What prepare_data.py must write for INPUT (its last N_VAL records in val) under --learn LEARN:
      {"train": {...}, "val": {...}}, each {"tokens", "mask", "doc_starts", "learned_texts"}: the ids and
      assistant mask of transformers' apply_chat_template (the templates mark assistant text with
      {% generation %}), where each record starts, and the text each run of learned tokens must decode
      to (an assistant message's content and its end-of-turn markup, written out here from the message;
      null with --append-eos or --learn all).
  chat_fixture.py read-shard TOK_DIR SHARD OUT
      The shard's bytes read by the format's spec (and its mask's, if any): {"version", "tokens",
      "doc_starts" (null in version 1), "mask" (null without), "learned_texts" (each run of learned
      tokens decoded)}. A file off the spec exits 1 with one line.

Run with third_party/venv/bin/python; transformers is read from the same venv, offline.
"""
import json
import os
import struct
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>"]  # added tokens, not special (as Qwen's)

# Each template wraps an assistant turn's text in {% generation %} so that transformers' own
# return_assistant_tokens_mask gives the reference mask.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
TOOL_USE = """\
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
    {%- set rest = messages %}
{%- endif %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools %}
    {{- '\\n\\n# Tools\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in rest %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' %}
        {%- generation %}
            {{- message.content if message.content is defined else '' }}
            {%- for call in message.tool_calls | default([]) %}
                {%- set body = {'name': call.function.name, 'arguments': call.function.arguments} %}
                {{- '<tool_call>\\n' + (body | tojson) + '\\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>\\n' }}
        {%- endgeneration %}
    {%- elif message.role == 'tool' %}
        {{- '<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
TEMPLATES = {"default": CHATML, "llama3": LLAMA3, "tool_use": TOOL_USE}


def end_of_turn(template):
    return {"default": "<|im_end|>\n", "llama3": "<|eot_id|>", "tool_use": "<|im_end|>\n"}[template]


def turn_text(template, message):
    """What an assistant message renders to after its header: the text that must be learned."""
    text = message.get("content") or ""
    if template == "llama3":
        text = text.strip()
    for call in message.get("tool_calls", []):
        body = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
        text += "<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>"
    return text + end_of_turn(template)


def chat(*turns, system=None):
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


CHATS = [
    chat("What is two plus two?", "Four."),
    chat("Name a fruit.", "An apple.", "And a colour?", " Green, like the apple. "),
    chat("Route this token.", "Expert 3 takes it.", "Why that one?", "Its router score is highest.",
         "Thanks!", "You are welcome: café 🙂"),
    chat("Say hello.", "Hello.", system="You answer in one word."),
    chat("Count to three.", "One, two, three.\nDone."),
    chat("Translate 'dog' to French.", "Chien."),
    chat("Is this the last record?", "Yes, it is the validation record.", "Sure?", "Sure."),
]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "The sum of two numbers.",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                        "b": {"type": "number"}}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CHATS = [
    {"messages": chat("Hi.", "Hello! Ask me about the weather."), "tools": [WEATHER]},
    {"messages": [{"role": "system", "content": "You check the weather."},
                  {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="Paris")]},
                  {"role": "tool", "content": "{\"temp\": 18}"},
                  {"role": "assistant", "content": "It is 18 degrees in Paris."}], "tools": [WEATHER]},
    {"messages": [{"role": "user", "content": "Add 2 and 3, then weather in Oslo."},
                  {"role": "assistant", "content": "Working on it.",
                   "tool_calls": [call("add", a=2, b=3), call("get_weather", city="Oslo")]},
                  {"role": "tool", "content": "5"},
                  {"role": "tool", "content": "{\"temp\": -2}"},
                  {"role": "assistant", "content": "2 + 3 = 5; Oslo is at -2."},
                  {"role": "user", "content": "Thanks."},
                  {"role": "assistant", "content": "Glad to help."}], "tools": [WEATHER, ADD]},
    {"messages": chat("No tools here.", "Fine."), "tools": []},
    {"messages": [{"role": "system", "content": "Terse."},
                  {"role": "user", "content": "Sum 1 and 1?"},
                  {"role": "assistant", "tool_calls": [call("add", a=1, b=1)]},
                  {"role": "tool", "content": "2"},
                  {"role": "assistant", "content": "2."}], "tools": [ADD]},
]

CORPUS = [m["content"] for c in CHATS for m in c] + [
    "user assistant system tool The weather city function name arguments type object properties",
    "You are a helpful assistant. Tools tool_response get_weather add number string description",
] * 10


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)


def setup(out_dir):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens([AddedToken(t, special=False) for t in TOOL_TAGS])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    for name, templates in (("tok", [{"name": n, "template": t} for n, t in TEMPLATES.items()]),
                            ("tok-jinja", None), ("tok-bare", None)):
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        tokenizer.save(os.path.join(out_dir, name, "tokenizer.json"))
        write_json(os.path.join(out_dir, name, "tokenizer_config.json"),
                   {**config, "chat_template": templates} if templates else config)
    with open(os.path.join(out_dir, "tok-jinja", "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(LLAMA3)
    os.makedirs(os.path.join(out_dir, "templates"), exist_ok=True)
    for name, text in (("chatml", CHATML), ("llama3", LLAMA3), ("tool_use", TOOL_USE)):
        with open(os.path.join(out_dir, "templates", f"{name}.jinja"), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(out_dir, "chat.jsonl"), "w", encoding="utf-8") as f:
        for i, messages in enumerate(CHATS):
            f.write(json.dumps({"messages": messages, "id": i}, ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, "tools.jsonl"), "w", encoding="utf-8") as f:
        for record in TOOL_CHATS:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def runs(ids, mask):
    """Maximal runs of learned tokens, as lists of ids."""
    out, current = [], []
    for token, learned in zip(ids, mask):
        if learned:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def reference(tok_dir, input_path, n_val, learn, out_path, template=None, append_eos=False):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if append_eos else []
    with open(input_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    documents = []
    for number, record in enumerate(records, 1):
        messages, tools = record["messages"], record.get("tools")
        name = template or ("tool_use" if tools is not None else "default")
        out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=name, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        turns = [turn_text(name, m) for m in messages if m["role"] == "assistant"]
        learned = [tokenizer.decode(run, skip_special_tokens=False) for run in runs(ids, mask)]
        if learned != turns:  # the reference itself must say what the test claims it says
            raise SystemExit(f"record {number}: transformers' assistant mask decodes to {learned}, not {turns}")
        if learn == "last-assistant":
            last = len(mask) - mask[::-1].index(1) if 1 in mask else 0
            first = last
            while first > 0 and mask[first - 1]:
                first -= 1
            mask = [1 if first <= i < last else 0 for i in range(len(mask))]
            turns = turns[-1:]
        elif learn == "all":
            mask, turns = [1] * len(ids), None
        documents.append((ids + eos, mask + [1] * len(eos), turns))
    splits = {}
    for split, docs in (("train", documents[:-n_val]), ("val", documents[-n_val:])):
        starts, at = [], 0
        for ids, _, _ in docs:
            starts.append(at)
            at += len(ids)
        # The appended EOS is learned too and may join a turn's run: then the runs are not listed.
        texts = None if learn == "all" or eos else [t for _, _, turns in docs for t in turns]
        splits[split] = {"tokens": [t for ids, _, _ in docs for t in ids],
                         "mask": [m for _, mask, _ in docs for m in mask], "doc_starts": starts, "learned_texts": texts}
    write_json(out_path, splits)


def read_shard(tok_dir, shard_path, out_path):
    data = open(shard_path, "rb").read()

    def off_spec(what):
        raise SystemExit(f"{shard_path}: {what}")

    if len(data) < 32 or data[:8] != b"MOETOKS\0":
        off_spec("no moetrain header")
    version, width, count, vocab = struct.unpack("<IIQQ", data[8:32])
    if version not in (1, 2) or width not in (1, 2, 4):
        off_spec(f"version {version}, width {width}")
    end = 32 + count * width
    tokens = [int.from_bytes(data[i:i + width], "little") for i in range(32, end, width)]
    if any(t >= vocab for t in tokens):
        off_spec("a token past the vocabulary")
    starts = None
    if version == 1 and len(data) != end:
        off_spec(f"{len(data)} bytes, not {end}")
    if version == 2:
        if data[end:end + 8] != b"MOEDOCS\0":
            off_spec("no document table after the tokens")
        (n_docs,) = struct.unpack("<Q", data[end + 8:end + 16])
        if len(data) != end + 16 + 8 * n_docs:
            off_spec(f"{len(data)} bytes, not {end + 16 + 8 * n_docs} for {n_docs} documents")
        starts = list(struct.unpack(f"<{n_docs}Q", data[end + 16:]))
        increasing = all(a < b for a, b in zip(starts, starts[1:]))
        if count and not (starts and starts[0] == 0 and increasing and starts[-1] < count):
            off_spec(f"document starts {starts} for {count} tokens")
    mask, texts = None, None
    mask_path = shard_path[: -len(".bin")] + ".mask.bin"
    if os.path.exists(mask_path):
        raw = open(mask_path, "rb").read()
        if raw[:8] != b"MOEMASK\0" or struct.unpack("<Q", raw[16:24])[0] != count or len(raw) != 64 + count:
            off_spec(f"{mask_path} does not match the shard")
        mask = list(raw[64:])
        tokenizer = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        texts = [tokenizer.decode(run, skip_special_tokens=False) for run in runs(tokens, mask)]
    write_json(out_path, {"version": version, "tokens": tokens, "doc_starts": starts, "mask": mask,
                          "learned_texts": texts})


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "setup":
        setup(args[1])
    elif len(args) >= 6 and args[0] == "reference":
        options = args[6:]
        template = options[options.index("--template") + 1] if "--template" in options else None
        reference(args[1], args[2], int(args[3]), args[4], args[5], template, "--append-eos" in options)
    elif len(args) == 4 and args[0] == "read-shard":
        read_shard(args[1], args[2], args[3])
    else:
        raise SystemExit(__doc__)
