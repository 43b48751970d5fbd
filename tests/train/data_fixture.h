// Two data sources for blend and many-shard tests: the pseudo-English corpus of train_fixture.h as
// train.bin/val.bin, and a second text whose train split is cut into four train-*.bin shards.
#pragma once
#include <cstdio>
#include <fstream>
#include <random>

#include "train_fixture.h"

namespace moetrain::testing {

// Splits dir/train.bin into n_shards train-NNNNN.bin files (removing train.bin).
inline void split_train_shard(const std::string& dir, int n_shards) {
  const std::string whole = files::join(dir, "train.bin");
  std::vector<int64_t> tokens;
  uint64_t vocab = 0;
  {
    const data::Shard shard(whole);
    tokens.resize(shard.size());
    shard.read(0, shard.size(), tokens.data());
    vocab = shard.vocab_size();
  }
  const size_t per = (tokens.size() + n_shards - 1) / size_t(n_shards);
  for (int s = 0; s < n_shards; ++s) {
    const size_t begin = std::min(tokens.size(), per * size_t(s)), end = std::min(tokens.size(), begin + per);
    char name[32];
    std::snprintf(name, sizeof name, "train-%05d.bin", s);
    data::write_shard(files::join(dir, name), std::vector<int64_t>(tokens.begin() + begin, tokens.begin() + end), vocab);
  }
  std::remove(whole.c_str());
}

// {folder of the pseudo-English corpus, folder "words" of lists of numbers in words, its train split in
// four shards}.
inline std::vector<std::string> make_blend_sources(const TempDir& dir) {
  const std::string prose = make_corpus(dir);
  const char* words[] = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"};
  std::mt19937 rng(7);
  {
    std::ofstream out(dir.str("words.txt"));
    for (int line = 0; line < 900; ++line) {
      const int n = 3 + int(rng() % 5);
      for (int w = 0; w < n; ++w) out << (w ? ", " : "") << words[rng() % 10];
      out << "\n";
    }
  }
  const std::string numbers = dir.str("words");
  data::prepare_text({dir.str("words.txt")}, numbers, 0.1);
  split_train_shard(numbers, 4);
  return {prose, numbers};
}

}  // namespace moetrain::testing
