// Fault injection for the tests, at named points of a run (never set outside tests):
//   MOETRAIN_TEST_CRASH_AT=<point>[@<step>][:<rank>]       SIGKILL, as a power cut would;
//   MOETRAIN_TEST_SIGNAL_AT=<point>[@<step>][:<rank>][/INT] SIGTERM (SIGINT with /INT), as a scheduler's
//                                                          preemption would, exactly there.
// Several specs may be given, separated by commas. A point is reached with its step and rank; each spec
// fires once per process.
#pragma once
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <sstream>
#include <string>

namespace moetrain {

inline void fault_point(const char* point, int64_t step, int rank = 0) {
  for (const auto& [variable, signal] : {std::pair{"MOETRAIN_TEST_CRASH_AT", SIGKILL}, std::pair{"MOETRAIN_TEST_SIGNAL_AT", SIGTERM}}) {
    const char* value = std::getenv(variable);
    if (!value) continue;
    std::istringstream specs(value);
    for (std::string spec; std::getline(specs, spec, ',');) {
      int sig = signal;
      if (const auto slash = spec.find('/'); slash != std::string::npos) {
        if (spec.substr(slash + 1) == "INT") sig = SIGINT;
        spec.resize(slash);
      }
      if (const auto colon = spec.find(':'); colon != std::string::npos) {
        if (spec.substr(colon + 1) != std::to_string(rank)) continue;
        spec.resize(colon);
      }
      const auto at = spec.find('@');
      if (spec.substr(0, at) != point) continue;
      if (at != std::string::npos && spec.substr(at + 1) != std::to_string(step)) continue;
      static std::set<std::string> fired;
      if (!fired.insert(spec).second) continue;
      std::raise(sig);
    }
  }
}

}  // namespace moetrain
