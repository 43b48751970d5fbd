// Fuzz target: a safetensors file (header length, JSON header, offsets), then every tensor loaded.
#include "ckpt/safetensors.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  const std::string path = fuzz::write_input("input.safetensors", data, size);
  fuzz::expect_clean([&] {
    ckpt::SafetensorsFile file(path);
    for (const auto& info : file.tensors()) file.load(info.name);
  });
  return 0;
}
