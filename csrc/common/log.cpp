// Rank-aware printing and small formatting helpers.
#include "common/log.h"

#include <cmath>
#include <cstdio>
#include <iomanip>
#include <sstream>

namespace moetrain {

namespace {
int g_rank = 0;
}

void set_log_rank(int rank) { g_rank = rank; }
int log_rank() { return g_rank; }

void log_line(const std::string& line, bool all_ranks) {
  if (g_rank != 0 && !all_ranks) return;
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

void log_table(const std::string& title, const std::vector<std::pair<std::string, std::string>>& rows) {
  size_t width = 0;
  for (const auto& [k, v] : rows) width = std::max(width, k.size());
  std::ostringstream out;
  out << title << "\n";
  for (const auto& [k, v] : rows) out << "  " << std::left << std::setw(int(width)) << k << "  " << v << "\n";
  std::string s = out.str();
  s.pop_back();
  log_line(s);
}

std::string format_count(double n) {
  const char* units[] = {"", "K", "M", "B", "T"};
  int u = 0;
  while (std::fabs(n) >= 1000.0 && u < 4) {
    n /= 1000.0;
    ++u;
  }
  std::ostringstream out;
  out << std::setprecision(3) << (u == 0 && std::fabs(n) >= 100 ? std::round(n) : n) << units[u];
  return out.str();
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long s = std::lround(seconds);
  char buf[64];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm%02lds", s / 3600, (s / 60) % 60, s % 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

std::string format_double(double v, int precision) {
  std::ostringstream out;
  out << std::setprecision(precision) << v;
  return out.str();
}

}  // namespace moetrain
