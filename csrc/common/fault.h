// Fault injection for the tests, at named points of a run (never set outside tests):
//   MOETRAIN_TEST_CRASH_AT=<point>[@<step>][:<rank>]        SIGKILL, as a power cut would;
//   MOETRAIN_TEST_SIGNAL_AT=<point>[@<step>][:<rank>][/INT]  SIGTERM (SIGINT with /INT), as a scheduler's
//                                                           preemption would, exactly there;
//   MOETRAIN_TEST_STALL_AT=<point>[@<step>][:<rank>]=<s>    a pause of s seconds, as a slow disk would.
// Several specs may be given, separated by commas. A point is reached with its step and rank; each spec
// fires once per process.
#pragma once
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <sstream>
#include <string>
#include <thread>

namespace moetrain {

inline void fault_point(const char* point, int64_t step, int rank = 0) {
  enum Fault { kCrash, kSignal, kStall };
  static std::set<std::string> fired;
  for (const auto& [variable, fault] : {std::pair{"MOETRAIN_TEST_CRASH_AT", kCrash}, std::pair{"MOETRAIN_TEST_SIGNAL_AT", kSignal},
                                        std::pair{"MOETRAIN_TEST_STALL_AT", kStall}}) {
    const char* value = std::getenv(variable);
    if (!value) continue;
    std::istringstream specs(value);
    for (std::string spec; std::getline(specs, spec, ',');) {
      const std::string whole = std::string(variable) + "=" + spec;
      std::string option;  // after '/' (a signal) or '=' (seconds)
      if (const auto cut = spec.find_first_of("/="); cut != std::string::npos) {
        option = spec.substr(cut + 1);
        spec.resize(cut);
      }
      if (const auto colon = spec.find(':'); colon != std::string::npos) {
        if (spec.substr(colon + 1) != std::to_string(rank)) continue;
        spec.resize(colon);
      }
      const auto at = spec.find('@');
      if (spec.substr(0, at) != point) continue;
      if (at != std::string::npos && spec.substr(at + 1) != std::to_string(step)) continue;
      if (!fired.insert(whole).second) continue;
      if (fault == kCrash) std::raise(SIGKILL);
      if (fault == kSignal) std::raise(option == "INT" ? SIGINT : SIGTERM);
      if (fault == kStall) std::this_thread::sleep_for(std::chrono::duration<double>(std::atof(option.c_str())));
    }
  }
}

}  // namespace moetrain
