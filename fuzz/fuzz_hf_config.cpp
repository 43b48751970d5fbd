// Fuzz target: a Hugging Face config.json, read and turned into a validated moetrain config (what
// `model.init_from: hf:DIR` does).
#include "fuzz.h"
#include "hf/hf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  fuzz::write_input("config.json", data, size);
  fuzz::expect_clean([&] {
    config::Config cfg;
    cfg.model.init_from = "hf:" + fuzz::scratch_dir();
    hf::resolve_init_from(cfg);
  });
  return 0;
}
