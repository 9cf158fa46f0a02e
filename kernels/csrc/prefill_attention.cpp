// Prefill attention over the paged KV cache on CPU: each span's query tokens attend causally (and
// within a sliding window) to its keys, read in place from the cache.
//
// Meaning: kernels/paged_attention.py's paged_attention_reference for its prefill spans (a sequence's
// chunk of q_len query tokens, the last q_len positions of its ctx_len keys). Built at first use by
// kernels/cpu_decode.py (one library with decode_attention.cpp); kernels/cpu_prefill.py holds the
// launcher; tests compare the two.
//
// Work: one task per (span, KV head, tile of up to TILE_TOKENS query tokens); a tile's rows are its
// tokens x the KV head's query heads, so each key is read once for all of them (attention_tiles.h holds
// the blocked loop over keys). Float32 state whatever the cache's type.
#include "attention_tiles.h"
#include "threads.h"

namespace {

constexpr int TILE_TOKENS = 32;  // query tokens per task

struct Span {
  int64_t q_start, q_len, ctx_len, key_start;  // key_start: position of table column 0's first key
  const int32_t* table;
};

struct Task {
  int64_t span, kv_head, first_token, last_token, keys;  // keys: how many it reads (for ordering)
};

template <typename T>
void run_task(const Task& task, const Span& sp, const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache,
              T* out, int64_t out_row_stride, const Shape& s) {
  thread_local Tile tl;
  const int D = s.head_dim, per_kv = s.heads / s.kv_heads;
  const int tokens = static_cast<int>(task.last_token - task.first_token);
  const int rows = tokens * per_kv;  // row = token * per_kv + (query head - first query head of the KV head)
  tl.start(rows, D);
  const int64_t first_pos = sp.ctx_len - sp.q_len + task.first_token;
  for (int t = 0; t < tokens; ++t) {
    const T* qt = q + (sp.q_start + task.first_token + t) * q_row_stride;
    for (int g = 0; g < per_kv; ++g) {
      const int r = t * per_kv + g;
      const int64_t head = task.kv_head * per_kv + g;
      for (int d = 0; d < D; ++d) tl.query_at(r, d) = load(qt, head * D + d) * s.scale;
      tl.pos[r] = first_pos + t;
    }
  }
  const int64_t last_pos = first_pos + tokens - 1;
  int64_t begin = sp.key_start;
  if (s.window > 0) begin = std::max(begin, first_pos - s.window + 1);
  attend_keys<T>(tl, k_cache, v_cache, sp.table, sp.key_start, begin, last_pos + 1, task.kv_head, s,
                 /*read_ahead=*/false);
  for (int r = 0; r < rows; ++r) {
    const int t = r / per_kv, g = r % per_kv;
    T* orow = out + (sp.q_start + task.first_token + t) * out_row_stride + (task.kv_head * per_kv + g) * D;
    const float inv = tl.sum_of(r) > 0.f ? 1.f / tl.sum_of(r) : 0.f;
    for (int d = 0; d < D; ++d) store(orow, d, tl.output_at(r, d) * inv);
  }
}

template <typename T>
void prefill_attention(const std::vector<Span>& spans, const T* q, int64_t q_row_stride, const T* k_cache,
                       const T* v_cache, T* out, int64_t out_row_stride, const Shape& s) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(spans.size()); ++i) {
    const Span& sp = spans[i];
    for (int64_t first = 0; first < sp.q_len; first += TILE_TOKENS) {
      const int64_t last = std::min<int64_t>(first + TILE_TOKENS, sp.q_len);
      const int64_t last_pos = sp.ctx_len - sp.q_len + last - 1;
      int64_t begin = sp.key_start;
      if (s.window > 0) begin = std::max(begin, sp.ctx_len - sp.q_len + first - s.window + 1);
      for (int64_t h = 0; h < s.kv_heads; ++h) tasks.push_back({i, h, first, last, last_pos + 1 - begin});
    }
  }
  // a span's tiles of one KV head one after another (each task reads the keys the previous one read:
  // both threads work from their caches), the spans with the most work first, and within a span the
  // causal tiles at its end, which read the most keys, first
  std::vector<int64_t> work(spans.size() * s.kv_heads, 0);
  for (const Task& t : tasks) work[t.span * s.kv_heads + t.kv_head] += t.keys * (t.last_token - t.first_token);
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    const int64_t wa = work[a.span * s.kv_heads + a.kv_head], wb = work[b.span * s.kv_heads + b.kv_head];
    if (wa != wb) return wa > wb;
    if (a.span != b.span || a.kv_head != b.kv_head) return a.span != b.span ? a.span < b.span : a.kv_head < b.kv_head;
    return a.keys > b.keys;
  });
  const int64_t n = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(library_threads())
  for (int64_t i = 0; i < n; ++i)
    run_task<T>(tasks[i], spans[tasks[i].span], q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);
}

}  // namespace

// span_info: [spans, 4] int64 (query start row, query length, context length, key start); tables:
// [spans, table_stride] int32, column 0 holding the block of position key_start (a multiple of block_size).
#define PREFILL_ENTRY(NAME, T)                                                                                    \
  extern "C" void NAME(const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache, T* out,              \
                       int64_t out_row_stride, int64_t num_spans, const int64_t* span_info, const int32_t* tables, \
                       int64_t table_stride, int heads, int kv_heads, int head_dim, int block_size, float scale,  \
                       float softcap, int64_t window) {                                                           \
    std::vector<Span> spans(static_cast<size_t>(num_spans));                                                      \
    for (int64_t i = 0; i < num_spans; ++i)                                                                       \
      spans[i] = {span_info[4 * i], span_info[4 * i + 1], span_info[4 * i + 2], span_info[4 * i + 3],             \
                  tables + i * table_stride};                                                                     \
    const Shape s{heads, kv_heads, head_dim, block_size, scale, softcap, window};                                 \
    prefill_attention<T>(spans, q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);                       \
  }

PREFILL_ENTRY(prefill_attention_f32, float)
PREFILL_ENTRY(prefill_attention_bf16, bf16_t)
