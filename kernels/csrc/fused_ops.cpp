// A decoder layer's elementwise steps on CPU, each one pass over memory instead of PyTorch's 3-7:
// RMSNorm with the residual add before it, SiLU(gate) * up, RoPE, and storing a step's keys and values
// into the paged cache; and greedy sampling's choice of token from the logits.
//
// Meaning: engine/models/decoder.py's RMSNorm (float32 statistics, the normalised value rounded to the
// model dtype before the weight multiplies it, as transformers does), MLP activation and
// engine/models/rope.py's apply_rope; every intermediate PyTorch rounds to the model dtype is
// rounded here too; store_kv is kernels/paged_attention.py's store_kv_reference; greedy_tokens is
// engine/sampler.py's greedy choice (torch.max over the vocabulary, a NaN row marked). Built at first use by kernels/cpu_decode.py (one library with the attention
// kernels); kernels/cpu_fused.py holds the launchers; tests compare them with the PyTorch ops.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "threads.h"

namespace {

// out = weight * dtype(r * rsqrt(mean(r^2) + eps)) with r = x (+ residual, then stored in new_residual)
template <typename T>
void rms_norm(const T* x, const T* residual, T* new_residual, const T* weight, T* out, int64_t rows, int64_t dim,
              float eps) {
#pragma omp parallel for schedule(static) if (rows * dim > 32768) num_threads(library_threads())
  for (int64_t i = 0; i < rows; ++i) {
    const T* xr = x + i * dim;
    T* outr = out + i * dim;
    float squares = 0.f;
    if (residual != nullptr) {
      const T* rr = residual + i * dim;
      T* nr = new_residual + i * dim;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < dim; ++d) {
        const float r = rounded<T>(widen(xr[d]) + widen(rr[d]));
        nr[d] = narrow<T>(r);
        squares += r * r;
      }
      xr = nr;
    } else {
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < dim; ++d) squares += widen(xr[d]) * widen(xr[d]);
    }
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) outr[d] = narrow<T>(widen(weight[d]) * rounded<T>(widen(xr[d]) * inv));
  }
}

// out[i] = dtype(silu(gate[i])) * up[i], gate and up the two halves of each row of gate_up
template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter > 32768) num_threads(library_threads())
  for (int64_t i = 0; i < rows; ++i) {
    const T* g = gate_up + i * 2 * inter;
    const T* u = g + inter;
    T* o = out + i * inter;
#pragma omp simd
    for (int64_t d = 0; d < inter; ++d) {
      const float x = widen(g[d]);
      o[d] = narrow<T>(rounded<T>(x / (1.f + std::exp(-x))) * widen(u[d]));
    }
  }
}

// out [rows, heads, dim] = x * cos + rotate_half(x) * sin over the first `rot` dims of each head (the rest
// copied: partial rotary), x [rows, heads, dim] with row stride x_row_stride, cos / sin from table
// [positions, rot_table, 2, rot] float32 at each row's position, rounded to the model dtype as the caller's
// cos / sin are; each product and the sum rounded as PyTorch rounds them (engine/models/rope.py's apply_rope)
template <typename T>
void rope(const T* x, int64_t x_row_stride, const int64_t* positions, const float* table, T* out, int64_t rows,
          int64_t heads, int64_t dim, int64_t rot) {
  const int64_t half = rot / 2;
#pragma omp parallel for schedule(static) if (rows * heads * dim > 32768) num_threads(library_threads())
  for (int64_t i = 0; i < rows; ++i) {
    const float* cos = table + positions[i] * 2 * rot;
    const float* sin = cos + rot;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + i * x_row_stride + h * dim;
      T* oh = out + (i * heads + h) * dim;
#pragma omp simd
      for (int64_t d = 0; d < half; ++d)
        oh[d] = narrow<T>(rounded<T>(widen(xh[d]) * rounded<T>(cos[d])) +
                          rounded<T>(-widen(xh[d + half]) * rounded<T>(sin[d])));
#pragma omp simd
      for (int64_t d = half; d < rot; ++d)
        oh[d] = narrow<T>(rounded<T>(widen(xh[d]) * rounded<T>(cos[d])) +
                          rounded<T>(widen(xh[d - half]) * rounded<T>(sin[d])));
      for (int64_t d = rot; d < dim; ++d) oh[d] = xh[d];
    }
  }
}

// k_cache / v_cache token `slots[i]` (width elements each: its KV heads) = row i of key / value (rows
// key_stride / value_stride elements apart); negative slots are skipped. Returns how many slots were out
// of range (>= num_slots: not written), for the caller's check.
template <typename T>
int64_t store_kv(const T* key, int64_t key_stride, const T* value, int64_t value_stride, const int64_t* slots,
                 T* k_cache, T* v_cache, int64_t rows, int64_t width, int64_t num_slots) {
  int64_t out_of_range = 0;
#pragma omp parallel for schedule(static) reduction(+ : out_of_range) if (rows * width > 32768) \
    num_threads(library_threads())
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;
    if (slot >= num_slots) {
      ++out_of_range;
      continue;
    }
    std::memcpy(k_cache + slot * width, key + i * key_stride, sizeof(T) * width);
    std::memcpy(v_cache + slot * width, value + i * value_stride, sizeof(T) * width);
  }
  return out_of_range;
}

// Each row's first index of its largest value (torch.max(dim=-1).indices), or -1 for a row holding a
// NaN (whose torch.max is NaN). NaN is found by its bits: this file is built with -ffast-math, under
// which the compiler may assume x == x. Lanes keep their own best value and index (a later equal value
// does not replace it), then the lanes' best is the largest value at the smallest index.
void greedy_tokens(const float* logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t* out) {
  constexpr int W = 16;
  typedef float Vals __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t Idx __attribute__((vector_size(W * sizeof(int32_t))));
#pragma omp parallel for schedule(static) if (rows * vocab > 65536) num_threads(library_threads())
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = logits + i * row_stride;
    int64_t d = 0, best_at = 0;
    float best = x[0];
    bool nan = false;
    if (vocab >= W) {
      Idx at = Idx{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      Vals top;
      Idx top_at = at, bad = Idx{};
      std::memcpy(&top, x, sizeof top);
      for (d = 0; d + W <= vocab; d += W, at += W) {
        Vals v;
        Idx bits;
        std::memcpy(&v, x + d, sizeof v);
        std::memcpy(&bits, x + d, sizeof bits);
        bad |= (bits & 0x7fffffff) > 0x7f800000;
        const Idx up = v > top;
        top = up ? v : top;
        top_at = up ? at : top_at;
      }
      for (int l = 0; l < W; ++l) nan |= bad[l] != 0;
      best = top[0];
      best_at = top_at[0];
      for (int l = 1; l < W; ++l)
        if (top[l] > best || (top[l] == best && top_at[l] < best_at)) {
          best = top[l];
          best_at = top_at[l];
        }
    }
    for (; d < vocab; ++d) {
      uint32_t bits;
      std::memcpy(&bits, x + d, sizeof bits);
      nan |= (bits & 0x7fffffffu) > 0x7f800000u;
      if (x[d] > best) {
        best = x[d];
        best_at = d;
      }
    }
    out[i] = nan ? -1 : best_at;
  }
}

}  // namespace

extern "C" {
void greedy_tokens_f32(const float* logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t* out) {
  greedy_tokens(logits, rows, vocab, row_stride, out);
}
void set_num_threads(int n) { requested_threads().store(n, std::memory_order_relaxed); }
int parallel_threads() {  // the team size the library's parallel loops get now
  int n = 0;
#pragma omp parallel num_threads(library_threads())
  {
#pragma omp single
    n = omp_get_num_threads();
  }
  return n;
}
void rms_norm_f32(const float* x, const float* residual, float* new_residual, const float* weight, float* out,
                  int64_t rows, int64_t dim, float eps) {
  rms_norm<float>(x, residual, new_residual, weight, out, rows, dim, eps);
}
void rms_norm_bf16(const bf16_t* x, const bf16_t* residual, bf16_t* new_residual, const bf16_t* weight, bf16_t* out,
                   int64_t rows, int64_t dim, float eps) {
  rms_norm<bf16_t>(x, residual, new_residual, weight, out, rows, dim, eps);
}
void silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inter) {
  silu_mul<float>(gate_up, out, rows, inter);
}
void silu_mul_bf16(const bf16_t* gate_up, bf16_t* out, int64_t rows, int64_t inter) {
  silu_mul<bf16_t>(gate_up, out, rows, inter);
}
void rope_f32(const float* x, int64_t x_row_stride, const int64_t* positions, const float* table, float* out,
              int64_t rows, int64_t heads, int64_t dim, int64_t rot) {
  rope<float>(x, x_row_stride, positions, table, out, rows, heads, dim, rot);
}
void rope_bf16(const bf16_t* x, int64_t x_row_stride, const int64_t* positions, const float* table, bf16_t* out,
               int64_t rows, int64_t heads, int64_t dim, int64_t rot) {
  rope<bf16_t>(x, x_row_stride, positions, table, out, rows, heads, dim, rot);
}
int64_t store_kv_f32(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
                     const int64_t* slots, float* k_cache, float* v_cache, int64_t rows, int64_t width,
                     int64_t num_slots) {
  return store_kv<float>(key, key_stride, value, value_stride, slots, k_cache, v_cache, rows, width, num_slots);
}
int64_t store_kv_bf16(const bf16_t* key, int64_t key_stride, const bf16_t* value, int64_t value_stride,
                      const int64_t* slots, bf16_t* k_cache, bf16_t* v_cache, int64_t rows, int64_t width,
                      int64_t num_slots) {
  return store_kv<bf16_t>(key, key_stride, value, value_stride, slots, k_cache, v_cache, rows, width, num_slots);
}
}
