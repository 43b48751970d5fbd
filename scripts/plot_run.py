#!/usr/bin/env python3
"""Plots a training run from its <out_dir>/metrics.jsonl into <out_dir>/plots/:
  loss.png          train loss and validation loss against step
  expert_load.png   each expert's share of its layer's routed copies relative to uniform (count * E / total),
                    one row per (layer, expert), one column per logged step
  load_balance.png  max/mean expert load per MoE layer against step

Usage: plot_run.py OUT_DIR   (e.g. runs/tiny; third_party/venv has matplotlib, see scripts/setup.sh)
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402


def fail(message):
    print(f"[plot] {message}", file=sys.stderr)
    sys.exit(1)


def read_metrics(path):
    if not os.path.isfile(path):
        fail(f"{path} not found: give the run folder (run.out_dir) of a `moetrain train` run")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not JSON ({e.msg})")
            if not isinstance(rec, dict) or "step" not in rec:
                fail(f"{path}:{n}: a record needs a 'step'")
            records.append(rec)
    if not records:
        fail(f"{path} is empty: the run has logged no step yet")
    return sorted(records, key=lambda r: r["step"])


def plot_loss(records, out_path):
    # A skipped step (non-finite loss or gradient) has "loss": null and "skipped": true: left out.
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and not r.get("skipped")]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.5)
    if val:
        ax.plot(*zip(*val), label="val loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def moe_records(records):
    """(steps, {layer: [tokens_per_expert per step]}, {layer: [max_over_mean per step]}) from the "moe" lists."""
    steps, loads, max_over_mean = [], {}, {}
    for r in records:
        if not r.get("moe"):
            continue
        steps.append(r["step"])
        for layer in r["moe"]:
            loads.setdefault(layer["layer"], []).append(layer["tokens_per_expert"])
            max_over_mean.setdefault(layer["layer"], []).append(layer["max_over_mean"])
    return steps, loads, max_over_mean


def plot_expert_load(steps, loads, out_path):
    layers = sorted(loads)
    blocks = []  # per layer: (E, steps) share of the layer's copies relative to uniform
    for layer in layers:
        counts = np.array(loads[layer], dtype=float).T  # (E, steps)
        total = counts.sum(axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            blocks.append(np.where(total > 0, counts * counts.shape[0] / total, np.nan))
    share = np.vstack(blocks)
    rows, cols = share.shape
    # A log scale symmetric about 1: 4x over- and 4x under-loaded look equally strong. It reaches E either
    # way at most (a share's ceiling), less where no expert is that far off; idle experts take the bottom colour.
    positive = share[np.isfinite(share) & (share > 0)]
    most_experts = max(block.shape[0] for block in blocks)
    vmax = min(float(max(2, most_experts)), max(2.0, float(positive.max()), float(1.0 / positive.min()))) \
        if positive.size else 2.0
    shown = np.clip(share, 1.0 / vmax, vmax)

    fig, ax = plt.subplots(figsize=(min(max(8, 3 + 0.25 * cols), 18), min(max(4, 2 + 0.12 * rows), 18)))
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                      norm=LogNorm(vmin=1.0 / vmax, vmax=vmax))
    start = 0
    centers, labels = [], []
    for layer, block in zip(layers, blocks):
        n_experts = block.shape[0]
        if start > 0:
            ax.axhline(start - 0.5, color="black", linewidth=1.5)
        centers.append(start + (n_experts - 1) / 2)
        labels.append(f"layer {layer}\n({n_experts} experts)")
        start += n_experts
    ax.set_yticks(centers)
    ax.set_yticklabels(labels)
    if rows <= 64:  # one minor tick per expert where they stay readable
        ax.set_yticks(range(rows), minor=True)
    tick_every = max(1, int(np.ceil(cols / 12)))
    ax.set_xticks(range(0, cols, tick_every))
    ax.set_xticklabels([str(s) for s in steps[::tick_every]])
    ax.set_xlabel("step")
    ax.set_ylabel("experts of each layer, expert 0 on top")
    ax.set_title(f"expert load relative to uniform per MoE layer (darkest blue: idle or under 1/{vmax:.3g})")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("count * E / layer total  (log scale, 1 = uniform)")
    top = int(np.floor(np.log2(vmax)))
    ticks = [2.0**k for k in range(-top, top + 1)]
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
    bar.minorticks_off()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_load_balance(steps, max_over_mean, out_path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for layer in sorted(max_over_mean):
        ax.plot(steps, max_over_mean[layer], marker=".", label=f"layer {layer}")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title("load balance per MoE layer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if len(sys.argv) == 2 else 2
    out_dir = sys.argv[1]
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    written = [os.path.join(plots, "loss.png")]
    plot_loss(records, written[0])
    steps, loads, max_over_mean = moe_records(records)
    if steps:
        written.append(os.path.join(plots, "expert_load.png"))
        plot_expert_load(steps, loads, written[-1])
        written.append(os.path.join(plots, "load_balance.png"))
        plot_load_balance(steps, max_over_mean, written[-1])
    else:
        print("[plot] no per-layer \"moe\" records (a dense model, or metrics from an older moetrain): "
              "wrote the loss plot only", file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
