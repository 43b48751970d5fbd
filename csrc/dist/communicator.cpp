// The single-process backend and the factory.
#include "dist/communicator.h"

#include <cstdlib>

#include "common/errors.h"

namespace moetrain::dist {

namespace {
class SingleCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string backend() const override { return "single"; }
  void all_reduce_sum(torch::Tensor&) override {}
  void broadcast(torch::Tensor&, int) override {}
  void barrier() override {}
};
}  // namespace

std::unique_ptr<Communicator> make_communicator(const config::ParallelConfig& cfg) {
  for (const char* var : {"WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"}) {
    const char* value = std::getenv(var);
    if (value && std::atoi(value) > 1)
      throw DistError(std::string(var) + "=" + value +
                      " asks for a multi-process run, but this build has only the single-process backend");
  }
  if (cfg.backend != "auto" && cfg.backend != "single")
    throw DistError("parallel.backend = \"" + cfg.backend + "\" is not available in this build (available: auto, single)");
  return std::make_unique<SingleCommunicator>();
}

}  // namespace moetrain::dist
