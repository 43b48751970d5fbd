// Many shards per split (data/dataset.h) and blends of sources (data/blend.h): windows never cross
// shards, shards weigh by size, descriptors stay bounded, and a blend draws its sources by weight.
#include <catch2/catch.hpp>

#include <dirent.h>

#include <cmath>
#include <map>

#include "common/errors.h"
#include "data/blend.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "../test_util.h"

using Catch::Matchers::Contains;
using namespace moetrain::data;
using moetrain::testing::TempDir;
namespace files = moetrain::files;
namespace config = moetrain::config;

namespace {

// Shard s holds tokens s * 1000 + i: a token names its shard and position.
void write_numbered(const std::string& path, int s, int64_t n) {
  std::vector<int64_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tokens[size_t(i)] = s * 1000 + i;
  write_shard(path, tokens, 8000);
}

std::string shard_name(const std::string& split, int s) {
  char name[64];
  std::snprintf(name, sizeof name, "%s-%05d.bin", split.c_str(), s);
  return name;
}

int open_descriptors() {
  int n = 0;
  DIR* d = opendir("/proc/self/fd");
  while (d && readdir(d)) ++n;
  if (d) closedir(d);
  return n;
}

SamplerOptions options(int seq_len, int micro_batch, uint64_t seed = 11) {
  SamplerOptions o;
  o.seed = seed;
  o.seq_len = seq_len;
  o.micro_batch_size = micro_batch;
  return o;
}

}  // namespace

CATCH_TEST_CASE("Many shards: windows stay inside one shard and shards are drawn by their size", "[data]") {
  TempDir dir("many-shards");
  const std::vector<int64_t> sizes = {400, 100, 1000, 20, 500};  // shard 3 is shorter than a window
  for (size_t s = 0; s < sizes.size(); ++s) write_numbered(dir.str(shard_name("train", int(s))), int(s), sizes[s]);
  write_mask(dir.str(shard_name("train", 0)), std::vector<uint8_t>(400, 1));  // a sibling mask is not a shard
  const Dataset train = Dataset::open(dir.path, "train");
  CATCH_REQUIRE(train.n_shards() == 5);
  CATCH_CHECK(train.size() == 2020);
  CATCH_CHECK_THAT(train.name(), Contains("train-*.bin (5 shards)"));

  const int seq_len = 31;
  const Blend blend({BlendSource{"one", 1.0, train, std::nullopt}});
  const Sampler sampler(blend, options(seq_len, 8));
  std::map<int, int> per_shard;
  const int steps = 2000;
  for (int step = 0; step < steps; ++step) {
    const Batch batch = sampler.batch(step, 0);
    for (int b = 0; b < 8; ++b) {
      auto w = batch.inputs[b];
      const int64_t first = w[0].item<int64_t>();
      const int s = int(first / 1000);
      per_shard[s]++;
      // seq_len + 1 consecutive tokens of one shard: inputs then the last target.
      CATCH_REQUIRE(batch.targets[b][seq_len - 1].item<int64_t>() == first + seq_len);
      CATCH_REQUIRE(first % 1000 + seq_len < sizes[size_t(s)]);
    }
  }
  CATCH_CHECK(per_shard.count(3) == 0);
  // Starts per shard: size - seq_len; shard s is drawn ~ Binomial(N, p_s). Bound: 5 standard deviations.
  double starts = 0;
  for (size_t s = 0; s < sizes.size(); ++s) starts += double(std::max<int64_t>(0, sizes[s] - seq_len));
  const double n = 8.0 * steps;
  for (size_t s = 0; s < sizes.size(); ++s) {
    const double p = double(std::max<int64_t>(0, sizes[s] - seq_len)) / starts;
    CATCH_INFO("shard " << s << ": " << per_shard[int(s)] << " of " << n << ", expected " << n * p);
    CATCH_CHECK(std::abs(per_shard[int(s)] - n * p) <= 5 * std::sqrt(n * p * (1 - p)) + 1e-9);
  }
  // Eval windows over many shards: fixed, inside one shard each.
  const Batch e1 = eval_batch(train, 1, 3, 4, seq_len), e2 = eval_batch(train, 1, 3, 4, seq_len);
  CATCH_CHECK(torch::equal(e1.inputs, e2.inputs));
  for (int b = 0; b < 4; ++b)
    CATCH_CHECK(e1.targets[b][seq_len - 1].item<int64_t>() == e1.inputs[b][0].item<int64_t>() + seq_len);
}

CATCH_TEST_CASE("A single train.bin reads through the split exactly as the shard itself", "[data]") {
  TempDir dir("single-split");
  std::vector<int64_t> tokens(3000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int64_t((i * 7919) % 256);
  write_shard(dir.str("train.bin"), tokens, 256);
  const Shard shard(dir.str("train.bin"));
  const Dataset split = Dataset::open(dir.path, "train");
  CATCH_CHECK(split.n_shards() == 1);
  CATCH_CHECK(split.name() == dir.str("train.bin"));
  auto opt = options(16, 4);
  opt.grad_accum = 2;
  opt.world_size = 2;
  opt.rank = 1;
  const Sampler by_shard(shard, opt);
  const Sampler by_split(Blend({BlendSource{"x", 1.0, split, std::nullopt}}), opt);
  for (int step = 0; step < 20; ++step)
    for (int micro = 0; micro < 2; ++micro) {
      CATCH_REQUIRE(torch::equal(by_shard.batch(step, micro).inputs, by_split.batch(step, micro).inputs));
      CATCH_REQUIRE(torch::equal(by_shard.batch(step, micro).targets, by_split.batch(step, micro).targets));
    }
}

CATCH_TEST_CASE("Thousands of shards: a header pass at start, a bounded number of open files", "[data]") {
  TempDir dir("thousand-shards");
  const int n_shards = 1500;
  for (int s = 0; s < n_shards; ++s) write_numbered(dir.str(shard_name("train", s)), s % 8, 40);
  const int before = open_descriptors();
  DatasetOptions opt;
  opt.max_open_shards = 16;
  const Dataset train = Dataset::open(dir.path, "train", opt);
  CATCH_CHECK(open_descriptors() == before);  // the start-up pass closes what it opens
  const Sampler sampler(Blend({BlendSource{"x", 1.0, train, std::nullopt}}), options(15, 16));
  for (int step = 0; step < 300; ++step) sampler.batch(step, 0);
  CATCH_CHECK(open_descriptors() <= before + 16);
}

CATCH_TEST_CASE("A split in both forms, or in none, is one line naming the folder", "[data]") {
  TempDir dir("split-forms");
  write_numbered(dir.str("train.bin"), 0, 100);
  write_numbered(dir.str("train-00000.bin"), 1, 100);
  CATCH_CHECK_THROWS_WITH(Dataset::open(dir.path, "train"),
                          Contains(dir.path) && Contains("both train.bin and 1 train-*.bin"));
  CATCH_CHECK_THROWS_WITH(Dataset::open(dir.path, "val"), Contains(dir.str("val.bin")) && Contains("val-*.bin"));
  // A shard damaged after the start-up pass read its header: named when it is opened.
  TempDir many("split-changed");
  for (int s = 0; s < 3; ++s) write_numbered(many.str(shard_name("train", s)), s, 100);
  DatasetOptions opt;
  opt.max_open_shards = 1;
  const Dataset train = Dataset::open(many.path, "train", opt);
  write_numbered(many.str(shard_name("train", 2)), 2, 90);
  train.shard(0);
  CATCH_CHECK_THROWS_WITH(train.shard(2), Contains(many.str(shard_name("train", 2))) && Contains("rewritten"));
}

CATCH_TEST_CASE("A blend draws each source with its weight, batches read the chosen source", "[data]") {
  TempDir dir("blend");
  const std::vector<double> weights = {5, 3, 2};
  std::vector<BlendSource> sources;
  for (int s = 0; s < 3; ++s) {
    const std::string folder = dir.str("src" + std::to_string(s));
    files::make_directories(folder);
    write_numbered(files::join(folder, "train.bin"), s, 300 + 100 * s);
    sources.push_back({"src" + std::to_string(s), weights[size_t(s)], Dataset::open(folder, "train"), std::nullopt});
  }
  const Blend blend(sources);
  // Over N ids, source s is drawn ~ Binomial(N, w_s / 10): each count within 5 standard deviations
  // (a false failure has probability < 1e-6 per source).
  const uint64_t n = 200000;
  const auto counts = blend.count_sources(7, 0, n);
  for (size_t s = 0; s < 3; ++s) {
    const double p = weights[s] / 10.0;
    CATCH_INFO("source " << s << ": " << counts[s] << " of " << n);
    CATCH_CHECK(std::abs(double(counts[s]) - double(n) * p) <= 5 * std::sqrt(double(n) * p * (1 - p)));
  }
  // Each sequence of a batch comes from the source choose() names; any rank computes the same choice.
  const Sampler sampler(blend, options(20, 6, 7));
  for (int step = 0; step < 50; ++step) {
    const Batch batch = sampler.batch(step, 0);
    for (int b = 0; b < 6; ++b) {
      const uint64_t id = sampler.global_sequence(step, 0, b);
      CATCH_REQUIRE(batch.inputs[b][0].item<int64_t>() / 1000 == int64_t(blend.choose(7, id)));
    }
  }
  CATCH_CHECK_THROWS_WITH(Blend({BlendSource{"zero", 0.0, sources[0].train, std::nullopt}}),
                          Contains("zero") && Contains("must be a finite number > 0"));
}

CATCH_TEST_CASE("data.sources: parsed, round-tripped, and each bad source is one line naming it", "[data][config]") {
  TempDir dir("blend-config");
  const std::string web = dir.str("web"), code = dir.str("code"), empty = dir.str("empty"), no_val = dir.str("noval");
  for (const auto& f : {web, code, empty, no_val}) files::make_directories(f);
  write_numbered(files::join(web, "train.bin"), 0, 200);
  write_numbered(files::join(web, "val.bin"), 1, 200);
  for (int s = 0; s < 2; ++s) write_numbered(files::join(code, shard_name("train", s)), 2 + s, 150);
  write_numbered(files::join(no_val, "train.bin"), 5, 200);
  write_shard(files::join(empty, "train.bin"), {}, 8000);

  const std::string yaml = "model: {vocab_size: 8000}\ndata:\n  seq_len: 16\n  sources:\n    - {dir: " + web +
                           ", weight: 0.7}\n    - {dir: " + code + ", weight: 0.3, name: python}\n";
  const config::Config cfg = config::parse_config(yaml, "blend.yaml");
  CATCH_REQUIRE(cfg.data.sources.size() == 2);
  CATCH_CHECK(cfg.data.sources[1].name == "python");
  CATCH_CHECK(cfg.data.sources[0].weight == 0.7);
  const config::Config again = config::parse_config(config::to_yaml(cfg), "round-trip");
  CATCH_CHECK(config::to_yaml(again) == config::to_yaml(cfg));
  const config::Config overridden =
      config::parse_config(yaml, "blend.yaml", {"data.sources=[{dir: " + web + ", weight: 2, name: w}]"});
  CATCH_CHECK(overridden.data.sources.size() == 1);
  CATCH_CHECK(overridden.data.sources[0].name == "w");
  CATCH_CHECK(config::parse_config("data: {seq_len: 8}", "x").data.sources.empty());

  const Blend blend = open_blend(cfg.data, 8000);
  CATCH_REQUIRE(blend.size() == 2);
  CATCH_CHECK(blend.source(0).name == "web");
  CATCH_CHECK(blend.source(1).train.n_shards() == 2);
  CATCH_CHECK(blend.source(0).val.has_value());
  CATCH_CHECK(!blend.source(1).val.has_value());

  auto with = [&](const std::string& entries) {
    return config::parse_config("model: {vocab_size: 8000}\ndata:\n  seq_len: 16\n  sources: " + entries, "bad.yaml");
  };
  CATCH_CHECK_THROWS_WITH(with("[{dir: " + web + ", weight: 0}]"),
                          Contains("data.sources[0].weight = 0 must be > 0") && Contains(web));
  CATCH_CHECK_THROWS_WITH(with("[{dir: " + web + ", wieght: 1}]"), Contains("data.sources[0].wieght: unknown field"));
  CATCH_CHECK_THROWS_WITH(with("[{weight: 1}]"), Contains("data.sources[0]: needs a dir"));
  CATCH_CHECK_THROWS_WITH(with("{dir: " + web + "}"), Contains("data.sources") && Contains("a list"));
  auto blend_of = [&](const std::string& entries) { return open_blend(with(entries).data, 8000); };
  CATCH_CHECK_THROWS_WITH(blend_of("[{dir: " + web + "}, {dir: " + dir.str("absent") + "}]"),
                          Contains("data.sources[1] ('absent')") && Contains("does not exist"));
  CATCH_CHECK_THROWS_WITH(blend_of("[{dir: " + web + "}, {dir: " + empty + "}]"),
                          Contains("data.sources[1] ('empty')") && Contains("no tokens"));
  CATCH_CHECK_THROWS_WITH(blend_of("[{dir: " + no_val + "}]"), Contains("val split"));
  CATCH_CHECK_THROWS_WITH(blend_of("[{dir: " + web + "}, {dir: " + web + "}]"), Contains("'web' is taken"));
  CATCH_CHECK_THROWS_WITH(open_blend(with("[{dir: " + web + "}]").data, 100), Contains("data.sources[0] ('web')") &&
                                                                               Contains("model.vocab_size = 100"));
  CATCH_CHECK_THROWS_WITH(open_blend(with("[{dir: " + web + "}, {dir: " + code + "}]").data, 8000 - 1),
                          Contains("data.sources[0] ('web')") && Contains("model.vocab_size = 7999"));
  CATCH_CHECK_THROWS_WITH(Dataset::open(code, "train", {64, 7999}),
                          Contains(files::join(code, shard_name("train", 0))) && Contains("model.vocab_size = 7999"));
}
