#!/usr/bin/env python3
"""Public training-cost claims beside moetrain's FLOPs model: one markdown table.

Each configs/claims/*.yaml holds a `claim` (name, tokens, gpu, gpu_hours, source; optionally
reported_mfu as "lo-hi" and published_flops) and the architecture in moetrain's schema, inline under
`config` or as `config_file`. For each claim `moetrain cost --gpu-hours` gives the FLOPs per token
(training, causal attention), the total FLOPs, and the throughput per GPU and MFU the claim implies.
Verdict: an implied MFU above 60% (beyond any published large-scale training run) flags the claim as
implausible; where the source reports its own MFU, the implied one is set against it.

A claim with an `rl` section is a reinforcement-learning run (claim: name, gpu, gpus, gpu_hours,
source; rl.stages: each with its own gpu_hours and the settings of `moetrain cost --rl`). Its stages
are costed one by one and summed in a second table: the MFU the claimed GPU-hours imply over all the
run's FLOPs, and decoding's memory-bandwidth floor (its weight and KV bytes at the full HBM bandwidth).
Verdict: implausible when the floor alone exceeds a stage's GPU-hours, or when what remains of them
would need an MFU above 60% for the rest of the work.
Usage: claims_table.py MOETRAIN_BIN [CLAIMS_DIR]"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import yaml

PLAUSIBLE_MFU = 0.60
REQUIRED = ("name", "tokens", "gpu", "gpu_hours", "source")
RL_REQUIRED = ("name", "gpu", "gpus", "gpu_hours", "source")
STAGE_REQUIRED = ("name", "gpu_hours", "prompts_per_step", "group_size", "prompt_len", "response_len", "steps")
STAGE_OPTIONAL = ("updates_per_batch", "epochs", "reference", "decode_batch", "softmax_layers")


def fail(message):
    sys.exit(f"claims_table: {message}")


def load_claim(path):
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        fail(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(doc, dict) or not isinstance(doc.get("claim"), dict):
        fail(f"{path}: expected a mapping with a 'claim' section")
    claim = doc["claim"]
    rl = "rl" in doc
    for key in RL_REQUIRED if rl else REQUIRED:
        if key not in claim:
            fail(f"{path}: claim.{key} is missing")
    for key in ("gpu_hours",) if rl else ("tokens", "gpu_hours"):
        claim[key] = positive(path, f"claim.{key}", claim[key])
    if rl:
        stages = doc["rl"].get("stages") if isinstance(doc["rl"], dict) else None
        if not isinstance(stages, list) or not stages:
            fail(f"{path}: rl.stages must be a non-empty list")
        for i, stage in enumerate(stages):
            if not isinstance(stage, dict):
                fail(f"{path}: rl.stages[{i}] must be a mapping")
            for key in STAGE_REQUIRED:
                if key not in stage:
                    fail(f"{path}: rl.stages[{i}].{key} is missing")
            for key in set(stage) - set(STAGE_REQUIRED) - set(STAGE_OPTIONAL):
                fail(f"{path}: rl.stages[{i}].{key} is not a stage setting")
            stage["gpu_hours"] = positive(path, f"rl.stages[{i}].gpu_hours", stage["gpu_hours"])
    if ("config" in doc) == ("config_file" in doc):
        fail(f"{path}: give exactly one of 'config' (inline) and 'config_file'")
    return doc


def positive(path, key, value):
    try:  # YAML 1.1 reads 2.0e12 (no exponent sign) as a string
        value = float(value)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0:
        fail(f"{path}: {key} must be a positive number")
    return value


def config_path(path, doc, tmp):
    if "config_file" in doc:
        config = pathlib.Path(doc["config_file"])
        if not config.is_file():
            fail(f"{path}: config_file {doc['config_file']} does not exist")
        return config
    config = pathlib.Path(tmp) / "config.yaml"
    config.write_text(yaml.safe_dump(doc["config"]))
    return config


def run_cost(path, cmd):
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{path}: moetrain cost failed: {run.stderr.strip().splitlines()[-1] if run.stderr else run.returncode}")
    return json.loads(run.stdout)


def rl_cost(binary, path, doc):
    """Each stage through `moetrain cost --rl --gpu-hours`: a list of (stage, its JSON)."""
    claim = doc["claim"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        config = config_path(path, doc, tmp)
        for stage in doc["rl"]["stages"]:
            cmd = [binary, "cost", "--config", str(config), "--rl", "--gpu", claim["gpu"], "--gpus", str(claim["gpus"]),
                   "--gpu-hours", repr(stage["gpu_hours"]), "--json"]
            for key in STAGE_REQUIRED[2:] + STAGE_OPTIONAL:
                if key in stage:
                    value = stage[key]
                    if isinstance(value, bool):  # YAML 1.1 reads on/off as booleans
                        value = "on" if value else "off"
                    cmd += ["--" + key.replace("_", "-"), str(value)]
            out.append((stage, run_cost(path, cmd)))
    return out


def rl_verdict(stages):
    for stage, j in stages:
        if j["decode_bandwidth_gpu_hours"] >= stage["gpu_hours"]:
            return f"implausible: {stage['name']}'s decoding alone needs more than its GPU-hours"
        if j["rest_mfu_at_decode_floor"] > PLAUSIBLE_MFU:
            return f"implausible: {stage['name']} needs MFU above {PLAUSIBLE_MFU:.0%} beside decoding"
    return "plausible"


def cost(binary, path, doc):
    claim = doc["claim"]
    with tempfile.TemporaryDirectory() as tmp:
        config = config_path(path, doc, tmp)
        cmd = [binary, "cost", "--config", str(config), "--tokens", repr(float(claim["tokens"])),
               "--gpu", claim["gpu"], "--gpu-hours", repr(float(claim["gpu_hours"])), "--json"]
        return run_cost(path, cmd)


def verdict(claim, mfu):
    if mfu > PLAUSIBLE_MFU:
        return f"implausible: implied MFU above {PLAUSIBLE_MFU:.0%}"
    reported = claim.get("reported_mfu")
    if reported:
        lo, hi = (float(x) for x in str(reported).split("-"))
        where = "within" if lo <= mfu <= hi else "below" if mfu < lo else "above"
        return f"plausible; {where} the reported {lo:.0%}-{hi:.0%}"
    return "plausible"


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    binary = str(pathlib.Path(sys.argv[1]).resolve())
    claims_dir = pathlib.Path(sys.argv[2]).resolve() if len(sys.argv) == 3 else None
    root = pathlib.Path(__file__).resolve().parent.parent
    os.chdir(root)  # paths in messages and config_file are relative to the repository
    claims_dir = pathlib.Path(os.path.relpath(claims_dir)) if claims_dir else pathlib.Path("configs/claims")
    paths = sorted(claims_dir.glob("*.yaml"))
    if not paths:
        fail(f"{claims_dir}: no *.yaml claims")
    docs = [(path, load_claim(path)) for path in paths]
    print("| claim | tokens | GPU-hours | GFLOPs/token | total FLOPs | implied tokens/s/GPU | implied MFU | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for path, doc in docs:
        if "rl" in doc:
            continue
        claim = doc["claim"]
        j = cost(binary, path, doc)
        print(f"| {claim['name']} | {claim['tokens'] / 1e12:.1f}T | {claim['gpu_hours'] / 1e6:.3f}M {claim['gpu'].upper()} "
              f"| {j['flops_per_token_causal'] / 1e9:.1f} | {j['total_flops']:.3g} | {j['tokens_per_s_per_gpu']:.0f} "
              f"| {j['mfu']:.1%} | {verdict(claim, j['mfu'])} |")
        if "published_flops" in claim:
            ratio = j["total_flops"] / float(claim["published_flops"])
            notes.append(f"{claim['name']}: our total {j['total_flops']:.3g} FLOPs vs the published "
                         f"{float(claim['published_flops']):.3g} (ratio {ratio:.2f})")
        notes.append(f"{claim['name']}: {claim['source']} ({path.name})")
    print()
    print("Method: FLOPs per token = training (forward + backward = 3x forward) matmul FLOPs with causal attention at"
          " the claim's sequence length (`moetrain cost`); implied tokens/s/GPU = tokens / GPU-hours / 3600;"
          " implied MFU = that x FLOPs per token / the GPU's dense BF16 peak.")
    for n in notes:
        print(f"- {n}")

    rl_docs = [(path, doc) for path, doc in docs if "rl" in doc]
    if not rl_docs:
        return
    print()
    print("| RL claim | GPU-hours | completions | generated tokens | total FLOPs | decode share of FLOPs "
          "| implied MFU | decode bandwidth floor | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for path, doc in rl_docs:
        claim = doc["claim"]
        stages = rl_cost(binary, path, doc)
        total = lambda key: sum(j[key] for _, j in stages)
        hours = sum(stage["gpu_hours"] for stage, _ in stages)
        if abs(hours - claim["gpu_hours"]) > 1e-6 * claim["gpu_hours"]:
            fail(f"{path}: the stages' gpu_hours sum to {hours:.6g}, not claim.gpu_hours {claim['gpu_hours']:.6g}")
        peak = stages[0][1]["peak_tflops"] * 1e12
        mfu = total("total_flops") / (hours * 3600 * peak)
        floor = total("decode_bandwidth_gpu_hours")
        print(f"| {claim['name']} | {hours / 1e3:.0f}K {claim['gpu'].upper()} | {total('completions'):.3g} "
              f"| {total('generated_tokens'):.3g} | {total('total_flops'):.3g} "
              f"| {total('decode_flops') / total('total_flops'):.0%} | {mfu:.1%} "
              f"| {floor / 1e3:.1f}K GPU-h ({floor / hours:.0%}) | {rl_verdict(stages)} |")
        for stage, j in stages:
            notes.append(f"{claim['name']}, stage {stage['name']}: {stage['gpu_hours'] / 1e3:.0f}K GPU-hours, "
                         f"implied MFU {j['mfu']:.1%}; decoding's floor {j['decode_bandwidth_gpu_hours'] / 1e3:.1f}K "
                         f"GPU-hours at a decode batch of {j['decode_batch']:.0f} ({j['experts_touched']:.1f} experts "
                         f"touched per MoE layer), the rest then at MFU {j['rest_mfu_at_decode_floor']:.1%}")
        if "cost_usd" in claim:
            notes.append(f"{claim['name']}: ${float(claim['cost_usd']) / 1e3:.1f}K claimed = "
                         f"${float(claim['cost_usd']) / claim['gpu_hours']:.2f} per GPU-hour")
        notes.append(f"{claim['name']}: {claim['source']} ({path.name}; which settings are stated and which "
                     "assumed is written there)")
    print()
    print("Method: `moetrain cost --rl` per stage: rollout prefill and decode (a forward per token against its KV"
          " cache), the old policy's and the reference's scoring, and the updates (3x forward), matmul FLOPs with"
          " causal attention; implied MFU = all FLOPs / (GPU-hours x 3600 x the dense BF16 peak). The decode floor"
          " reads, per decode step, the weights the batch touches and every sequence's KV cache at the GPU's full"
          " HBM bandwidth.")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
