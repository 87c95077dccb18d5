// AVX2 + FMA on x86-64 CPUs, chosen at run time, for the CPU kernels (commit_cpu.cpp,
// paged_attention_cpu.cpp).
//
// Vector code lives in functions carrying `target("avx2,fma")` (TWOTOWER_AVX2) instead of using
// at::vec, because at::vec only enables its AVX2 specialisation when the whole translation unit
// is compiled with -mavx2, and inline functions of the torch headers compiled that way could then
// be picked by the linker for the rest of the extension and fault on CPUs without AVX2.  The
// transcendental functions are the SLEEF routines libtorch_cpu exports (those at::vec uses).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TWOTOWER_X86_AVX2 1
#define TWOTOWER_AVX2 __attribute__((target("avx2,fma")))
extern "C" {
// Exported by libtorch_cpu (SLEEF, statically linked there for at::vec).
__attribute__((target("avx2,fma"))) __m256 Sleef_expf8_u10avx2(__m256);
__attribute__((target("avx2,fma"))) __m256d Sleef_logd4_u10avx2(__m256d);
}

namespace twotower {
// Whether this CPU runs the TWOTOWER_AVX2 functions.
inline bool cpu_has_avx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2;
}
}  // namespace twotower
#endif
