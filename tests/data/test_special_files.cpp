// Every command that reads a path refuses what is not a regular file (a FIFO, a socket, a device, a
// folder) with one line naming the path and what it is, before it reads a byte: a FIFO must never
// block the reader waiting for a writer that will not come.
#include <catch2/catch.hpp>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "ckpt/safetensors.h"
#include "ckpt/sha256.h"
#include "common/errors.h"
#include "data/shard.h"
#include "train/trainer.h"
#include "../train/train_fixture.h"

using namespace moetrain;
using testing::one_line;
using Catch::Matchers::Contains;

namespace {

const std::string kBinary = MOETRAIN_BINARY;

// Replaces `path` (whatever it is) by a FIFO that nobody writes.
void make_fifo(const std::string& path) {
  ::unlink(path.c_str());
  files::remove_tree(path);
  CATCH_REQUIRE(::mkfifo(path.c_str(), 0644) == 0);
}

// Runs a moetrain command that must fail at once with one line naming `path` as `kind`. The hang guard
// stops a hang (the defect) should CTest not.
void refuses(const std::string& args, const std::string& path, const std::string& kind) {
  CATCH_INFO("moetrain " << args);
  const auto r = testing::run_command("{ OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " " + args + " 2>&1 >/dev/null; }");
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK(one_line(r.output));
  CATCH_CHECK_THAT(r.output, Contains(path) && Contains("is " + kind + ", not a regular file"));
}

}  // namespace

CATCH_TEST_CASE("Readers refuse a FIFO, a socket, a device and a folder without reading or blocking", "[data][files]") {
  testing::TempDir dir("special-files");
  const std::string fifo = dir.str("fifo.bin");
  make_fifo(fifo);
  CATCH_CHECK(files::kind(fifo) == "a FIFO");
  CATCH_CHECK(files::kind("/dev/zero") == "a character device");
  CATCH_CHECK(files::kind(dir.path) == "a directory");
  CATCH_CHECK(files::kind(dir.str("absent")) == "missing");
  CATCH_CHECK_THROWS_WITH(files::read_file(fifo), Contains(fifo) && Contains("is a FIFO, not a regular file"));
  CATCH_CHECK_THROWS_WITH(data::Shard(fifo), Contains("[data]") && Contains(fifo) && Contains("is a FIFO"));
  CATCH_CHECK_THROWS_WITH(ckpt::SafetensorsFile(fifo), Contains("[ckpt]") && Contains(fifo) && Contains("is a FIFO"));
  CATCH_CHECK_THROWS_WITH(ckpt::sha256_file(fifo), Contains("[ckpt]") && Contains(fifo) && Contains("is a FIFO"));
  CATCH_CHECK_THROWS_WITH(ckpt::sha256_file("/dev/zero"), Contains("is a character device"));

  // A socket: bound, so that it exists as one on disk.
  const std::string sock = dir.str("sock.bin");
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  CATCH_REQUIRE(sock.size() < sizeof addr.sun_path);
  std::copy(sock.begin(), sock.end(), addr.sun_path);
  CATCH_REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  CATCH_CHECK_THROWS_WITH(data::Shard(sock), Contains(sock) && Contains("is a socket, not a regular file"));
  ::close(fd);

  // A mask and a Megatron index beside a good shard.
  const std::string data_dir = testing::make_corpus(dir);
  make_fifo(files::join(data_dir, "val.mask.bin"));
  CATCH_CHECK_THROWS_WITH(data::Shard(files::join(data_dir, "val.bin")), Contains("val.mask.bin") && Contains("is a FIFO"));
  testing::write_bytes(dir.str("mega.bin"), std::string(64, '\0'));
  make_fifo(dir.str("mega.idx"));
  CATCH_CHECK_THROWS_WITH(data::Shard(dir.str("mega.bin")), Contains("mega.idx") && Contains("is a FIFO"));

  // prepare-data's text: a FIFO, /dev/zero and a folder are named for what they are, not "missing".
  for (const auto& [path, kind] : std::vector<std::pair<std::string, std::string>>{
           {fifo, "a FIFO"}, {"/dev/zero", "a character device"}, {dir.str("data"), "a directory"}})
    CATCH_CHECK_THROWS_WITH(data::prepare_text({path}, dir.str("out"), 0.1),
                            Contains(path) && Contains("is " + kind + ", not a regular file"));
}

CATCH_TEST_CASE("Every command given a FIFO where a file belongs ends at once with one line", "[data][files][cli]") {
  testing::TempDir dir("special-cli");
  const std::string data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  cfg.train.steps = 2;
  train::train(cfg, {});
  const std::string step = dir.str("run/ckpt/step_00000002");
  CATCH_REQUIRE(files::is_directory(step));

  // Data: a train shard, eval --data, inspect-data, prepare-data --text.
  testing::TempDir bad("special-cli-data");
  const std::string fifo_data = bad.str("data");
  files::make_directories(fifo_data);
  make_fifo(files::join(fifo_data, "train.bin"));
  make_fifo(files::join(fifo_data, "val.bin"));
  auto bad_cfg = cfg;
  bad_cfg.data.dir = fifo_data;
  bad_cfg.run.out_dir = bad.str("run");
  testing::write_config(bad_cfg, bad.str("run.yaml"));
  refuses("train --config " + bad.str("run.yaml"), files::join(fifo_data, "train.bin"), "a FIFO");
  refuses("eval --checkpoint " + dir.str("run") + " --data " + files::join(fifo_data, "val.bin"),
          files::join(fifo_data, "val.bin"), "a FIFO");
  refuses("inspect-data " + fifo_data, files::join(fifo_data, "train.bin"), "a FIFO");
  refuses("prepare-data --text " + files::join(fifo_data, "val.bin") + " --out " + bad.str("prepared"),
          files::join(fifo_data, "val.bin"), "a FIFO");
  refuses("prepare-data --text /dev/zero --out " + bad.str("prepared"), "/dev/zero", "a character device");

  // A checkpoint whose weights are a FIFO or a link to /dev/zero: inspect, generate, eval and resume.
  const std::string weights = files::join(step, "model.safetensors");
  make_fifo(weights);
  const auto inspected = testing::run_command("OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " inspect " + dir.str("run"));
  CATCH_CHECK(inspected.exit_code == 1);  // inspect reports on stdout, the damaged file among the rest
  CATCH_CHECK_THAT(inspected.output, Contains(weights) && Contains("is a FIFO, not a regular file"));
  refuses("generate --checkpoint " + dir.str("run") + " --prompt the --max-new-tokens 2", weights, "a FIFO");
  testing::write_config(cfg, dir.str("run.yaml"));
  const auto resumed = testing::run_command("{ OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " train --config " +
                                            dir.str("run.yaml") + " --set train.steps=3 --resume auto 2>&1 >/dev/null; }");
  CATCH_CHECK(resumed.exit_code == 1);
  CATCH_CHECK_THAT(resumed.output, Contains(weights) && Contains("is a FIFO, not a regular file"));
  ::unlink(weights.c_str());
  CATCH_REQUIRE(::symlink("/dev/zero", weights.c_str()) == 0);
  refuses("generate --checkpoint " + dir.str("run") + " --prompt the --max-new-tokens 2", weights, "a character device");

  // A Hugging Face folder whose config.json or weights are a FIFO.
  const std::string hf = dir.str("hf");
  files::make_directories(hf);
  make_fifo(files::join(hf, "config.json"));
  refuses("generate --checkpoint hf:" + hf + " --prompt the --max-new-tokens 2", files::join(hf, "config.json"), "a FIFO");
}
