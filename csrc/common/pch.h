// Precompiled header: LibTorch and the standard headers every moetrain library uses.
#pragma once
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>
