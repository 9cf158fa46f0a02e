// The library's two storage types, float32 and bfloat16 (bf16_t: its bits), and the conversions every
// kernel uses: widen to float32 exactly, narrow with round to nearest even, as torch does.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

typedef uint16_t bf16_t;

inline float widen(float x) { return x; }
inline float widen(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> T narrow(float x);
template <> inline float narrow<float>(float x) { return x; }
template <> inline bf16_t narrow<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16_t>(u >> 16);
}
// a value as PyTorch holds it in the model dtype (float32: unchanged)
template <typename T> inline float rounded(float x) { return widen(narrow<T>(x)); }
// element i of a tensor of T, as float32 / stored as T
template <typename T> inline float load(const T* p, int64_t i) { return widen(p[i]); }
template <typename T> inline void store(T* p, int64_t i, float x) { p[i] = narrow<T>(x); }

}  // namespace
