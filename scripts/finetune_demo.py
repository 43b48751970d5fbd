"""The Python half of scripts/finetune_demo.sh: the demo's data, its tokenizer and untrained model,
and the checks only transformers can make (exact match by greedy generate, and agreement of its
tokens with `moetrain generate`). Each subcommand is one step the shell script names."""
import argparse
import json
import os
import random
import subprocess
import sys

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Target task: unit conversions whose answer is the number with zeros appended; the unit pair
# decides how many, so the model must read the units and copy the digits.
CONVERSIONS = [("kilometers", "meters", 3), ("meters", "centimeters", 2), ("meters", "millimeters", 3),
               ("centimeters", "millimeters", 1), ("kilograms", "grams", 3), ("tonnes", "kilograms", 3),
               ("liters", "milliliters", 3), ("dollars", "cents", 2), ("decades", "years", 1),
               ("centuries", "years", 2), ("millennia", "years", 3)]
CONVERSION_PHRASINGS = ["How many {to} are in {n} {frm}?", "Convert {n} {frm} to {to}.",
                        "{n} {frm} is how many {to}?", "What is {n} {frm} in {to}?"]
# Base task (what makes the base "chat-tuned"): answer with the question's number as is, asked
# plainly or as a conversion between a unit and itself, so the base knows the format and the units.
REPEAT_PHRASINGS = ["Repeat the number {n}.", "Say {n} back to me.", "What number is this: {n}?"]
UNITS = sorted({u for frm, to, _ in CONVERSIONS for u in (frm, to)})


def fail(message):
    print(f"[finetune_demo] {message}", file=sys.stderr)
    sys.exit(1)


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def cmd_data(args):
    """base.jsonl (repeat), target.jsonl (conversions: training records, then the held-out ones
    last, where prepare_data puts its val split) and heldout.jsonl (question, answer)."""
    rng = random.Random(args.seed)
    numbers = list(range(1, 1000))
    rng.shuffle(numbers)
    # Held-out numbers never occur in a training chat, of either task, in any phrasing or unit.
    held_numbers = set(numbers[:args.heldout_numbers])
    train_numbers = numbers[args.heldout_numbers:]
    conversions = []
    for n in train_numbers:
        for frm, to, zeros in CONVERSIONS:
            q = rng.choice(CONVERSION_PHRASINGS).format(n=n, frm=frm, to=to)
            conversions.append(chat(q, str(n) + "0" * zeros))
    rng.shuffle(conversions)
    train = conversions[:args.n_train]
    held = []
    for n in sorted(held_numbers):
        for frm, to, zeros in CONVERSIONS:
            q = rng.choice(CONVERSION_PHRASINGS).format(n=n, frm=frm, to=to)
            held.append(chat(q, str(n) + "0" * zeros))
    rng.shuffle(held)
    held = held[:args.n_heldout]
    if len(train) < args.n_train or len(held) < args.n_heldout:
        fail(f"asked for {args.n_train} training and {args.n_heldout} held-out chats; "
             f"the numbers give {len(train)} and {len(held)}")
    train_questions = {r["messages"][0]["content"] for r in train}
    assert not train_questions & {r["messages"][0]["content"] for r in held}
    base = []
    for _ in range(args.n_base):
        n, unit = rng.randint(1, 999999), rng.choice(UNITS)
        while n in held_numbers:
            n = rng.randint(1, 999999)
        phrasing = rng.choice(REPEAT_PHRASINGS + CONVERSION_PHRASINGS)
        base.append(chat(phrasing.format(n=n, frm=unit, to=unit), str(n)))
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "base.jsonl"), base)
    write_jsonl(os.path.join(args.out, "target.jsonl"), train + held)
    def questions(records):
        return [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in records]
    write_jsonl(os.path.join(args.out, "heldout.jsonl"), questions(held))
    # The base task's validation split as prepare_data cuts it (the last 5%), to show the base learned it.
    write_jsonl(os.path.join(args.out, "base-heldout.jsonl"), questions(base[-max(1, round(0.05 * len(base))):]))
    print(f"[data] {len(base)} base-task chats (answer with the question's number); {len(train)} training and {len(held)} held-out "
          f"conversion chats (target task, {len(held_numbers)} numbers kept out of training); "
          f"e.g. {held[0]['messages'][0]['content']!r} -> {held[0]['messages'][1]['content']!r}")


def cmd_base(args):
    """A word-level tokenizer (digits one by one, ChatML specials and template) and an untrained
    Qwen3-MoE of the tokenizer's vocabulary, both in one Hugging Face folder."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    import torch
    import transformers

    words = set()
    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    for path in args.corpus:
        with open(path) as f:
            for line in f:
                for m in json.loads(line)["messages"]:
                    words.update(w for w, _ in split.pre_tokenize_str(m["content"]))
    words.update(["user", "assistant", "system"] + [str(d) for d in range(10)])
    vocab = {t: i for i, t in enumerate(SPECIALS + ["<unk>"] + sorted(words))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML,
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
                   "bos_token": None, "model_max_length": args.context}, f, indent=2)

    torch.manual_seed(args.seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(vocab), hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.d_model // 4,
        intermediate_size=2 * args.d_model, moe_intermediate_size=args.d_model, num_experts=args.experts,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=args.context,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"])
    model = transformers.Qwen3MoeForCausalLM(config)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"[base] tokenizer of {len(vocab)} tokens (words, single digits, ChatML) and an untrained "
          f"Qwen3-MoE ({args.layers} layers, d {args.d_model}, {args.experts} experts, top-2, {n / 1e6:.2f}M parameters)")


def load(model_dir, tokenizer_dir):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    model.generation_config.eos_token_id = None  # moetrain generate does not stop at <|im_end|> either
    model.generation_config.pad_token_id = tok.pad_token_id
    return tok, model


def prompt_ids(tok, question):
    return list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def greedy(model, batch, n_new):
    """transformers' greedy generate of exactly n_new tokens for prompts of one length (no padding,
    and no stop at <|im_end|>, so that every token can be compared)."""
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor(batch), do_sample=False, max_new_tokens=n_new)
    return out[:, len(batch[0]):].tolist()


def answer_text(tok, ids):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = ids[:ids.index(end)] if end in ids else ids
    return "".join(tok.convert_ids_to_tokens(ids))  # the answers are digits: no spaces between them


def cmd_accuracy(args):
    """Exact match on held-out questions: greedy answers, batched by prompt length."""
    tok, model = load(args.model, args.tokenizer)
    with open(args.heldout) as f:
        items = [json.loads(line) for line in f][:args.limit or None]
    by_length = {}
    for item in items:
        ids = prompt_ids(tok, item["question"])
        by_length.setdefault(len(ids), []).append((ids, item["answer"]))
    correct = 0
    examples = []
    for group in by_length.values():
        for start in range(0, len(group), args.batch):
            chunk = group[start:start + args.batch]
            for (ids, answer), new in zip(chunk, greedy(model, [ids for ids, _ in chunk], args.max_new_tokens)):
                got = answer_text(tok, new)
                correct += got == answer
                if len(examples) < 3:
                    examples.append(f"{answer} -> {got or '(nothing)'}")
    result = {"exact_match": correct / len(items), "correct": correct, "total": len(items)}
    write_result(args.result, result)
    print(f"[accuracy] {args.name}: {correct}/{len(items)} exact ({100 * correct / len(items):.1f}%); "
          f"answer -> generated: {', '.join(examples)}")


def cmd_agree(args):
    """Greedy tokens of transformers on the export against `moetrain generate` on the run."""
    tok, model = load(args.model, args.tokenizer)
    with open(args.heldout) as f:
        items = [json.loads(line) for line in f][:args.prompts]
    agree = 0
    for item in items:
        ids = prompt_ids(tok, item["question"])
        ours = greedy(model, [ids], args.max_new_tokens)[0]
        cmd = [args.moetrain, "generate", "--checkpoint", args.checkpoint, "--prompt-ids", ",".join(map(str, ids)),
               "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens), "--print-ids"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"moetrain generate failed on {args.checkpoint}: {run.stderr.strip().splitlines()[-1:]}")
        printed = [int(t) for t in run.stdout.strip().splitlines()[-1].split(",")]
        if printed[:len(ids)] != ids:
            fail(f"moetrain generate printed a prompt other than the one given: {printed[:len(ids)]} vs {ids}")
        theirs = printed[len(ids):]
        same = ours == theirs
        agree += same
        if not same:
            print(f"[agree] {args.name}: differ on {item['question']!r}: transformers {ours}, moetrain {theirs}")
    write_result(args.result, {"agree": agree, "prompts": len(items), "max_new_tokens": args.max_new_tokens})
    print(f"[agree] {args.name}: {agree}/{len(items)} prompts give the same {args.max_new_tokens} greedy tokens "
          f"in transformers (export) and moetrain generate (run)")


def write_result(path, values):
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old.update(values)
    with open(path, "w") as f:
        json.dump(old, f)


def cmd_table(args):
    """The summary; exits 1 where transformers and moetrain disagreed on a prompt."""
    disagree = []
    print("| model | held-out loss | exact match | tokens agree (moetrain vs transformers) |")
    print("|---|---|---|---|")
    for spec in args.rows:
        name, path = spec.split("=", 1)
        if not os.path.exists(path):
            print(f"| {name} | skipped | skipped | skipped |")
            continue
        with open(path) as f:
            r = json.load(f)
        loss = f"{r['loss']:.3f}" if "loss" in r else "-"
        exact = f"{100 * r['exact_match']:.1f}% ({r['correct']}/{r['total']})" if "exact_match" in r else "-"
        agree = f"{r['agree']}/{r['prompts']}" if "agree" in r else "-"
        if r.get("agree", 0) != r.get("prompts", 0):
            disagree.append(name)
        print(f"| {name} | {loss} | {exact} | {agree} |")
    if disagree:
        fail(f"transformers' greedy tokens differ from moetrain generate's for: {', '.join(disagree)}")


def cmd_eval_result(args):
    """Keeps the held-out loss from the output of `moetrain eval --json`."""
    with open(args.log) as f:
        text = f.read()
    try:
        loss = json.loads(text.strip().splitlines()[-1])["loss"]
    except (ValueError, KeyError, IndexError):
        fail(f"{args.log}: moetrain eval printed no JSON loss on its last line")
    write_result(args.result, {"loss": loss})
    print(f"[eval] {args.name}: held-out assistant loss {loss:.4f} nats per token")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--n-base", type=int, default=4000)
    d.add_argument("--n-train", type=int, default=4000)
    d.add_argument("--n-heldout", type=int, default=200)
    d.add_argument("--heldout-numbers", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("base")
    b.add_argument("--out", required=True)
    b.add_argument("--corpus", nargs="+", required=True)
    b.add_argument("--d-model", type=int, default=128)
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--experts", type=int, default=8)
    b.add_argument("--context", type=int, default=128)
    b.add_argument("--seed", type=int, default=0)
    for name, fn in (("accuracy", cmd_accuracy), ("agree", cmd_agree)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--name", required=True)
        s.add_argument("--model", required=True, help="Hugging Face folder")
        s.add_argument("--tokenizer", required=True)
        s.add_argument("--heldout", required=True)
        s.add_argument("--result", required=True)
        s.add_argument("--max-new-tokens", type=int, default=8)
    sub.choices["accuracy"].add_argument("--limit", type=int, default=0)
    sub.choices["accuracy"].add_argument("--batch", type=int, default=64)
    sub.choices["agree"].add_argument("--checkpoint", required=True)
    sub.choices["agree"].add_argument("--moetrain", default="build/moetrain")
    sub.choices["agree"].add_argument("--prompts", type=int, default=5)
    e = sub.add_parser("eval-result")
    e.add_argument("--name", required=True)
    e.add_argument("--result", required=True)
    e.add_argument("--log", required=True, help="what moetrain eval --json printed")
    t = sub.add_parser("table")
    t.add_argument("rows", nargs="+", help="NAME=RESULT.json")
    args = p.parse_args()
    {"data": cmd_data, "base": cmd_base, "table": cmd_table, "eval-result": cmd_eval_result}.get(
        args.command, getattr(args, "fn", None))(args)


if __name__ == "__main__":
    main()
