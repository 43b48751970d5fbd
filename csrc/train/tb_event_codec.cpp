// Event messages through the protobuf classes generated from tb_event.proto (see tb_event_codec.h).
#include "train/tb_event_codec.h"

#include "tb_event.pb.h"

namespace moetrain::train::tb_codec {

std::string version_event(double wall_time) {
  tb::Event event;
  event.set_wall_time(wall_time);
  event.set_file_version("brain.Event:2");
  return event.SerializeAsString();
}

std::string scalars_event(double wall_time, int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  tb::Event event;
  event.set_wall_time(wall_time);
  event.set_step(step);
  auto* summary = event.mutable_summary();
  for (const auto& [tag, value] : values) {
    auto* v = summary->add_value();
    v->set_tag(tag);
    v->set_simple_value(float(value));
  }
  return event.SerializeAsString();
}

}  // namespace moetrain::train::tb_codec
