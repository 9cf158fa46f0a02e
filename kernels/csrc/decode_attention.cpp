// Decode attention over the paged KV cache on CPU, reading keys and values in place.
//
// Meaning: kernels/shared_prefix_attention.py's shared_prefix_decode_reference (a step's decode rows,
// some in groups that share a prefix; with no groups, kernels/paged_attention.py's reference for decode
// rows). Built at first use by kernels/cpu_decode.py, which holds the launcher; tests compare the two.
//
// Work: one task per group tile (up to TILE_QUERIES query vectors of its members) and one per row
// without a group. A task keeps every query's online-softmax state (running max, sum, output) in
// float32; the group's prefix keys are read once for all the tile's queries (attention_tiles.h), then
// each member's own keys (attend_span: LANES keys at a time, one vector of scores per query, the next
// block of the cache requested ahead). Masked keys (before a query's sliding window) score MASKED, a
// finite stand-in for -inf: the file is built with -ffast-math (vectorised exp), under which
// infinities are not allowed.
#include "attention_tiles.h"
#include "threads.h"

namespace {

constexpr int TILE_QUERIES = 256;

// The online-softmax state of n query vectors (each a query head of one row).
struct State {
  int n = 0, head_dim = 0;
  std::vector<float> q, acc, max, sum;  // [n][D], [n][D], [n], [n]
  std::vector<int> kv_head;        // [n] the KV head each query reads
  std::vector<int64_t> visible;    // [n] first key position each query sees
  void reset(int n_, int d) {
    n = n_; head_dim = d;
    q.resize(static_cast<size_t>(n) * d); acc.assign(static_cast<size_t>(n) * d, 0.f);
    max.assign(n, MASKED); sum.assign(n, 0.f);
    kv_head.resize(n); visible.resize(n);
  }
};

// A vector of LANES elements from p, widened to float32.
inline Lanes load_lanes(const float* p) { return lanes_at(p); }
inline Lanes load_lanes(const bf16_t* p) {
  typedef uint16_t Halves __attribute__((vector_size(LANES * sizeof(uint16_t))));
  Halves h;
  std::memcpy(&h, p, sizeof h);
  const Ints bits = __builtin_convertvector(h, Ints) << 16;
  Lanes v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// One step of summing LANES vectors lane-wise into one vector of their totals: p and q hold items of W
// lanes each (partial sums of one vector each); the result holds their items in order, W / 2 lanes each.
template <int W> inline Lanes fold(Lanes p, Lanes q);
template <> inline Lanes fold<16>(Lanes p, Lanes q) {
  return __builtin_shuffle(p, q, Ints{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
         __builtin_shuffle(p, q, Ints{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
}
template <> inline Lanes fold<8>(Lanes p, Lanes q) {
  return __builtin_shuffle(p, q, Ints{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
         __builtin_shuffle(p, q, Ints{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
}
template <> inline Lanes fold<4>(Lanes p, Lanes q) {
  return __builtin_shuffle(p, q, Ints{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
         __builtin_shuffle(p, q, Ints{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
}
template <> inline Lanes fold<2>(Lanes p, Lanes q) {
  return __builtin_shuffle(p, q, Ints{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(p, q, Ints{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}
// lane t = the sum of a[t]'s lanes: 15 folds instead of LANES horizontal sums
inline Lanes lane_totals(const Lanes* a) {
  Lanes b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = fold<16>(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 4; ++i) c[i] = fold<8>(b[2 * i], b[2 * i + 1]);
  for (int i = 0; i < 2; ++i) d[i] = fold<4>(c[2 * i], c[2 * i + 1]);
  return fold<2>(d[0], d[1]);
}
inline float lanes_max(Lanes v) {
  v = v > __builtin_shuffle(v, Ints{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}) ? v : __builtin_shuffle(v, Ints{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v = v > __builtin_shuffle(v, Ints{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}) ? v : __builtin_shuffle(v, Ints{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v = v > __builtin_shuffle(v, Ints{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}) ? v : __builtin_shuffle(v, Ints{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  return std::max(v[0], v[1]);
}
inline float lanes_sum(Lanes v) {
  v += __builtin_shuffle(v, Ints{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, Ints{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, Ints{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  return v[0] + v[1];
}

// How many steps of work attend_span does for `queries` query vectors over `keys` keys (at most): what a
// caller spreads its requests of memory over.
inline int span_steps(int queries, int64_t keys, const Shape& s) {
  const int chunk = std::min(s.block_size, LANES);
  const int64_t chunks = (keys + chunk - 1) / chunk + 1;
  return static_cast<int>(std::min<int64_t>(INT_MAX / 4, chunks * queries * 2 * std::max(1, s.head_dim / LANES)));
}

// Attend queries [first, last) of `st` (one row's query heads) to key positions [begin, end) of one
// block table (column 0 = position table_start * block_size). Keys go LANES at a time (fewer at a
// block's edge): each query's dot products with them as LANES vector sums folded into one vector of
// scores, one online-softmax step per query over it, then the values into the query's output.
// `meanwhile` (started by the caller) is stepped with the span's own requests of its next block.
template <typename T>
void attend_span(State& st, int first, int last, const T* k_cache, const T* v_cache, const int32_t* table,
                 int64_t table_start, int64_t begin, int64_t end, const Shape& s, SpreadPrefetch& meanwhile) {
  const int D = s.head_dim, BS = s.block_size, VD = D - D % LANES;
  const int64_t token_stride = static_cast<int64_t>(s.kv_heads) * D;
  const Ints lane = Ints{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int pieces = (last - first) * 2 * std::max(1, VD / LANES);  // a piece per vector step of each query's passes
  SpreadPrefetch prefetch;
  for (int64_t pos = begin; pos < end;) {
    const int offset = static_cast<int>(pos % BS);
    const int n = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(BS - offset), LANES, end - pos}));
    const int64_t at = slot_of(table, pos, table_start * BS, BS) * token_stride;
    const T* kb = k_cache + at;
    const T* vb = v_cache + at;
    const int64_t ahead = pos + BS;  // the same place in the next block: requested while this chunk is worked on
    const int count = ahead < end ? static_cast<int>(std::min<int64_t>(n, end - ahead)) : 0;
    if (count > 0) {  // the tokens lie side by side in their block: one row of them
      const int64_t next = slot_of(table, ahead, table_start * BS, BS) * token_stride;
      prefetch.set(0, k_cache + next, v_cache + next);
    }
    prefetch.start(count > 0 ? 1 : 0, static_cast<int>(count * token_stride * sizeof(T)), pieces);
    const int64_t hidden = st.visible[first] - pos;  // keys t < hidden are before the window
    for (int j = first; j < last; ++j) {
      const float* qj = &st.q[static_cast<size_t>(j) * D];
      const int64_t head_offset = static_cast<int64_t>(st.kv_head[j]) * D;
      Lanes dots[LANES];
      for (int t = 0; t < LANES; ++t) dots[t] = Lanes{};
      for (int d = 0; d < VD; d += LANES) {
        prefetch.step();
        meanwhile.step();
        const Lanes q = lanes_at(qj + d);
        for (int t = 0; t < n; ++t) dots[t] += q * load_lanes(kb + t * token_stride + head_offset + d);
      }
      Lanes scores = lane_totals(dots);
      for (int t = 0; t < n; ++t) {
        const T* kr = kb + t * token_stride + head_offset;
        for (int d = VD; d < D; ++d) scores[t] += qj[d] * load(kr, d);  // head sizes no multiple of LANES
        if (s.softcap > 0.f) scores[t] = s.softcap * std::tanh(scores[t] / s.softcap);
      }
      scores = (lane < n) & (lane >= static_cast<int32_t>(std::clamp<int64_t>(hidden, 0, LANES))) ? scores
                                                                                                  : Lanes{} + MASKED;
      const float top = std::max(st.max[j], lanes_max(scores));
      if (top <= MASKED) continue;  // no key here is visible to the query
      const Lanes weights = scores <= MASKED ? Lanes{} : exp_lanes(scores - top);
      float* aj = &st.acc[static_cast<size_t>(j) * D];
      advance_softmax(st.max[j], st.sum[j], aj, D, top, lanes_sum(weights));
      for (int d = 0; d < VD; d += LANES) {  // two sums over the keys: half as long a chain of FMAs
        prefetch.step();
        meanwhile.step();
        Lanes a = lanes_at(aj + d), b = Lanes{};
        int t = 0;
        for (; t + 1 < n; t += 2) {
          a += weights[t] * load_lanes(vb + t * token_stride + head_offset + d);
          b += weights[t + 1] * load_lanes(vb + (t + 1) * token_stride + head_offset + d);
        }
        if (t < n) a += weights[t] * load_lanes(vb + t * token_stride + head_offset + d);
        put_lanes(aj + d, a + b);
      }
      for (int d = VD; d < D; ++d)
        for (int t = 0; t < n; ++t) aj[d] += weights[t] * load(vb + t * token_stride + head_offset, d);
    }
    prefetch.finish();
    pos += n;
  }
}

struct Batch {  // kernels/shared_prefix_attention.py's SharedPrefixBatch, as raw pointers
  int64_t rows;
  const int64_t* query_index;   // [rows]
  const int32_t* tables;        // [rows, table_stride]
  int64_t table_stride;
  const int32_t* table_starts;  // [rows]
  const int32_t* context_lens;  // [rows]
  const int32_t* suffix_starts; // [rows]
  int64_t groups;
  const int32_t* group_row_starts;  // [groups + 1]
  const int32_t* prefix_tables;     // [groups, prefix_table_stride]
  int64_t prefix_table_stride;
  const int32_t* prefix_lens;       // [groups]
};

struct Task {
  int64_t group;  // -1: a row without a group
  int64_t first_row, last_row;
};

// The group's prefix part: every query vector of the tile (all its members' query heads) over the prefix
// keys [begin, end), one KV head at a time through attention_tiles.h's blocked loop, whose state is
// then the queries' state in `st` (fresh before: the prefix part comes first).
template <typename T>
void attend_prefix(State& st, const Task& task, const Batch& b, const T* k_cache, const T* v_cache,
                   const int32_t* prefix_table, int64_t begin, int64_t end, const Shape& s, const SpreadPrefetch& then) {
  thread_local Tile tl;
  const int H = s.heads, D = s.head_dim, per_kv = s.heads / s.kv_heads;
  const int rows = static_cast<int>(task.last_row - task.first_row);
  const int64_t token_stride = static_cast<int64_t>(s.kv_heads) * D;
  for (int kh = 0; kh < s.kv_heads; ++kh) {
    tl.start(rows * per_kv, D);
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < per_kv; ++g) {
        const int i = r * per_kv + g, j = r * H + kh * per_kv + g;
        for (int d = 0; d < D; ++d) tl.query_at(i, d) = st.q[static_cast<size_t>(j) * D + d];
        tl.pos[i] = b.context_lens[task.first_row + r] - 1;  // a decode row's query is its last token
      }
    // meanwhile, the next KV head's first block of keys (or, after the last, what the caller reads next)
    if (kh + 1 < s.kv_heads) {
      const int count = static_cast<int>(std::min<int64_t>(KEYS, end - begin));
      for (int t = 0; t < count; ++t) {
        const int64_t at = slot_of(prefix_table, begin + t, 0, s.block_size) * token_stride + (kh + 1) * D;
        tl.after.set(t, k_cache + at, v_cache + at);
      }
      tl.after.start(count, static_cast<int>(D * sizeof(T)), tl.attend_steps(end - begin));
    } else {
      tl.after = then;
      tl.after.restart(tl.attend_steps(end - begin));
    }
    attend_keys<T>(tl, k_cache, v_cache, prefix_table, 0, begin, end, kh, s, /*read_ahead=*/true);
    tl.after.finish();
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < per_kv; ++g) {
        const int i = r * per_kv + g, j = r * H + kh * per_kv + g;
        for (int d = 0; d < D; ++d) st.acc[static_cast<size_t>(j) * D + d] = tl.output_at(i, d);
        st.max[j] = tl.max_of(i);
        st.sum[j] = tl.sum_of(i);
      }
  }
}

template <typename T>
void run_task(const Task& task, const Batch& b, const T* q, int64_t q_row_stride, const T* k_cache,
              const T* v_cache, T* out, int64_t out_row_stride, const Shape& s) {
  thread_local State st;
  const int H = s.heads, D = s.head_dim, per_kv = s.heads / s.kv_heads;
  const int rows = static_cast<int>(task.last_row - task.first_row);
  st.reset(rows * H, D);
  int64_t earliest = INT64_MAX;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = task.first_row + r;
    const T* qr = q + b.query_index[row] * q_row_stride;
    const int64_t ctx = b.context_lens[row];
    const int64_t visible = s.window > 0 ? std::max<int64_t>(0, ctx - s.window) : 0;
    earliest = std::min(earliest, visible);
    for (int h = 0; h < H; ++h) {
      const int j = r * H + h;
      for (int d = 0; d < D; ++d) st.q[static_cast<size_t>(j) * D + d] = load(qr, static_cast<int64_t>(h) * D + d) * s.scale;
      st.kv_head[j] = h / per_kv;
      st.visible[j] = visible;
    }
  }
  // Each row's own keys lie at a random place of the cache: a row's first block (all KV heads: its tokens
  // lie side by side) is requested while the work before it is done (the group's prefix, the row before),
  // or it would stall the core.
  const int64_t token_stride = static_cast<int64_t>(s.kv_heads) * D;
  auto suffix_begin = [&](int r) {
    return std::max<int64_t>(b.suffix_starts[task.first_row + r], st.visible[static_cast<size_t>(r) * H]);
  };
  auto first_block_of = [&](int r, SpreadPrefetch& request) {  // prepared: restart() spreads it over the work
    request.start(0, 0, 1);
    const int64_t row = task.first_row + r, from = suffix_begin(r), to = b.context_lens[row];
    if (from >= to) return;
    const int count = static_cast<int>(std::min<int64_t>(s.block_size - from % s.block_size, to - from));
    const int64_t at = slot_of(b.tables + row * b.table_stride, from, b.table_starts[row] * static_cast<int64_t>(s.block_size),
                               s.block_size) * token_stride;
    request.set(0, k_cache + at, v_cache + at);
    request.start(1, static_cast<int>(count * token_stride * sizeof(T)), 1);
  };
  SpreadPrefetch next_row;
  if (task.group >= 0) {
    const int64_t prefix = b.prefix_lens[task.group];
    if (earliest < prefix) {
      first_block_of(0, next_row);
      attend_prefix<T>(st, task, b, k_cache, v_cache, b.prefix_tables + task.group * b.prefix_table_stride, earliest,
                       prefix, s, next_row);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t row = task.first_row + r;
    const int64_t begin = suffix_begin(r);
    if (r + 1 < rows)
      first_block_of(r + 1, next_row);
    else
      next_row.start(0, 0, 1);
    next_row.restart(span_steps(H, b.context_lens[row] - begin, s));
    attend_span<T>(st, r * H, (r + 1) * H, k_cache, v_cache, b.tables + row * b.table_stride, b.table_starts[row],
                   begin, b.context_lens[row], s, next_row);
    next_row.finish();
    T* orow = out + b.query_index[row] * out_row_stride;
    for (int h = 0; h < H; ++h) {
      const int j = r * H + h;
      const float inv = st.sum[j] > 0.f ? 1.f / st.sum[j] : 0.f;
      for (int d = 0; d < D; ++d) store(orow, static_cast<int64_t>(h) * D + d, st.acc[static_cast<size_t>(j) * D + d] * inv);
    }
  }
}

template <typename T>
void decode_attention(const Batch& b, const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache, T* out,
                      int64_t out_row_stride, const Shape& s) {
  std::vector<Task> tasks;
  const int64_t tile = std::max(1, TILE_QUERIES / s.heads);
  for (int64_t g = 0; g < b.groups; ++g)
    for (int64_t r = b.group_row_starts[g]; r < b.group_row_starts[g + 1]; r += tile)
      tasks.push_back({g, r, std::min<int64_t>(r + tile, b.group_row_starts[g + 1])});
  for (int64_t r = b.groups ? b.group_row_starts[b.groups] : 0; r < b.rows; ++r) tasks.push_back({-1, r, r + 1});
  const int64_t n = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(library_threads())
  for (int64_t i = 0; i < n; ++i) run_task<T>(tasks[i], b, q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);
}

}  // namespace

#define DECODE_ENTRY(NAME, T)                                                                                     \
  extern "C" void NAME(const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache, T* out,              \
                       int64_t out_row_stride, int64_t rows, const int64_t* query_index, const int32_t* tables,   \
                       int64_t table_stride, const int32_t* table_starts, const int32_t* context_lens,            \
                       const int32_t* suffix_starts, int64_t groups, const int32_t* group_row_starts,             \
                       const int32_t* prefix_tables, int64_t prefix_table_stride, const int32_t* prefix_lens,     \
                       int heads, int kv_heads, int head_dim, int block_size, float scale, float softcap,         \
                       int64_t window) {                                                                          \
    const Batch b{rows, query_index, tables, table_stride, table_starts, context_lens, suffix_starts, groups,      \
                  group_row_starts, prefix_tables, prefix_table_stride, prefix_lens};                             \
    const Shape s{heads, kv_heads, head_dim, block_size, scale, softcap, window};                                 \
    decode_attention<T>(b, q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);                            \
  }

DECODE_ENTRY(decode_attention_f32, float)
DECODE_ENTRY(decode_attention_bf16, bf16_t)
