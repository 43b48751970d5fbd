// SHA-256 against the FIPS 180-4 example vectors, and safetensors: bit-exact round trips for every
// dtype, and refusal of malformed files with a message that names the file.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "ckpt/safetensors.h"
#include "ckpt/sha256.h"
#include "common/errors.h"
#include "../test_util.h"

using Catch::Matchers::Contains;
using moetrain::CheckpointError;
using namespace moetrain::ckpt;
using moetrain::testing::TempDir;
using moetrain::testing::write_bytes;
namespace files = moetrain::files;

namespace {

// A safetensors file from a raw header string and data bytes (no padding: readers must not need it).
void write_raw_safetensors(const std::string& path, const std::string& header, const std::string& data) {
  const uint64_t n = header.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &n, 8);
  write_bytes(path, bytes + header + data);
}

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  torch::Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), size_t(ca.nbytes())) == 0;
}

// Random bit patterns: for float types this includes NaNs with payloads, infinities and subnormals.
torch::Tensor random_bits(torch::ScalarType dtype, std::vector<int64_t> shape) {
  if (dtype == torch::kBool) return torch::randint(0, 2, shape, torch::kUInt8).to(torch::kBool);
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t n_bytes = numel * int64_t(c10::elementSize(dtype));
  return torch::randint(0, 256, {n_bytes}, torch::kUInt8).view(dtype).reshape(shape);
}

}  // namespace

CATCH_TEST_CASE("sha256 matches the FIPS 180-4 test vectors", "[ckpt]") {
  CATCH_REQUIRE(sha256_hex("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CATCH_REQUIRE(sha256_hex("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CATCH_REQUIRE(sha256_hex(two_blocks.data(), two_blocks.size()) ==
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");

  // One million 'a', fed in uneven pieces so partial-block buffering is exercised.
  const std::string million(1000000, 'a');
  const std::string million_digest = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
  CATCH_REQUIRE(sha256_hex(million.data(), million.size()) == million_digest);
  Sha256 streamed;
  size_t fed = 0;
  for (size_t piece = 1; fed < million.size(); piece = piece * 3 % 1000 + 1) {
    const size_t n = std::min(piece, million.size() - fed);
    streamed.update(million.data() + fed, n);
    fed += n;
  }
  CATCH_REQUIRE(streamed.hex_digest() == million_digest);

  TempDir dir("ckpt");
  write_bytes(dir.str("million.txt"), million);
  CATCH_REQUIRE(sha256_file(dir.str("million.txt")) == million_digest);
  CATCH_REQUIRE_THROWS_WITH(sha256_file(dir.str("absent.bin")), Contains("absent.bin") && Contains("[ckpt]"));
}

CATCH_TEST_CASE("safetensors round trip is bit-exact for every dtype", "[ckpt]") {
  TempDir dir("ckpt");
  const std::string path = dir.str("all.safetensors");
  torch::manual_seed(1234);
  const std::vector<torch::ScalarType> dtypes = {torch::kFloat64, torch::kFloat32, torch::kFloat16,
                                                 torch::kBFloat16, torch::kInt64,  torch::kInt32,
                                                 torch::kInt16,   torch::kInt8,    torch::kUInt8,
                                                 torch::kBool};
  TensorMap tensors;
  for (auto dtype : dtypes) tensors.emplace_back(std::string(c10::toString(dtype)), random_bits(dtype, {3, 5, 7}));
  // Values that arithmetic would lose: signed zero and a NaN with a payload.
  uint32_t nan_bits = 0x7fc12345, neg_zero_bits = 0x80000000;
  torch::Tensor specials = torch::empty({2}, torch::kFloat32);
  std::memcpy(specials.data_ptr<float>(), &nan_bits, 4);
  std::memcpy(specials.data_ptr<float>() + 1, &neg_zero_bits, 4);
  tensors.emplace_back("specials", specials);
  tensors.emplace_back("empty", torch::empty({0, 4}, torch::kFloat32));
  tensors.emplace_back("scalar", torch::tensor(2.5, torch::kFloat64).reshape({}));
  tensors.emplace_back("transposed", torch::arange(12, torch::kInt32).reshape({3, 4}).t());
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"step", "42"}};

  save_safetensors(path, tensors, metadata);

  // The data section starts 8-byte aligned.
  uint64_t header_len = 0;
  std::memcpy(&header_len, files::read_file(path).data(), 8);
  CATCH_REQUIRE((8 + header_len) % 8 == 0);

  SafetensorsFile file(path);
  CATCH_REQUIRE(file.metadata() == metadata);
  CATCH_REQUIRE(file.tensors().size() == tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, expected] = tensors[i];
    CATCH_INFO("tensor " << name);
    CATCH_REQUIRE(file.tensors()[i].name == name);  // file order is the order given
    CATCH_REQUIRE(file.contains(name));
    torch::Tensor loaded = file.load(name);
    CATCH_REQUIRE(loaded.device().is_cpu());
    CATCH_REQUIRE(loaded.dim() == expected.dim());
    CATCH_REQUIRE(same_bytes(loaded, expected));
  }
  CATCH_REQUIRE(file.load("scalar").dim() == 0);
  CATCH_REQUIRE(file.load("scalar").item<double>() == 2.5);
  CATCH_REQUIRE(file.load("empty").sizes() == torch::IntArrayRef({0, 4}));
  CATCH_REQUIRE(std::signbit(file.load("specials")[1].item<float>()));
  CATCH_REQUIRE_FALSE(file.contains("missing"));
  CATCH_REQUIRE_THROWS_WITH(file.info("missing"), Contains(path) && Contains("missing"));
}

CATCH_TEST_CASE("safetensors with no tensors and no metadata", "[ckpt]") {
  TempDir dir("ckpt");
  const std::string path = dir.str("empty.safetensors");
  save_safetensors(path, {});
  SafetensorsFile file(path);
  CATCH_REQUIRE(file.tensors().empty());
  CATCH_REQUIRE(file.metadata().empty());
}

CATCH_TEST_CASE("save_safetensors refuses bad input and reports write failures", "[ckpt]") {
  TempDir dir("ckpt");
  const std::string path = dir.str("bad.safetensors");
  torch::Tensor t = torch::zeros({2});
  CATCH_REQUIRE_THROWS_WITH(save_safetensors(path, {{"a", t}, {"a", t}}), Contains(path) && Contains("'a'"));
  CATCH_REQUIRE_THROWS_WITH(save_safetensors(path, {{"c", torch::zeros({2}, torch::kComplexFloat)}}),
                            Contains(path) && Contains("'c'"));
  CATCH_REQUIRE_THROWS_WITH(save_safetensors(path, {{"__metadata__", t}}), Contains("reserved"));
  CATCH_REQUIRE_THROWS_WITH(save_safetensors(dir.str("no/such/dir.safetensors"), {{"a", t}}),
                            Contains("no/such/dir.safetensors"));
  if (files::exists("/dev/full")) {  // every write fails with ENOSPC: a full disk must throw
    CATCH_REQUIRE_THROWS_WITH(save_safetensors("/dev/full", {{"a", torch::zeros({1024})}}),
                              Contains("/dev/full") && Contains("No space"));
    CATCH_REQUIRE(files::exists("/dev/full"));
  }
}

CATCH_TEST_CASE("SafetensorsFile refuses malformed files, naming the file", "[ckpt]") {
  TempDir dir("ckpt");
  const std::string path = dir.str("bad.safetensors");
  const std::string eight_bytes(8, '\0');

  CATCH_SECTION("missing file") {
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path));
  }
  CATCH_SECTION("shorter than the length prefix") {
    write_bytes(path, "abc");
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("truncated"));
  }
  CATCH_SECTION("truncated data section") {
    save_safetensors(path, {{"w", torch::ones({16})}});
    CATCH_REQUIRE(::truncate(path.c_str(), off_t(files::file_size(path).value() - 4)) == 0);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'w'") && Contains("past the end"));
  }
  CATCH_SECTION("header length past end of file") {
    std::string bytes(8, '\0');
    const uint64_t n = 1000;
    std::memcpy(bytes.data(), &n, 8);
    write_bytes(path, bytes + "{}");
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("header length 1000"));
  }
  CATCH_SECTION("garbage JSON") {
    write_raw_safetensors(path, "{\"w\": {\"dtype\": ", "");
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("not valid JSON"));
  }
  CATCH_SECTION("header is not an object") {
    write_raw_safetensors(path, "[1, 2]", "");
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("not a JSON object"));
  }
  CATCH_SECTION("offsets out of bounds") {
    write_raw_safetensors(path, R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'w'") && Contains("past the end"));
  }
  CATCH_SECTION("offsets that end before they begin") {
    write_raw_safetensors(path, R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}})", eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'w'"));
  }
  CATCH_SECTION("shape does not match offsets") {
    write_raw_safetensors(path, R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'w'") && Contains("does not match"));
  }
  CATCH_SECTION("negative shape entry") {
    write_raw_safetensors(path, R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'w'") && Contains("shape"));
  }
  CATCH_SECTION("unknown dtype") {
    write_raw_safetensors(path, R"({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}})", eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'w'") && Contains("'C64'"));
  }
  CATCH_SECTION("missing field") {
    write_raw_safetensors(path, R"({"w": {"dtype": "U8", "shape": [8]}})", eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'data_offsets'"));
  }
  CATCH_SECTION("overlapping tensors") {
    write_raw_safetensors(path,
                          R"({"a": {"dtype": "U8", "shape": [6], "data_offsets": [0, 6]},
                              "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}})",
                          eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'b'") && Contains("overlaps"));
  }
  CATCH_SECTION("bytes not covered by any tensor") {
    write_raw_safetensors(path, R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})", eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("after the last tensor"));
  }
  CATCH_SECTION("duplicate tensor names") {
    write_raw_safetensors(path,
                          R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                              "a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}})",
                          eight_bytes);
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("duplicate"));
  }
  CATCH_SECTION("metadata values must be strings") {
    write_raw_safetensors(path, R"({"__metadata__": {"step": 3}})", "");
    CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'step'"));
  }
  CATCH_SECTION("BOOL bytes other than 0 and 1") {
    write_raw_safetensors(path, R"({"flags": {"dtype": "BOOL", "shape": [8], "data_offsets": [0, 8]}})",
                          std::string("\x01\x00\x02\x00\x00\x00\x00\x00", 8));
    SafetensorsFile file(path);
    CATCH_REQUIRE_THROWS_WITH(file.load("flags"), Contains(path) && Contains("'flags'"));
  }
}

// Inputs from fuzzing the reader (fuzz/fuzz_safetensors.cpp): each is one CheckpointError of bounded length.
CATCH_TEST_CASE("SafetensorsFile: fuzzed headers are clean errors", "[ckpt][fuzz]") {
  TempDir dir("ckpt");
  const std::string path = dir.str("bad.safetensors");
  // A zero-size tensor whose other dimensions overflow int64 strides: LibTorch's "Stride calculation
  // overflowed" (a c10::Error) escaped from load().
  write_raw_safetensors(path, R"({"w": {"dtype": "F32", "shape": [0, 4611686018427387904, 4611686018427387904], )"
                              R"("data_offsets": [0, 0]}})", "");
  CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("'w'") && Contains("too large"));
  // A zero-size tensor of ordinary shape still loads.
  write_raw_safetensors(path, R"({"w": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}})", "");
  CATCH_CHECK(SafetensorsFile(path).load("w").sizes().vec() == std::vector<int64_t>{0, 3});
  // A nested shape: the message names it in a few words instead of echoing the brackets.
  write_raw_safetensors(path, R"({"w": {"dtype": "F32", "shape": [[[[1]]]], "data_offsets": [0, 0]}})", "");
  CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains("shape [[...]] has an entry that is not a non-negative integer"));
  // 60,000 nested '[' (120 KB of header) overflowed the stack under AddressSanitizer: the JSON
  // library copies nested values recursively when it parses with a callback.
  write_raw_safetensors(path, R"({"w": {"dtype": "F32", "shape": )" + std::string(60000, '[') + std::string(60000, ']') +
                              R"(, "data_offsets": [0, 0]}})", "");
  CATCH_REQUIRE_THROWS_WITH(SafetensorsFile(path), Contains(path) && Contains("header nests deeper than 16 levels"));
}

