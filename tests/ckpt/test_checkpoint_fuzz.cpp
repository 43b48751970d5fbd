// Manifests from fuzzing ckpt::read_manifest (fuzz/fuzz_manifest.cpp and its review): a number where an
// integer belongs was converted by json's get<int>() with undefined behaviour (UBSan: "1e+100 is
// outside the range of representable values of type 'int'"); now each is one CheckpointError.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "common/errors.h"
#include "common/files.h"
#include "../test_util.h"

using Catch::Matchers::Contains;
using namespace moetrain;

CATCH_TEST_CASE("ckpt: a manifest's integer fields must be JSON integers in range", "[ckpt][fuzz]") {
  testing::TempDir dir("manifest-fuzz");
  const std::string step_dir = dir.str("step_00000003");
  files::make_directories(step_dir);
  const nlohmann::json valid = {{"format", "moetrain-checkpoint"}, {"format_version", 2}, {"step", 3}, {"tokens", 96},
                                {"elapsed_s", 1.5}, {"layout", {{"world_size", 1}, {"expert_parallel", 1}}},
                                {"config", ""}, {"files", nlohmann::json::array({{{"name", "model.safetensors"},
                                                                                  {"size", 16}, {"sha256", std::string(64, 'a')}}})}};
  const std::string path = files::join(step_dir, "manifest.json");
  testing::write_bytes(path, valid.dump());
  CATCH_REQUIRE(ckpt::read_manifest(step_dir).progress.step == 3);

  auto error_with = [&](const nlohmann::json::json_pointer& field, const nlohmann::json& value) {
    auto manifest = valid;
    manifest[field] = value;
    testing::write_bytes(path, manifest.dump());
    try {
      ckpt::read_manifest(step_dir);
    } catch (const CheckpointError& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  CATCH_CHECK_THAT(error_with("/format_version"_json_pointer, 1e100),
                   Contains(path) && Contains("field 'format_version' = 1e+100 is not an integer"));
  CATCH_CHECK_THAT(error_with("/step"_json_pointer, 1e300), Contains("field 'step' = 1e+300 is not an integer"));
  CATCH_CHECK_THAT(error_with("/layout/world_size"_json_pointer, -1e30),
                   Contains("field 'layout.world_size' = -1e+30 is not an integer"));
  CATCH_CHECK_THAT(error_with("/layout/expert_parallel"_json_pointer, 4294967296ll),
                   Contains("field 'layout.expert_parallel' = 4294967296 is not an integer in [1, 1]"));
  CATCH_CHECK_THAT(error_with("/files/0/size"_json_pointer, -16), Contains("field 'files[0].size' = -16 is not an integer"));
}
