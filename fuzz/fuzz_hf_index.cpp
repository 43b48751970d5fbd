// Fuzz target: model.safetensors.index.json, read beside the two real shards it should name (a tiny
// Mixtral exported once per process), then the weights streamed into that tiny model.
#include "fuzz.h"
#include "hf/hf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  static hf::LoadedHf* loaded = [] {
    config::ModelConfig m;
    m.vocab_size = 8;
    m.d_model = 4;
    m.n_layers = 1;
    m.n_heads = 2;
    m.n_kv_heads = 1;
    m.head_dim = 2;
    m.max_seq_len = 8;
    m.moe.n_experts = 2;
    m.moe.top_k = 1;
    m.moe.expert_hidden = 4;
    m.dense_layers = 0;
    m.moe.n_shared_experts = 0;
    m.tie_embeddings = false;
    m.moe.router.normalize_topk = true;
    const std::string dir = fuzz::scratch_dir();
    model::Transformer model(m);
    model->init_weights(3);
    hf::export_model(*model, hf::Family::Mixtral, dir, /*max_shard_bytes=*/200);
    return new hf::LoadedHf(hf::load(dir));  // the exported folder loads as is
  }();
  fuzz::write_input("model.safetensors.index.json", data, size);
  fuzz::expect_clean([&] {
    hf::read_weight_map(fuzz::scratch_dir());
    hf::load_weights(fuzz::scratch_dir(), loaded->hf.family, *loaded->model);
  });
  return 0;
}
