"""Reference side of the Hugging Face import/export tests (tests/test_hf.cpp): builds tiny random MoE
models with transformers, and computes logits and greedy continuations with transformers.

  hf_reference.py make FAMILY OUT_DIR    tiny model saved to OUT_DIR (sharded, with an index) plus
                                         OUT_DIR/reference.safetensors: tokens, logits, greedy
                                         (deepseek_v3_mtp, glm4_moe_mtp: num_nextn_predict_layers 1,
                                         whose MTP layer transformers does not model: written apart;
                                         gpt_oss_mxfp4: experts stored as MXFP4 blocks and scales)
  hf_reference.py logits HF_DIR TOKENS_FILE OUT_FILE
                                         loads HF_DIR with transformers; logits on TOKENS_FILE's tokens
  hf_reference.py repack HF_DIR OUT_DIR  loads HF_DIR and saves it in transformers 5's own layout
                                         (save_original_format=False: stacked experts), with its
                                         reference.safetensors
  hf_reference.py peft_logits HF_DIR PEFT_DIR TOKENS_FILE OUT_FILE
                                         the same with PEFT_DIR's LoRA adapters loaded by peft onto it
                                         ("logits"), and the base's alone ("base")

Run with third_party/venv/bin/python. Everything is fp32 on the CPU with fixed seeds.
"""
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

VOCAB = 96
PROMPT_LEN = 5
NEW_TOKENS = 8


def tiny_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, num_experts_per_tok=2)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=24, num_hidden_layers=2, num_local_experts=8,
                                          rope_theta=50000.0, tie_word_embeddings=False, sliding_window=None)
    if family == "qwen2_moe":  # attention biases, a gated shared expert, raw top-k weights, one dense layer
        return transformers.Qwen2MoeConfig(**common, intermediate_size=40, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=24, num_hidden_layers=3, num_experts=8,
                                           mlp_only_layers=[0], qkv_bias=True, norm_topk_prob=False,
                                           tie_word_embeddings=False)
    if family == "qwen3_moe":  # per-head q/k norms, head_dim apart from hidden/heads, normalized top-k, tied
        return transformers.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                           num_hidden_layers=3, num_experts=8, mlp_only_layers=[0],
                                           norm_topk_prob=True, tie_word_embeddings=True)
    if family == "olmoe":  # q/k norms over the whole projection, raw top-k weights
        return transformers.OlmoeConfig(**common, intermediate_size=16, num_hidden_layers=2, num_experts=8,
                                        norm_topk_prob=False, tie_word_embeddings=False)
    if family in ("deepseek_v3", "deepseek_v2_lite", "deepseek_v3_mtp"):
        # MLA (with or without the query low-rank), YaRN, sigmoid group-limited routing with the
        # score-correction bias, routed scaling, a shared expert, one dense first layer.
        return transformers.DeepseekV3Config(
            vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-6, num_experts_per_tok=2, num_hidden_layers=3, intermediate_size=40,
            moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
            q_lora_rank=None if family == "deepseek_v2_lite" else 24, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=12, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 1.0, "mscale_all_dim": 1.0},
            num_nextn_predict_layers=1 if family == "deepseek_v3_mtp" else 0)
    if family in ("deepseek_v2", "deepseek_v2_greedy"):
        # MLA (with the query low-rank, and without it as V2-Lite), YaRN, softmax routing: group-limited by
        # each group's best expert, or plain top-k; raw top-k weights times the routed scaling; a shared
        # expert and one dense first layer.
        grouped = family == "deepseek_v2"
        return transformers.DeepseekV2Config(
            vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-6, num_experts_per_tok=2, num_hidden_layers=3, intermediate_size=40,
            moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=1,
            topk_method="group_limited_greedy" if grouped else "greedy", n_group=4 if grouped else None,
            topk_group=2 if grouped else None, routed_scaling_factor=16.0 if grouped else 1.0,
            q_lora_rank=24 if grouped else None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=12, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 0.707, "mscale_all_dim": 0.707})
    if family in ("glm4_moe", "glm4_moe_mtp", "glm4_moe_qk_norm"):
        # GQA with partial RoPE (half the head; a quarter with q/k norms) on a head_dim apart from
        # hidden/heads; q/k/v biases (none with q/k norms); sigmoid routing with the correction bias, a
        # shared expert, one dense first layer (none with q/k norms, where the groups are 4 and the
        # top-k weights raw times 2.5).
        qk_norm = family == "glm4_moe_qk_norm"
        return transformers.Glm4MoeConfig(
            **common, head_dim=16, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
            n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0 if qk_norm else 1,
            n_group=4 if qk_norm else 1, topk_group=2 if qk_norm else 1, norm_topk_prob=not qk_norm,
            routed_scaling_factor=2.5 if qk_norm else 1.0, attention_bias=not qk_norm, use_qk_norm=qk_norm,
            tie_word_embeddings=False, num_nextn_predict_layers=1 if family == "glm4_moe_mtp" else 0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25 if qk_norm else 0.5})
    if family in ("gpt_oss", "gpt_oss_sliding", "gpt_oss_mxfp4"):
        # gpt-oss: attention sinks, q/k/v/o biases, a sliding window shorter than the sequence (12 tokens)
        # on alternating layers (gpt_oss_sliding: on every layer, no biases, plain RoPE, top-3 of 6), YaRN
        # without truncation, clamped SwiGLU experts with biases, a router with a bias. gpt_oss_mxfp4 has
        # the widths MXFP4's 32-value blocks need; its experts are stored as MXFP4 (make_mxfp4_experts).
        sliding = family == "gpt_oss_sliding"
        mxfp4 = family == "gpt_oss_mxfp4"
        yarn = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
        return transformers.GptOssConfig(
            vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, head_dim=16 if not mxfp4 else 8, num_hidden_layers=3,
            intermediate_size=32 if mxfp4 else 16, num_local_experts=6 if sliding else 4,
            num_experts_per_tok=3 if sliding else 2, sliding_window=3 if sliding else 5,
            layer_types=["sliding_attention"] * 3 if sliding else None, attention_bias=not sliding,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0} if sliding else yarn)
    raise SystemExit(f"unknown family {family}")


def model_class(family):
    return {"mixtral": transformers.MixtralForCausalLM, "qwen2_moe": transformers.Qwen2MoeForCausalLM,
            "qwen3_moe": transformers.Qwen3MoeForCausalLM, "olmoe": transformers.OlmoeForCausalLM,
            "deepseek_v3": transformers.DeepseekV3ForCausalLM,
            "deepseek_v2_lite": transformers.DeepseekV3ForCausalLM,
            "deepseek_v3_mtp": transformers.DeepseekV3ForCausalLM,
            "deepseek_v2": transformers.DeepseekV2ForCausalLM,
            "deepseek_v2_greedy": transformers.DeepseekV2ForCausalLM,
            "glm4_moe": transformers.Glm4MoeForCausalLM, "glm4_moe_mtp": transformers.Glm4MoeForCausalLM,
            "glm4_moe_qk_norm": transformers.Glm4MoeForCausalLM, "gpt_oss": transformers.GptOssForCausalLM,
            "gpt_oss_sliding": transformers.GptOssForCausalLM, "gpt_oss_mxfp4": transformers.GptOssForCausalLM}[family]


def fixed_tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float().contiguous()


def randomize(model):
    # Weights far from the defaults (norms of ones, zero routers) so that a wrong mapping shows.
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "e_score_correction_bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))


def add_mtp_layer(model, out_dir):
    """DeepSeek-V3's MTP module as its checkpoints store it (layer num_hidden_layers: embed_tokens, enorm,
    hnorm, eh_proj, a decoder layer, shared_head.norm and shared_head.head; README_WEIGHTS.md of
    deepseek-ai/DeepSeek-V3; GLM-4.5 stores its MTP layer the same way), in a shard of its own added to
    the index."""
    import json
    import tempfile
    cfg = model.config
    layer = cfg.num_hidden_layers
    deeper = type(model)(type(cfg)(**{**cfg.to_dict(), "num_hidden_layers": layer + 1}))
    randomize(deeper)
    prefix = f"model.layers.{layer}."
    with tempfile.TemporaryDirectory() as tmp:  # the block as transformers writes it (one tensor per expert)
        deeper.save_pretrained(tmp)
        tensors = {k: v.clone().contiguous() for k, v in load_file(f"{tmp}/model.safetensors").items()
                   if k.startswith(prefix)}
    d = cfg.hidden_size
    tensors[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    tensors[prefix + "enorm.weight"] = 1.0 + 0.2 * torch.randn(d)
    tensors[prefix + "hnorm.weight"] = 1.0 + 0.2 * torch.randn(d)
    tensors[prefix + "eh_proj.weight"] = 0.15 * torch.randn(d, 2 * d)
    tensors[prefix + "shared_head.norm.weight"] = 1.0 + 0.2 * torch.randn(d)
    tensors[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    save_file(tensors, f"{out_dir}/model-mtp.safetensors", metadata={"format": "pt"})
    with open(f"{out_dir}/model.safetensors.index.json") as f:
        index = json.load(f)
    for name in tensors:
        index["weight_map"][name] = "model-mtp.safetensors"
    with open(f"{out_dir}/model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)


# MXFP4 as gpt-oss stores experts (OCP Microscaling): per row, blocks of 32 four-bit E2M1 values (two a
# byte, low nibble first) sharing one power-of-two scale byte (2^(s - 127)). Written here from the
# format's definition: sign bit 3, then values 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_values(blocks, scales):
    """(..., G, 16) uint8 and (..., G) uint8 -> (..., G * 32) float32."""
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2).long()  # (..., G, 32)
    table = torch.tensor(E2M1 + [-v for v in E2M1])
    values = table[codes] * torch.pow(2.0, scales.float() - 127).unsqueeze(-1)
    return values.flatten(-2)


def make_mxfp4_experts(model):
    """Sets every layer's experts to random MXFP4-exact values; returns their (blocks, scales) by tensor
    name. gate_up_proj (E, D, 2F) is stored transposed, (E, 2F, D / 32, 16); down_proj (E, F, D) as
    (E, D, F / 32, 16)."""
    g = torch.Generator().manual_seed(11)
    stored = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                param = getattr(layer.mlp.experts, proj)  # (E, in, out)
                e, n_in, n_out = param.shape
                blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
                scales = torch.randint(122, 126, (e, n_out, n_in // 32), generator=g, dtype=torch.uint8)
                param.copy_(mxfp4_values(blocks, scales).transpose(1, 2))
                stored[f"model.layers.{i}.mlp.experts.{proj}"] = (blocks, scales)
    return stored


def store_mxfp4(out_dir, stored):
    """Rewrites the saved folder as one model.safetensors whose experts are MXFP4 blocks and scales."""
    import glob
    import json
    import os
    tensors = {}
    for f in sorted(glob.glob(f"{out_dir}/model*.safetensors")):
        tensors.update(load_file(f))
        os.remove(f)
    if os.path.exists(f"{out_dir}/model.safetensors.index.json"):
        os.remove(f"{out_dir}/model.safetensors.index.json")
    for name, (blocks, scales) in stored.items():
        del tensors[name]
        tensors[name + "_blocks"] = blocks
        tensors[name + "_scales"] = scales
    save_file(tensors, f"{out_dir}/model.safetensors", metadata={"format": "pt"})
    with open(f"{out_dir}/config.json") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    with open(f"{out_dir}/config.json", "w") as f:
        json.dump(config, f, indent=2)


def make(family, out_dir):
    torch.manual_seed(0)
    model = model_class(family)(tiny_config(family)).eval()
    randomize(model)
    stored = make_mxfp4_experts(model) if family == "gpt_oss_mxfp4" else None
    model.save_pretrained(out_dir, max_shard_size="40KB")
    if stored:
        store_mxfp4(out_dir, stored)
    if family in ("deepseek_v3_mtp", "glm4_moe_mtp"):
        add_mtp_layer(model, out_dir)
    tokens = fixed_tokens()
    prompt = tokens[:1, :PROMPT_LEN]
    model.generation_config.eos_token_id = None  # exactly NEW_TOKENS tokens, none suppressed
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():  # transformers' own shifted mean cross-entropy (no router loss: output_router_logits off)
        loss = model(input_ids=tokens, labels=tokens).loss.float().reshape(1)
    save_file({"tokens": tokens, "logits": logits_of(model, tokens), "greedy": greedy.contiguous(), "loss": loss},
              f"{out_dir}/reference.safetensors")


def logits(hf_dir, tokens_file, out_file):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = load_file(tokens_file)["tokens"]
    save_file({"logits": logits_of(model, tokens)}, out_file)


def repack(hf_dir, out_dir):
    import shutil
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.save_pretrained(out_dir, save_original_format=False, max_shard_size="40KB")
    shutil.copy(f"{hf_dir}/reference.safetensors", f"{out_dir}/reference.safetensors")


def peft_logits(hf_dir, peft_dir, tokens_file, out_file):
    import warnings
    import peft
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = load_file(tokens_file)["tokens"]
    base = logits_of(model, tokens)
    with warnings.catch_warnings(record=True) as caught:  # a key peft could not place is a failure, not a warning
        warnings.simplefilter("always")
        adapted = peft.PeftModel.from_pretrained(model, peft_dir).eval()
    for w in caught:
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower():
            raise SystemExit(f"peft: {w.message}")
    save_file({"logits": logits_of(adapted, tokens), "base": base}, out_file)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "logits":
        logits(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "repack":
        repack(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "peft_logits":
        peft_logits(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(__doc__)
