// MuonClip's QK-clip (Kimi K2, 2025): after each optimizer step, every attention head whose largest
// pre-softmax logit of the step's training forwards exceeded optim.qk_clip_tau has its query (and key)
// weights rescaled so that the same inputs would give tau. The attention layers track the logits
// (model::AttentionImpl::track_max_logits); this file takes them, and rescales.
// Rules, with gamma = tau / S_max for a head above tau (1 elsewhere, so other heads keep their bits):
//   MHA (n_kv_heads == n_heads): the head's query and key columns each by sqrt(gamma) (K2's split).
//   GQA (a key head shared by several query heads): the query head's columns (and bias) by the full
//      gamma, its shared key head untouched, so that the other query heads' logits do not move.
//   MLA: the head's q_C (nope) and k_C (its wkv_b key columns) by sqrt(gamma), its q_R (rope query) by
//      gamma; the shared rotary key k_R (wkv_a's last columns) is not rescaled.
// The clip has no state: a resume is exact without it in the checkpoint.
#pragma once
#include <torch/torch.h>

#include "model/layers.h"

namespace moetrain::optim {

// Turns logit tracking on or off in every attention layer of `model` (its blocks and MTP modules).
void track_max_logits(torch::nn::Module& model, bool on);

// Every attention layer's per-head maxima since the last take, concatenated in module order
// (sum over layers of H) fp32 on the model's device, and the trackers reset; -inf for a layer that ran
// no tracked forward. Undefined when the model has no attention layer.
torch::Tensor take_max_logits(torch::nn::Module& model);

// One layer's clip from its (H) maxima (reduced over the replicas): see the rules above.
void qk_clip(model::AttentionImpl& attention, const torch::Tensor& max_logit_H, double tau);
void qk_clip(model::MLAttentionImpl& attention, const torch::Tensor& max_logit_H, double tau);

// Every attention layer of `model` clipped from `max_logits` (as take_max_logits gives them, reduced
// over the replicas with a max). Returns [largest logit, heads clipped] as a (2) fp32 tensor on the
// device: nothing is read on the host.
torch::Tensor qk_clip(torch::nn::Module& model, const torch::Tensor& max_logits, double tau);

}  // namespace moetrain::optim
