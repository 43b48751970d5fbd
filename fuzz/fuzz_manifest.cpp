// Fuzz target: a checkpoint's manifest.json, read and then checked against the files beside it
// (one real 16-byte file, "model.safetensors", whose size and sha256 the seed manifests list).
#include "ckpt/checkpoint.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  static const std::string step_dir = [] {
    const std::string dir = files::join(fuzz::scratch_dir(), "step_00000003");
    files::make_directories(dir);
    files::write_file_synced(files::join(dir, "model.safetensors"), "0123456789abcdef");
    return dir;
  }();
  fuzz::write_input("step_00000003/manifest.json", data, size);
  fuzz::expect_clean([&] {
    const ckpt::Manifest m = ckpt::read_manifest(step_dir);
    ckpt::verify_files(step_dir, m, "full");
  });
  return 0;
}
