#!/usr/bin/env python3
"""The GRPO demo's task data and its reward curve (scripts/rl_demo.sh).

data OUT: two-digit additions "a+b=" -> "c", split so that no held-out pair (a, b) is trained on:
sft.txt (a share of the training problems written out, "a+b=c" per line, for a brief SFT),
rl_train.jsonl (the RL prompts: all training problems) and heldout.jsonl (problems in neither).
plot METRICS PNG: reward_mean and accuracy per rollout batch, held-out accuracy where measured.
"""
import json
import pathlib
import random
import sys


def data(out_dir: str) -> None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2026)
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(problems)
    heldout, train = problems[:300], problems[300:]
    sft = train[: len(train) // 4]  # part of the task: the SFT stage sees a quarter of the training problems
    with open(out / "sft.txt", "w") as f:
        for a, b in sft:
            f.write(f"{a}+{b}={a + b}\n")
    for name, rows in (("rl_train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(out / name, "w") as f:
            for a, b in rows:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    print(f"[rl_demo] {out}: sft.txt ({len(sft)} problems), rl_train.jsonl ({len(train)}), heldout.jsonl ({len(heldout)})")


def plot(metrics: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward_mean"] for r in rows], label="reward mean (sampled, T=1)")
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    start = [r["eval_accuracy_start"] for r in rows if "eval_accuracy_start" in r]
    if start:
        evals = [(0, start[0])] + evals
    if evals:
        ax.plot([s for s, _ in evals], [a for _, a in evals], "o-", label="held-out exact match (greedy)")
    ax.set_xlabel("rollout batch")
    ax.set_ylim(0, 1)
    ax.set_title("GRPO on two-digit addition (moetrain rl)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"[rl_demo] reward curve: {png}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "data":
        data(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "plot":
        plot(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: rl_demo.py data OUT_DIR | plot METRICS_JSONL PNG")
