// Rank-aware printing: only rank 0 prints unless asked otherwise; a table printer for the resolved
// config and run summaries; small string helpers shared by the libraries.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moetrain {

void set_log_rank(int rank);
int log_rank();
// Prints one line to stdout on rank 0 (all ranks when all_ranks is set), flushed at once.
void log_line(const std::string& line, bool all_ranks = false);
// Prints rows of (key, value) as an aligned two-column table under a title.
void log_table(const std::string& title, const std::vector<std::pair<std::string, std::string>>& rows);

std::string format_count(double n);            // 1234567 -> "1.23M"
std::string format_duration(double seconds);   // 3725 -> "1h02m05s"
std::string format_double(double v, int precision = 6);  // shortest round-trippable-ish text

}  // namespace moetrain
