#!/usr/bin/env python3
"""The Hugging Face reference for moetrain_bench_moe: Qwen3-MoE's sparse MoE block from transformers,
built with the same shape, loaded with the weights `moetrain_bench_moe --save-weights FILE` wrote, checked against
moetrain's output and input gradient, and timed forward+backward the same way. Prints one JSON object.

Usage: bench_moe_hf.py FILE [--threads N] [--iters N] [--warmup N] [--impls eager,grouped_mm]
(threads, iters and warm-up default to the values moetrain_bench_moe ran with, stored in the file's metadata).
"""
import argparse
import json
import statistics
import sys
import time

import torch
from safetensors import safe_open

TOLERANCE = 1e-4  # max abs difference allowed against moetrain's output and input gradient (fp32)


def load(path):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    need = ["router.weight", "experts.w1", "experts.w3", "experts.w2", "x", "g", "out", "grad_x"]
    missing = [n for n in need if n not in tensors]
    if missing:
        sys.exit(f"[bench-hf] {path} lacks {', '.join(missing)} (write it with build/moetrain_bench_moe --save-weights)")
    return meta, tensors


def build_block(t, top_k, normalize_topk, impl):
    """A Qwen3MoeSparseMoeBlock with our weights. transformers 5.x stores the experts stacked:
    gate_up_proj (E, 2F, D) = [w1^T; w3^T] per expert (gate first), down_proj (E, D, F) = w2^T."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    n_experts, d_model, hidden = t["experts.w1"].shape
    config = Qwen3MoeConfig(
        hidden_size=d_model,
        moe_intermediate_size=hidden,
        num_experts=n_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=normalize_topk,
        hidden_act="silu",
    )
    config._experts_implementation = impl  # what from_pretrained sets; a bare block needs it set by hand
    block = Qwen3MoeSparseMoeBlock(config).float()
    experts = block.experts
    if tuple(experts.gate_up_proj.shape) != (n_experts, 2 * hidden, d_model) or tuple(experts.down_proj.shape) != (
        n_experts,
        d_model,
        hidden,
    ):
        sys.exit(
            f"[bench-hf] unexpected Qwen3MoeExperts layout: gate_up_proj {tuple(experts.gate_up_proj.shape)}, "
            f"down_proj {tuple(experts.down_proj.shape)} (this script knows transformers 5.x's stacked experts)"
        )
    with torch.no_grad():
        block.gate.weight.copy_(t["router.weight"])
        experts.gate_up_proj.copy_(torch.cat([t["experts.w1"].transpose(1, 2), t["experts.w3"].transpose(1, 2)], dim=1))
        experts.down_proj.copy_(t["experts.w2"].transpose(1, 2))
    return block


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="safetensors file from build/moetrain_bench_moe --save-weights")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: as moetrain_bench_moe ran)")
    parser.add_argument("--iters", type=int, help="timed iterations (default: as moetrain_bench_moe ran)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default: as moetrain_bench_moe ran)")
    parser.add_argument(
        "--impls",
        default="grouped_mm,eager",
        help="comma-separated transformers experts implementations to time; the first is the one the ratio "
        "'vs transformers' uses (default grouped_mm,eager; grouped_mm is what from_pretrained picks)",
    )
    args = parser.parse_args()

    meta, t = load(args.weights)
    threads = args.threads or int(meta.get("threads", 2))
    iters = args.iters or int(meta.get("iters", 10))
    warmup = args.warmup if args.warmup is not None else int(meta.get("warmup", 2))
    top_k = int(meta["top_k"])
    normalize_topk = meta.get("normalize_topk", "1") == "1"
    torch.set_num_threads(threads)

    import transformers

    x = t["x"].unsqueeze(0).clone().requires_grad_(True)  # (1, T, D): the block takes (batch, seq, hidden)
    g = t["g"].unsqueeze(0)
    def step(block):
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out.backward(g)
        return out.detach()

    # Each implementation checked once against moetrain's output and input gradient ...
    results, blocks, failed = [], {}, False
    for impl in [s for s in args.impls.split(",") if s]:
        name = f"transformers ({impl})"
        try:
            block = build_block(t, top_k, normalize_topk, impl)
            out = step(block)
        except Exception as e:  # an implementation this torch or machine lacks: report, keep the others
            results.append({"name": name, "skipped": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
            continue
        out_diff = (out[0] - t["out"]).abs().max().item()
        grad_diff = (x.grad[0] - t["grad_x"]).abs().max().item()
        ok = out_diff < TOLERANCE and grad_diff < TOLERANCE
        failed |= not ok
        blocks[name] = block
        results.append({"name": name, "max_abs_diff_out": out_diff, "max_abs_diff_grad_x": grad_diff,
                        "matches_moetrain": ok, "times_ms": []})
        print(
            f"[bench-hf] {name}: max|out - moetrain| {out_diff:.2e}, max|dx - moetrain| {grad_diff:.2e}"
            + ("" if ok else f"  MISMATCH (tolerance {TOLERANCE:g})"),
            file=sys.stderr,
        )
    # ... then timed round-robin, as moetrain_bench_moe does, so that a change in machine load affects them alike.
    timed = [r for r in results if r["name"] in blocks]
    for i in range(warmup + iters):
        for r in timed:
            start = time.perf_counter()
            step(blocks[r["name"]])
            if i >= warmup:
                r["times_ms"].append((time.perf_counter() - start) * 1000.0)
    for r in timed:
        r["ms"] = statistics.median(r["times_ms"])
        r["tokens_per_s"] = t["x"].shape[0] / (r["ms"] / 1000.0)

    print(
        json.dumps(
            {
                "config": {
                    "tokens": int(t["x"].shape[0]),
                    "threads": threads,
                    "iters": iters,
                    "warmup": warmup,
                    "normalize_topk": normalize_topk,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                },
                "variants": results,
            }
        )
    )
    if failed:
        print(f"[bench-hf] transformers' output differs from moetrain's by {TOLERANCE:g} or more", file=sys.stderr)
        return 1
    if not any("ms" in r for r in results):
        print("[bench-hf] no transformers implementation ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
