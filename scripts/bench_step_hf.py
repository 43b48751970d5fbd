#!/usr/bin/env python3
"""The Hugging Face side of the GPU check's OLMoE-shaped step benchmark: transformers' OlmoeForCausalLM
built with the shape `moetrain bench-step` runs (configs/models/olmoe-1b-7b.yaml, with the layers
given), randomly initialised, trained the way moetrain trains it: fp32 weights and AdamW (fused),
matmuls in bf16 under autocast, SDPA attention, one sequence per micro-batch. Times whole optimizer
steps (forward, backward, AdamW) after a warm-up and prints one JSON object: tokens/s, the mean step
time and the CUDA allocator's peak.

Usage: bench_step_hf.py [--layers N] [--seq N] [--batch N] [--steps N] [--warmup N]
"""
import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("[bench-step-hf] needs a CUDA device")
    from transformers import OlmoeConfig, OlmoeForCausalLM

    # OLMoE-1B-7B's config.json, but for the number of layers.
    cfg = OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-5, num_experts=64, num_experts_per_tok=8,
                      norm_topk_prob=False, router_aux_loss_coef=0.01, output_router_logits=True,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = OlmoeForCausalLM(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    vocab = cfg.vocab_size
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        tokens = torch.randint(0, vocab, (args.batch, args.seq), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=tokens, labels=tokens)  # the model shifts the labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.mean(times)
    print(json.dumps({"framework": "transformers", "layers": args.layers, "seq_len": args.seq, "batch": args.batch,
                      "params": sum(p.numel() for p in model.parameters()), "step_s_mean": step,
                      "tokens_per_s": args.batch * args.seq / step,
                      "peak_allocated_bytes": torch.cuda.max_memory_allocated()}))


if __name__ == "__main__":
    main()
