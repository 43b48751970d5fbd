// The serialized TensorBoard Event messages moetrain writes (tb_event.proto). This is the only code
// that sees protobuf's headers: it is compiled apart from LibTorch, whose include folder carries an
// older protobuf of its own, and exists only when the build found Debian's protobuf.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moetrain::train::tb_codec {

// An Event with file_version "brain.Event:2" (a file's first record).
std::string version_event(double wall_time);
// An Event at `step` whose Summary holds one simple_value per (tag, value).
std::string scalars_event(double wall_time, int64_t step, const std::vector<std::pair<std::string, double>>& values);

}  // namespace moetrain::train::tb_codec
