// A JSON value as it may appear in an error message: a scalar or a short flat list as written,
// anything bigger by its kind, so that a hostile file cannot turn one error line into megabytes.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace moetrain {

inline std::string brief_json(const nlohmann::ordered_json& v) {
  using Json = nlohmann::ordered_json;
  if (v.is_structured()) {
    for (const auto& e : v)
      if (e.is_structured()) return v.is_array() ? "[[...]]" : "{...}";
    if (v.is_object() && v.size() > 16) return "{...}";
  }
  std::string text;
  if (v.is_array() && v.size() > 16) {
    Json head = Json::array();
    for (size_t i = 0; i < 16; ++i) head.push_back(v[i]);
    text = head.dump(-1, ' ', false, Json::error_handler_t::replace);
    text.insert(text.size() - 1, ",...");
  } else {
    text = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  }
  if (text.size() > 200) text = text.substr(0, 200) + "...";
  return text;
}

}  // namespace moetrain
