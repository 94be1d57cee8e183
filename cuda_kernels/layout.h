// Hash-grid level layout passed by value to the CUDA kernels (at most 32 levels).
#pragma once
#include <stdint.h>

namespace nr {
constexpr int kMaxLevels = 32;
struct LevelLayout {
  int n_levels;
  float scales[kMaxLevels];
  uint32_t resolutions[kMaxLevels];
  uint32_t sizes[kMaxLevels];
  uint32_t offsets[kMaxLevels];
  bool hashed[kMaxLevels];
};
}  // namespace nr
