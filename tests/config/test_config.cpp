// Config loading: defaults, round trip through to_yaml, and the error messages a user sees for typos,
// wrong types, out-of-range values, broken relations, bad files and bad --set overrides.
#include <catch2/catch.hpp>

#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "common/errors.h"
#include "config/config.h"
#include "../test_util.h"

using Catch::Matchers::Contains;
using moetrain::ConfigError;
using namespace moetrain::config;
using moetrain::testing::TempDir;

namespace {

// Writes `text` to the file `name` in `dir` and returns its path.
std::string write_in(const TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.str(name);
  std::ofstream(path) << text;
  return path;
}

Config parse(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return parse_config(yaml, "configs/x.yaml", overrides);
}

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse(yaml, overrides);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

std::string error_of_world(const Config& cfg, int world_size) {
  try {
    for_world_size(cfg, world_size);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

CATCH_TEST_CASE("defaults come from the struct initializers", "[config]") {
  Config cfg = parse("");
  CATCH_CHECK(cfg.run.name == "tiny");
  CATCH_CHECK(cfg.run.seed == 1337u);
  CATCH_CHECK(cfg.run.device == "cpu");
  CATCH_CHECK(cfg.model.d_model == 256);
  CATCH_CHECK(cfg.model.norm_eps == 1e-5);
  CATCH_CHECK(cfg.model.tie_embeddings);
  CATCH_CHECK(cfg.model.moe.n_experts == 8);
  CATCH_CHECK(cfg.model.moe.top_k == 2);
  CATCH_CHECK(cfg.optim.schedule == "cosine");
  CATCH_CHECK(cfg.checkpoint.verify == "full");
  CATCH_CHECK(flatten(cfg) == flatten(Config{}));

  // A missing section or key keeps its default; an empty section too.
  Config partial = parse("model:\n  n_layers: 6\n  moe:\n    top_k: 1\ntrain:\n");
  CATCH_CHECK(partial.model.n_layers == 6);
  CATCH_CHECK(partial.model.moe.top_k == 1);
  CATCH_CHECK(partial.model.d_model == 256);
  CATCH_CHECK(partial.model.moe.n_experts == 8);
  CATCH_CHECK(partial.train.steps == 1000);
  CATCH_CHECK_NOTHROW(validate(Config{}));
}

CATCH_TEST_CASE("every key appears once in flatten and reference, in declaration order", "[config]") {
  auto rows = flatten(Config{});
  auto docs = reference();
  CATCH_REQUIRE(rows.size() == docs.size());
  CATCH_REQUIRE(rows.size() == 139);  // every field of the structs in config.h but the derived router.expert_groups
  CATCH_CHECK(rows.front().first == "run.name");
  CATCH_CHECK(rows.back().first == "rl.routing_replay");
  for (size_t i = 0; i < rows.size(); ++i) {
    CATCH_CHECK(rows[i].first == docs[i].key);
    CATCH_CHECK(rows[i].second == docs[i].default_value);
    CATCH_CHECK_FALSE(docs[i].meaning.empty());
    CATCH_CHECK_FALSE(docs[i].type.empty());
    for (size_t j = 0; j < i; ++j) CATCH_CHECK(rows[i].first != rows[j].first);
  }
  auto find = [&](const std::string& key) {
    for (const auto& d : docs)
      if (d.key == key) return d;
    return KeyDoc{};
  };
  CATCH_CHECK(find("run.seed").type == "uint64");
  CATCH_CHECK(find("run.device").type == "enum (cpu, cuda)");
  CATCH_CHECK(find("optim.beta2").type == "double in [0, 1)");
  CATCH_CHECK(find("model.moe.top_k").default_value == "2");
}

CATCH_TEST_CASE("to_yaml reads back to an equal config", "[config]") {
  Config cfg;
  cfg.run.name = "we:ird \"name\" # not a comment";
  cfg.run.out_dir = "123";  // would read as a number if printed bare
  cfg.run.seed = std::numeric_limits<uint64_t>::max();
  cfg.run.device = "cuda";
  cfg.run.dtype = "bf16";
  cfg.run.threads = 3;
  cfg.run.deterministic = true;
  cfg.model.vocab_size = 50257;
  cfg.model.d_model = 96;
  cfg.model.n_layers = 5;
  cfg.model.n_heads = 6;
  cfg.model.n_kv_heads = 2;
  cfg.model.head_dim = 32;
  cfg.model.max_seq_len = 1024;
  cfg.model.dense_layers = 5;
  cfg.model.dense_hidden = 77;
  cfg.model.rope_theta = 500000.0;
  cfg.model.norm_eps = 1e-300;
  cfg.model.tie_embeddings = false;
  cfg.model.init_std = 0.1 + 0.2;  // 0.30000000000000004: needs all 17 digits
  cfg.model.moe.n_experts = 64;
  cfg.model.moe.top_k = 6;
  cfg.model.moe.expert_hidden = 33;
  cfg.model.moe.n_shared_experts = 0;
  cfg.model.moe.shared_hidden = 5;
  cfg.model.moe.router.normalize_topk = false;
  cfg.model.moe.router.score_func = "sigmoid";
  cfg.model.moe.router.n_groups = 8;
  cfg.model.moe.router.topk_groups = 3;
  cfg.model.moe.router.routed_scaling = 2.5;
  cfg.model.moe.router.bias_update_rate = 1e-3;
  cfg.model.moe.capacity_factor = 1.25;
  cfg.model.moe.experts_impl = "sliced";
  cfg.model.moe.aux_loss_coef = 1.0 / 3.0;
  cfg.data.dir = "~";
  cfg.data.seq_len = 1000;
  cfg.optim.lr = 3e-4;
  cfg.optim.min_lr = 3e-4;
  cfg.optim.warmup_steps = 0;
  cfg.optim.schedule = "constant";
  cfg.optim.weight_decay = 0.0;
  cfg.optim.beta1 = 0.0;
  cfg.optim.beta2 = 0.999999999999;
  cfg.optim.eps = 5e-324;  // smallest subnormal
  cfg.optim.grad_clip = 0.0;
  cfg.train.steps = 1;
  cfg.train.micro_batch_size = 3;
  cfg.train.grad_accum = 7;
  cfg.train.loss_chunk_tokens = 333;
  cfg.train.activation_checkpointing = "full";
  cfg.train.log_every = 1;
  cfg.train.eval_every = 0;
  cfg.train.eval_batches = 2;
  cfg.parallel.backend = "single";
  cfg.parallel.expert_parallel = 16;
  cfg.parallel.zero = 1;
  cfg.parallel.timeout_s = 5;
  cfg.checkpoint.every = 250;
  cfg.checkpoint.keep_last = 2;
  cfg.checkpoint.verify = "size";
  cfg.cost.gpu = "h800";
  cfg.cost.price_per_gpu_hour = 2.49;
  CATCH_REQUIRE_NOTHROW(validate(cfg));

  std::string text = to_yaml(cfg);
  CATCH_INFO(text);
  Config back = parse_config(text, "round-trip");
  CATCH_CHECK(flatten(back) == flatten(cfg));
  CATCH_CHECK(back.run.name == cfg.run.name);
  CATCH_CHECK(back.run.seed == std::numeric_limits<uint64_t>::max());
  CATCH_CHECK(back.model.init_std == cfg.model.init_std);
  CATCH_CHECK(back.model.norm_eps == 1e-300);
  CATCH_CHECK(back.model.moe.aux_loss_coef == 1.0 / 3.0);
  CATCH_CHECK(back.optim.eps == 5e-324);
  CATCH_CHECK(back.optim.beta2 == 0.999999999999);
  CATCH_CHECK(back.data.dir == "~");
  CATCH_CHECK(back.cost.gpu == "h800");
  // A string that would read as a bool if printed bare stays a string.
  Config boolish;
  boolish.run.name = "true";
  CATCH_CHECK(parse_config(to_yaml(boolish), "round-trip").run.name == "true");
  CATCH_CHECK(back.run.out_dir == "123");
  CATCH_CHECK_FALSE(back.model.tie_embeddings);

  // Sections are nested, not dotted.
  CATCH_CHECK_THAT(text, Contains("model:\n  vocab_size: 50257"));
  CATCH_CHECK_THAT(text, Contains("\n  moe:\n    n_experts: 64"));
  // And the default config round-trips too.
  CATCH_CHECK(flatten(parse_config(to_yaml(Config{}), "defaults")) == flatten(Config{}));
}

CATCH_TEST_CASE("unknown keys are errors with a suggestion", "[config]") {
  CATCH_CHECK(error_of("modle:\n  n_layers: 2\n") ==
              "[config] configs/x.yaml: unknown key 'modle' (did you mean 'model'?)");
  CATCH_CHECK_THAT(error_of("model:\n  n_layer: 2\n"),
                   Contains("unknown key 'model.n_layer'") && Contains("did you mean 'model.n_layers'?"));
  // The right name in the wrong section points at where it lives.
  CATCH_CHECK_THAT(error_of("model:\n  top_k: 2\n"), Contains("did you mean 'model.moe.top_k'?"));
  CATCH_CHECK_THAT(error_of("optim:\n  eval_evry: 5\n"), Contains("unknown key 'optim.eval_evry'"));
  // Nothing close: no suggestion, still an error.
  std::string far = error_of("zzzzzzzz: 1\n");
  CATCH_CHECK_THAT(far, Contains("unknown key 'zzzzzzzz'"));
  CATCH_CHECK_THAT(far, !Contains("did you mean"));

  // The same through --set.
  CATCH_CHECK_THAT(error_of("", {"modle.n_layers=2"}),
                   Contains("modle") && Contains("did you mean 'model.n_layers'?"));
  CATCH_CHECK_THAT(error_of("", {"model.moe.topk=2"}), Contains("did you mean 'model.moe.top_k'?"));
  CATCH_CHECK_THAT(error_of("", {"model=3"}), Contains("'model' is a section"));

  TempDir dir("config");
  std::string path = write_in(dir, "typo.yaml", "run:\n  sed: 1\n");
  CATCH_REQUIRE_THROWS_WITH(load_config(path), Contains(path + ": unknown key 'run.sed'") &&
                                                   Contains("did you mean 'run.seed'?"));
}

CATCH_TEST_CASE("wrong types name the file, line and column", "[config]") {
  CATCH_CHECK(error_of("run:\n  seed: 1\nmodel:\n  d_model: 64\n  n_layers: four\n") ==
              "[config] configs/x.yaml:5:13: model.n_layers: expected an integer, got \"four\"");
  CATCH_CHECK_THAT(error_of("model:\n  n_layers: 4.0\n"), Contains("expected an integer, got \"4.0\""));
  CATCH_CHECK_THAT(error_of("model:\n  n_layers: 99999999999\n"), Contains("is larger than the maximum 2147483647"));
  CATCH_CHECK_THAT(error_of("optim:\n  lr: fast\n"), Contains("2:7: optim.lr: expected a number, got \"fast\""));
  CATCH_CHECK_THAT(error_of("model:\n  tie_embeddings: maybe\n"), Contains("expected true or false"));
  CATCH_CHECK_THAT(error_of("run:\n  seed: -1\n"), Contains("run.seed: -1 is smaller than the minimum 0"));
  CATCH_CHECK_THAT(error_of("run:\n  seed: -x\n"), Contains("run.seed: expected an unsigned 64-bit integer"));
  // A mapping where a value belongs, a value where a section belongs, and a null value.
  CATCH_CHECK_THAT(error_of("model:\n  n_layers:\n    a: 1\n"), Contains("model.n_layers: expected an integer, got a mapping"));
  CATCH_CHECK_THAT(error_of("model:\n  n_layers: [1, 2]\n"), Contains("got a sequence"));
  CATCH_CHECK_THAT(error_of("model: 3\n"), Contains("configs/x.yaml:1:8: model: expected a mapping"));
  CATCH_CHECK_THAT(error_of("model:\n  moe: [1]\n"), Contains("model.moe: expected a mapping"));
  CATCH_CHECK_THAT(error_of("run:\n  name:\n"), Contains("run.name: expected a string, got nothing"));
  // The top level must be a mapping of sections.
  CATCH_CHECK_THAT(error_of("- run\n- model\n"), Contains("configs/x.yaml:1:1: the top level must be a mapping"));
  CATCH_CHECK_THAT(error_of("just text\n"), Contains("the top level must be a mapping"));
  CATCH_CHECK_THAT(error_of("model:\n  n_layers: 2\n  n_layers: 3\n"), Contains("3:3: duplicate key 'model.n_layers'"));
  CATCH_CHECK_THAT(error_of("model.n_layers: 3\n"), Contains("contains '.'"));
}

CATCH_TEST_CASE("per-key ranges and enums are checked at load", "[config]") {
  CATCH_CHECK(error_of("model:\n  moe:\n    top_k: 999\n") ==
              "[config] model.moe.top_k = 999 must be in [1, model.moe.n_experts = 8]");
  CATCH_CHECK(error_of("run:\n  device: tpu\n") == "[config] run.device = \"tpu\" must be one of: cpu, cuda");
  CATCH_CHECK_THAT(error_of("run:\n  dtype: fp16\n"), Contains("run.dtype = \"fp16\" must be one of: fp32, bf16"));
  CATCH_CHECK_THAT(error_of("optim:\n  schedule: linear\n"), Contains("optim.schedule") && Contains("cosine, constant"));
  CATCH_CHECK_THAT(error_of("parallel:\n  backend: gloo\n"), Contains("parallel.backend") && Contains("auto, nccl, store, single"));
  CATCH_CHECK_THAT(error_of("checkpoint:\n  verify: none\n"), Contains("checkpoint.verify") && Contains("full, size"));
  CATCH_CHECK_THAT(error_of("model:\n  moe:\n    router:\n      score_func: relu\n"),
                   Contains("model.moe.router.score_func") && Contains("softmax, sigmoid"));

  CATCH_CHECK(error_of("", {"model.moe.top_k=0"}) == "[config] model.moe.top_k = 0 must be >= 1");
  CATCH_CHECK_THAT(error_of("", {"model.vocab_size=1"}), Contains("model.vocab_size = 1 must be >= 2"));
  CATCH_CHECK_THAT(error_of("", {"train.steps=0"}), Contains("train.steps = 0 must be >= 1"));
  CATCH_CHECK_THAT(error_of("", {"train.log_every=0"}), Contains("train.log_every = 0 must be >= 1"));
  CATCH_CHECK_NOTHROW(parse("", {"train.eval_every=0"}));
  CATCH_CHECK_THAT(error_of("", {"train.eval_every=-1"}), Contains("train.eval_every = -1 must be >= 0"));
  CATCH_CHECK_THAT(error_of("", {"optim.warmup_steps=-5"}), Contains("optim.warmup_steps = -5 must be >= 0"));
  CATCH_CHECK_THAT(error_of("", {"optim.lr=0"}), Contains("optim.lr = 0 must be > 0"));
  CATCH_CHECK_THAT(error_of("", {"optim.beta1=1"}), Contains("optim.beta1 = 1 must be in [0, 1)"));
  CATCH_CHECK_THAT(error_of("", {"optim.lr=nan"}), Contains("optim.lr = nan must be a finite number"));
  CATCH_CHECK_THAT(error_of("", {"run.name=\"\""}), Contains("run.name = \"\" must not be empty"));
}

CATCH_TEST_CASE("relations between keys are checked at load", "[config]") {
  CATCH_CHECK(error_of("", {"model.n_kv_heads=3"}) ==
              "[config] model.n_kv_heads = 3 must divide model.n_heads = 8");
  CATCH_CHECK_THAT(error_of("", {"model.d_model=100"}),
                   Contains("model.d_model = 100 must be divisible by model.n_heads = 8"));
  CATCH_CHECK_NOTHROW(parse("", {"model.d_model=100", "model.head_dim=16"}));  // explicit head_dim
  CATCH_CHECK_THAT(error_of("", {"model.head_dim=7"}), Contains("model.head_dim = 7 must be even"));
  CATCH_CHECK_THAT(error_of("", {"model.d_model=24"}), Contains("= 3 must be even"));
  // Partial RoPE (GLM-4.5) and attention biases.
  CATCH_CHECK_NOTHROW(parse("", {"model.rotary_dim=16", "model.attn_bias=qkv"}));
  CATCH_CHECK_NOTHROW(parse("", {"model.rotary_dim=32", "model.attn_bias=all"}));
  CATCH_CHECK(error_of("", {"model.rotary_dim=5"}) ==
              "[config] model.rotary_dim = 5 must be even (RoPE rotates pairs of dimensions)");
  CATCH_CHECK(error_of("", {"model.rotary_dim=34"}) == "[config] model.rotary_dim = 34 must be at most the head dim (32)");
  CATCH_CHECK_THAT(error_of("", {"model.attention=mla", "model.rotary_dim=16"}),
                   Contains("model.rotary_dim = 16 must be 0 with model.attention = mla"));
  CATCH_CHECK_THAT(error_of("", {"model.attention=mla", "model.attn_bias=qkv"}),
                   Contains("model.attn_bias = qkv must be none with model.attention = mla"));
  CATCH_CHECK_THAT(error_of("", {"model.attn_bias=qkvo"}), Contains("model.attn_bias") && Contains("none, qkv, all"));
  CATCH_CHECK(error_of("", {"model.dense_layers=5"}) ==
              "[config] model.dense_layers = 5 must be in [0, model.n_layers = 4]");
  CATCH_CHECK_NOTHROW(parse("", {"model.dense_layers=4"}));
  CATCH_CHECK(error_of("", {"data.seq_len=512"}) ==
              "[config] data.seq_len = 512 must be in [1, model.max_seq_len = 256]");
  CATCH_CHECK(error_of("", {"parallel.expert_parallel=3"}) ==
              "[config] model.moe.n_experts = 8 must be divisible by parallel.expert_parallel = 3");
  CATCH_CHECK(error_of("", {"optim.min_lr=0.01"}) == "[config] optim.min_lr = 0.01 must be <= optim.lr = 0.001");
  CATCH_CHECK_THAT(error_of("", {"parallel.zero=2"}), Contains("parallel.zero") && Contains("[0, 1]"));
  CATCH_CHECK_NOTHROW(parse("", {"optim.name=muon"}));
  CATCH_CHECK_THAT(error_of("", {"optim.name=sgd"}), Contains("optim.name") && Contains("adamw, muon"));
  CATCH_CHECK_THAT(error_of("", {"optim.momentum=1"}), Contains("optim.momentum = 1 must be in [0, 1)"));
  CATCH_CHECK_NOTHROW(parse("", {"optim.name=muon", "parallel.zero=1"}));

  // validate() on a struct built in code gives the same messages.
  Config cfg;
  cfg.model.moe.top_k = 9;
  CATCH_REQUIRE_THROWS_WITH(validate(cfg), Contains("model.moe.top_k = 9"));
}

CATCH_TEST_CASE("for_world_size: a global batch is the same sequences per step at every world size", "[config]") {
  // grad_accum given: the micro-batch is derived.
  auto cfg = parse("", {"train.global_batch_size=16", "train.grad_accum=2"});
  for (int world : {1, 2, 4, 8}) {
    const auto t = for_world_size(cfg, world).train;
    CATCH_CHECK(t.grad_accum == 2);
    CATCH_CHECK(t.micro_batch_size * t.grad_accum * world == 16);
  }
  CATCH_CHECK_THAT(error_of_world(cfg, 3), Contains("train.global_batch_size = 16 is not divisible by world size 3 x "
                                                    "train.grad_accum 2") && Contains("train.grad_accum = 0"));
  // A micro-batch that disagrees with the derived one is named, with the way out.
  auto conflicting = parse("", {"train.global_batch_size=16", "train.grad_accum=2", "train.micro_batch_size=4"});
  CATCH_CHECK_NOTHROW(for_world_size(conflicting, 2));  // 16 / (2 x 2) = 4 agrees
  CATCH_CHECK_THAT(error_of_world(conflicting, 4), Contains("train.micro_batch_size = 4 conflicts"));

  // grad_accum 0 (Megatron's convention): the micro-batch stays, the accumulation is derived.
  cfg = parse("", {"train.global_batch_size=32", "train.grad_accum=0", "train.micro_batch_size=2"});
  for (int world : {1, 2, 4, 8, 16}) {
    const auto t = for_world_size(cfg, world).train;
    CATCH_CHECK(t.micro_batch_size == 2);
    CATCH_CHECK(t.grad_accum == 16 / world);
  }
  CATCH_CHECK_THAT(error_of_world(cfg, 32), Contains("not divisible by world size 32 x train.micro_batch_size 2"));
  CATCH_CHECK_THAT(error_of_world(cfg, 3), Contains("world size 3"));
  // Without a global batch there is nothing to derive from.
  CATCH_CHECK(error_of("", {"train.grad_accum=0"}) ==
              "[config] train.grad_accum = 0 (derived) needs train.global_batch_size > 0 to derive it from");
  // No global batch: the config runs as written.
  cfg = parse("", {"train.micro_batch_size=3", "train.grad_accum=5"});
  CATCH_CHECK(for_world_size(cfg, 7).train.micro_batch_size == 3);
  CATCH_CHECK(for_world_size(cfg, 7).train.grad_accum == 5);
}

CATCH_TEST_CASE("file errors name the path and the position", "[config]") {
  TempDir dir("config");
  std::string missing = dir.str("nope.yaml");
  CATCH_REQUIRE_THROWS_AS(load_config(missing), ConfigError);
  CATCH_REQUIRE_THROWS_WITH(load_config(missing),
                            "[config] cannot read config file '" + missing + "': No such file or directory");
  CATCH_REQUIRE_THROWS_WITH(load_config(dir.path), Contains("'" + dir.path + "': it is a directory"));

  std::string broken = write_in(dir, "broken.yaml", "run:\n  name: a\nmodel: [1, 2\n");
  CATCH_REQUIRE_THROWS_WITH(load_config(broken), Contains(broken + ":4:1: "));
  std::string colon = write_in(dir, "colon.yaml", "run:\n  name: a: b\n");
  CATCH_REQUIRE_THROWS_WITH(load_config(colon), "[config] " + colon + ":2:10: illegal map value");

  std::string typed = write_in(dir, "typed.yaml", "model:\n  moe:\n    top_k: two\n");
  CATCH_REQUIRE_THROWS_WITH(load_config(typed),
                            "[config] " + typed + ":3:12: model.moe.top_k: expected an integer, got \"two\"");

  std::string good = write_in(dir, "good.yaml", "run:\n  seed: 7\nmodel:\n  n_layers: 2\n  dense_layers: 0\n");
  Config cfg = load_config(good, {"run.seed=8"});
  CATCH_CHECK(cfg.run.seed == 8u);  // overrides apply after the file
  CATCH_CHECK(cfg.model.n_layers == 2);
  CATCH_CHECK(cfg.model.dense_layers == 0);
}

CATCH_TEST_CASE("Overrides given with --set are typed by the key", "[config]") {
  Config cfg = parse("model:\n  n_layers: 6\n",
                     {"model.n_layers=3", "model.tie_embeddings=false", "optim.lr=2e-3", "run.name=\"my run\"",
                      "run.seed=18446744073709551615", "model.moe.aux_loss_coef=+0.5", "run.out_dir=42"});
  CATCH_CHECK(cfg.model.n_layers == 3);
  CATCH_CHECK_FALSE(cfg.model.tie_embeddings);
  CATCH_CHECK(cfg.optim.lr == 2e-3);
  CATCH_CHECK(cfg.run.name == "my run");
  CATCH_CHECK(cfg.run.seed == std::numeric_limits<uint64_t>::max());
  CATCH_CHECK(cfg.model.moe.aux_loss_coef == 0.5);
  CATCH_CHECK(cfg.run.out_dir == "42");
  // Later overrides win; validation runs after all of them.
  CATCH_CHECK(parse("", {"model.moe.top_k=9", "model.moe.top_k=3"}).model.moe.top_k == 3);
  CATCH_CHECK(parse("", {"model.moe.top_k=16", "model.moe.n_experts=16"}).model.moe.top_k == 16);

  CATCH_CHECK(error_of("", {"run.seed=abc"}) ==
              "[config] --set run.seed=abc: run.seed: expected an unsigned 64-bit integer, got \"abc\"");
  CATCH_CHECK_THAT(error_of("", {"run.seed=18446744073709551616"}), Contains("run.seed"));
  CATCH_CHECK_THAT(error_of("", {"model.tie_embeddings=yes"}), Contains("expected true or false, got \"yes\""));
  CATCH_CHECK_THAT(error_of("", {"model.n_layers=[1]"}), Contains("model.n_layers: expected an integer, got a sequence"));
  CATCH_CHECK_THAT(error_of("", {"model.moe.top_k=999"}), Contains("model.moe.top_k = 999"));
}

CATCH_TEST_CASE("malformed overrides are errors naming them", "[config]") {
  CATCH_CHECK_THAT(error_of("", {"model.n_layers"}),
                   Contains("malformed override 'model.n_layers'") && Contains("key.path=value"));
  CATCH_CHECK_THAT(error_of("", {"=3"}), Contains("malformed override '=3'"));
  CATCH_CHECK_THAT(error_of("", {"run.name=[unclosed"}), Contains("--set run.name=[unclosed: "));
}

CATCH_TEST_CASE("The README's config reference matches reference()", "[config]") {
  std::ifstream in(std::string(MOETRAIN_SOURCE_DIR) + "/README.md");
  CATCH_REQUIRE(in.good());
  std::stringstream text;
  text << in.rdbuf();
  const std::string readme = text.str(), begin = "<!-- config-reference:begin -->\n",
                    end = "<!-- config-reference:end -->";
  const auto b = readme.find(begin), e = readme.find(end);
  CATCH_REQUIRE(b != std::string::npos);
  CATCH_REQUIRE(e != std::string::npos);
  const std::string block = readme.substr(b + begin.size(), e - b - begin.size());
  std::string md = reference_markdown();
  CATCH_CHECK_THAT(md, Contains("| `model.moe.top_k` | int >= 1 | `2` | "));
  for (const auto& d : reference()) CATCH_CHECK_THAT(md, Contains("| `" + d.key + "` |"));
  CATCH_INFO("regenerate with scripts/update_config_reference.sh if a key changed");
  CATCH_CHECK(block == md);
}

// model.qkv_bias, which model.attn_bias replaced, is in every run folder and checkpoint config written
// before: it still loads (a resume or `generate` from them keeps working), and a non-boolean is refused.
CATCH_TEST_CASE("The replaced model.qkv_bias still loads as model.attn_bias", "[config]") {
  CATCH_CHECK(parse("model:\n  qkv_bias: true\n").model.attn_bias == "qkv");
  CATCH_CHECK(parse("model:\n  qkv_bias: false\n").model.attn_bias == "none");
  CATCH_CHECK_THROWS_WITH(parse("model:\n  qkv_bias: 3\n"),
                          Catch::Matchers::Contains("model.qkv_bias (now model.attn_bias: none | qkv | all) expects true or false"));
}
