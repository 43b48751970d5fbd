#!/usr/bin/env python3
"""Public training-cost claims beside moetrain's FLOPs model: one markdown table.

Each configs/claims/*.yaml holds a `claim` (name, tokens, gpu, gpu_hours, source; optionally
reported_mfu as "lo-hi" and published_flops) and the architecture in moetrain's schema, inline under
`config` or as `config_file`. For each claim `moetrain cost --gpu-hours` gives the FLOPs per token
(training, causal attention), the total FLOPs, and the throughput per GPU and MFU the claim implies.
Verdict: an implied MFU above 60% (beyond any published large-scale training run) flags the claim as
implausible; where the source reports its own MFU, the implied one is set against it.
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
    for key in REQUIRED:
        if key not in claim:
            fail(f"{path}: claim.{key} is missing")
    for key in ("tokens", "gpu_hours"):  # YAML 1.1 reads 2.0e12 (no exponent sign) as a string
        try:
            claim[key] = float(claim[key])
        except (TypeError, ValueError):
            claim[key] = None
        if claim[key] is None or not claim[key] > 0:
            fail(f"{path}: claim.{key} must be a positive number")
    if ("config" in doc) == ("config_file" in doc):
        fail(f"{path}: give exactly one of 'config' (inline) and 'config_file'")
    return doc


def cost(binary, path, doc):
    claim = doc["claim"]
    with tempfile.TemporaryDirectory() as tmp:
        if "config_file" in doc:
            config = pathlib.Path(doc["config_file"])
            if not config.is_file():
                fail(f"{path}: config_file {doc['config_file']} does not exist")
        else:
            config = pathlib.Path(tmp) / "config.yaml"
            config.write_text(yaml.safe_dump(doc["config"]))
        cmd = [binary, "cost", "--config", str(config), "--tokens", repr(float(claim["tokens"])),
               "--gpu", claim["gpu"], "--gpu-hours", repr(float(claim["gpu_hours"])), "--json"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"{path}: moetrain cost failed: {run.stderr.strip().splitlines()[-1] if run.stderr else run.returncode}")
        return json.loads(run.stdout)


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
    print("| claim | tokens | GPU-hours | GFLOPs/token | total FLOPs | implied tokens/s/GPU | implied MFU | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for path in paths:
        doc = load_claim(path)
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


if __name__ == "__main__":
    main()
