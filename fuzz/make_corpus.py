#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/): small valid inputs of each
format, from the format descriptions in csrc/ (standard library only). The files are committed;
run this again after a format changes: python3 fuzz/make_corpus.py"""
import hashlib
import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")


def put(target, name, data):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, raw bytes)]; the reference layout (header padded to 8 bytes)."""
    header, offset, body = {}, 0, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        body += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + body


def shard(tokens, width, vocab):
    fmt = {1: "B", 2: "H", 4: "I"}[width]
    return b"MOETOKS\0" + struct.pack("<IIQQ", 1, width, len(tokens), vocab) + struct.pack("<%d%s" % (len(tokens), fmt), *tokens)


def mask(entries, shard_name="train.bin"):
    name = shard_name.encode().ljust(40, b"\0")
    return b"MOEMASK\0" + struct.pack("<IIQ", 1, 0, len(entries)) + name + bytes(entries)


def main():
    if os.path.isdir(CORPUS):
        shutil.rmtree(CORPUS)

    # safetensors: one tensor, several dtypes with metadata, a bool, an empty file, a zero-size tensor.
    put("safetensors", "one_f32", safetensors([("w", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4))]))
    put("safetensors", "dtypes", safetensors(
        [("a", "BF16", [3], b"\x80\x3f" * 3), ("b", "I64", [1], struct.pack("<q", -5)),
         ("c", "U8", [2, 1], b"\x01\x02"), ("d", "F16", [], b"\x00\x3c")], {"format": "pt"}))
    put("safetensors", "bool", safetensors([("m", "BOOL", [4], b"\x00\x01\x01\x00")]))
    put("safetensors", "empty", safetensors([]))
    put("safetensors", "zero_size", safetensors([("z", "F64", [0, 3], b""), ("x", "I8", [1], b"\x07")]))

    # token shards of each width, and an empty one.
    put("shard", "u8", shard([1, 2, 3, 250, 0], 1, 256))
    put("shard", "u16", shard([1, 300, 65535], 2, 65536))
    put("shard", "u32", shard([70000, 5], 4, 100000))
    put("shard", "empty", shard([], 1, 256))

    # loss masks for the fuzz target's fixed 16-token train.bin.
    put("loss_mask", "half", mask([0] * 8 + [1] * 8))
    put("loss_mask", "all", mask([1] * 16))

    # checkpoint manifests for a folder holding model.safetensors = "0123456789abcdef".
    content = b"0123456789abcdef"
    files = [{"name": "model.safetensors", "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}]
    manifest = {"format": "moetrain-checkpoint", "format_version": 2, "step": 3, "tokens": 96,
                "elapsed_s": 1.5, "gpu_hours": 0.001, "cost_usd": 0.002,
                "layout": {"world_size": 2, "expert_parallel": 2, "routed_experts": 4},
                "data_cursor": {"step": 3, "tokens": 96}, "config": "run:\n  name: fuzz\n", "files": files}
    put("manifest", "v2", json.dumps(manifest, indent=2) + "\n")
    v1 = {k: v for k, v in manifest.items() if k not in ("layout", "gpu_hours", "cost_usd")}
    v1["format_version"] = 1
    put("manifest", "v1", json.dumps(v1))

    # Hugging Face config.json of each family, tiny.
    common = {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 4, "max_position_embeddings": 16, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "num_experts_per_tok": 2}
    put("hf_config", "mixtral", json.dumps(dict(common, architectures=["MixtralForCausalLM"], model_type="mixtral",
                                                intermediate_size=8, num_local_experts=4, sliding_window=None)))
    put("hf_config", "qwen2_moe", json.dumps(dict(
        common, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", intermediate_size=24,
        moe_intermediate_size=8, num_experts=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0],
        use_sliding_window=False, qkv_bias=True, shared_expert_intermediate_size=8)))
    put("hf_config", "qwen3_moe", json.dumps(dict(
        common, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", intermediate_size=24,
        moe_intermediate_size=8, num_experts=4, norm_topk_prob=True, mlp_only_layers=[],
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, attention_bias=False)))
    put("hf_config", "olmoe", json.dumps(dict(
        common, architectures=["OlmoeForCausalLM"], model_type="olmoe", intermediate_size=8, num_experts=4,
        clip_qkv=None, attention_bias=False)))
    deepseek = dict(common, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", q_lora_rank=8,
                    kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, intermediate_size=24,
                    moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=2, topk_group=1, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    del deepseek["head_dim"]
    put("hf_config", "deepseek_v3", json.dumps(deepseek))

    # model.safetensors.index.json of the fuzz target's tiny Mixtral (vocab 8, d 4, 2 heads of 2, 1 kv head,
    # 2 experts of hidden 4), sharded as export_model does with max_shard_bytes = 200 (fp32).
    sizes = [("model.embed_tokens.weight", 32), ("model.layers.0.input_layernorm.weight", 4)]
    sizes += [("model.layers.0.self_attn.%s_proj.weight" % p, n) for p, n in (("q", 16), ("k", 8), ("v", 8), ("o", 16))]
    sizes += [("model.layers.0.post_attention_layernorm.weight", 4), ("model.layers.0.block_sparse_moe.gate.weight", 8)]
    sizes += [("model.layers.0.block_sparse_moe.experts.%d.%s.weight" % (e, w), 16) for e in range(2) for w in ("w1", "w3", "w2")]
    sizes += [("model.norm.weight", 4), ("lm_head.weight", 32)]
    shards, used = [[]], 0
    for name, numel in sizes:
        if shards[-1] and used + 4 * numel > 200:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += 4 * numel
    weight_map = {n: "model-%05d-of-%05d.safetensors" % (i + 1, len(shards)) for i, s in enumerate(shards) for n in s}
    put("hf_index", "exported", json.dumps({"metadata": {"total_size": 4 * sum(n for _, n in sizes)},
                                            "weight_map": weight_map}, indent=2))

    # YAML configs, and one with --set overrides after NUL bytes.
    with open(os.path.join(ROOT, "..", "configs", "tiny.yaml"), "rb") as f:
        tiny = f.read()
    put("config", "tiny", tiny)
    put("config", "tiny_overrides", tiny + b"\0model.moe.top_k=1\0optim.lr=3e-4\0model.moe.capacity_factor=null")
    put("config", "flow", "model: {d_model: 64, n_heads: 4, moe: {n_experts: 4, top_k: 2}}\ntrain: {steps: 2}\n")
    put("config", "empty", "")


if __name__ == "__main__":
    main()
