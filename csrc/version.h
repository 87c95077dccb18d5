#pragma once
#include <cstdint>

namespace twotower {

// Bumped whenever an op's schema or semantics change, so Python can refuse a stale build.
constexpr int64_t kOpsVersion = 4;

inline int64_t version() { return kOpsVersion; }

}  // namespace twotower
