// Condensed sparse matmul for the XLA CPU backend (XLA FFI custom call).
//
//   y[r, i] = bias[i] + sum_j values[i, j] * x[r, indices[i, j]]
//
// x: [batch, n_in] (f32 or bf16), values: [n_active, k] (same dtype), indices:
// [n_active / G, k] (s8, s16 or s32; G = 1 unless G neurons share one index list, the
// group-shared layout), bias: [n_active] (same dtype), y: [batch, n_active] (same dtype).
// Neuron i reads indices[i / G].
// Products accumulate in f32; bf16 results are rounded to nearest even.
//
// Two loops, both free of a materialised gather:
// * small batch: per row, per neuron, a dot product over the k gathered inputs with 16
//   independent partial sums (vectorises to gathers + FMAs); in the group-shared layout
//   the k inputs of a group are gathered once into a contiguous buffer and its G neurons
//   run plain contiguous dot products against it (no gathers in the inner loop);
// * large batch: a batch tile of T rows is transposed once into xt[n_in][T] (f32), so each
//   slot of a neuron reads one contiguous T-wide row of xt: y_tile[i, :] += v * xt[idx, :].
// Neurons are split over XLA's intra-op thread pool when the work is large enough.
// Indices are range-checked (per chunk, in parallel) before any read through them: a bad
// index is an error, never an out-of-bounds read.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct bf16 {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }
inline float to_f32(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(bf16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) {
    p->bits = static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  p->bits = static_cast<uint16_t>(u >> 16);
}

// Whether every index of idx[0, n) lies in [0, n_in) (a min/max pass that vectorises).
template <typename I>
bool in_range(const I* idx, int64_t n, int64_t n_in) {
  int64_t lo = 0, hi = 0;
  for (int64_t e = 0; e < n; ++e) {
    lo = std::min<int64_t>(lo, idx[e]);
    hi = std::max<int64_t>(hi, idx[e]);
  }
  return n == 0 || (lo >= 0 && hi < n_in);
}

constexpr int kLanes = 16;  // partial sums in the small-batch loop
constexpr int kTile = 32;   // batch rows per tile in the large-batch loop

// Small batch: one row of x (already f32) against neurons [n0, n1).
template <typename V, typename I>
void rows_small(const float* xr, const V* values, const I* idx, const V* bias, int64_t n0,
                int64_t n1, int64_t k, V* yr) {
  const int64_t k_main = k - k % kLanes;
  for (int64_t i = n0; i < n1; ++i) {
    const V* v = values + i * k;
    const I* ix = idx + i * k;
    float acc[kLanes] = {0};
    for (int64_t j0 = 0; j0 < k_main; j0 += kLanes) {
      for (int t = 0; t < kLanes; ++t) {
        acc[t] += to_f32(v[j0 + t]) * xr[static_cast<int64_t>(ix[j0 + t])];
      }
    }
    float s = to_f32(bias[i]);
    for (int64_t j = k_main; j < k; ++j) s += to_f32(v[j]) * xr[static_cast<int64_t>(ix[j])];
    for (int t = 0; t < kLanes; ++t) s += acc[t];
    store(yr + i, s);
  }
}

// Small batch, group-shared layout: groups [g0, g1) of G neurons each; the group's k inputs
// are gathered once into xg (k floats), then G contiguous dot products.
template <typename V, typename I>
void rows_small_grouped(const float* xr, const V* values, const I* idx, const V* bias,
                        int64_t g0, int64_t g1, int64_t G, int64_t k, float* xg, V* yr) {
  const int64_t k_main = k - k % kLanes;
  for (int64_t g = g0; g < g1; ++g) {
    const I* ix = idx + g * k;
    for (int64_t j = 0; j < k; ++j) xg[j] = xr[static_cast<int64_t>(ix[j])];
    for (int64_t i = g * G; i < (g + 1) * G; ++i) {
      const V* v = values + i * k;
      float acc[kLanes] = {0};
      for (int64_t j0 = 0; j0 < k_main; j0 += kLanes) {
        for (int t = 0; t < kLanes; ++t) acc[t] += to_f32(v[j0 + t]) * xg[j0 + t];
      }
      float s = to_f32(bias[i]);
      for (int64_t j = k_main; j < k; ++j) s += to_f32(v[j]) * xg[j];
      for (int t = 0; t < kLanes; ++t) s += acc[t];
      store(yr + i, s);
    }
  }
}

// Large batch: one transposed tile xt[n_in][kTile] against neurons [n0, n1).
// GCC/Clang vector extensions keep the kTile accumulators in registers (AVX-512: 2 zmm).
typedef float vf __attribute__((vector_size(64), aligned(4)));
constexpr int kVec = 16;
static_assert(kTile % kVec == 0, "tile must be a multiple of the vector width");

template <typename V, typename I>
void tile_large(const float* xt, const V* values, const I* idx, const V* bias, int64_t n0,
                int64_t n1, int64_t k, int64_t G, int64_t rows, int64_t n_active, V* ytile) {
  for (int64_t i = n0; i < n1; ++i) {
    const V* v = values + i * k;
    const I* ix = idx + (i / G) * k;  // the G neurons of a group read the same rows (L1-hot)
    const float b = to_f32(bias[i]);
    vf acc[kTile / kVec];
    for (int a = 0; a < kTile / kVec; ++a) acc[a] = vf{} + b;
    for (int64_t j = 0; j < k; ++j) {
      const float w = to_f32(v[j]);
      const float* row = xt + static_cast<int64_t>(ix[j]) * kTile;
      for (int a = 0; a < kTile / kVec; ++a) {
        vf r;
        std::memcpy(&r, row + a * kVec, sizeof(vf));
        acc[a] += w * r;
      }
    }
    float out[kTile];
    std::memcpy(out, acc, sizeof(out));
    for (int64_t t = 0; t < rows; ++t) store(ytile + t * n_active + i, out[t]);
  }
}

// Runs fn(c) for c in [0, chunks) and waits for all of them. Chunks are claimed from an
// atomic counter by the calling thread and by pool tasks alike, so a pool thread that is
// slow to start (a busy, oversubscribed machine) costs nothing: the caller takes its work.
// The shared state outlives late tasks; they touch fn only after claiming a chunk, and the
// caller waits for every claimed chunk, so fn is alive whenever it runs.
struct Shared {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void parallel_for(ffi::ThreadPool* pool, int64_t chunks, F fn) {
  if (chunks <= 1 || pool == nullptr) {
    for (int64_t c = 0; c < chunks; ++c) fn(c);
    return;
  }
  auto shared = std::make_shared<Shared>();
  const F* fp = &fn;
  auto drain = [chunks](Shared* sh, const F* f) {
    int64_t mine = 0;
    for (int64_t c; (c = sh->next.fetch_add(1)) < chunks; ++mine) (*f)(c);
    if (mine) {
      std::lock_guard<std::mutex> lock(sh->mu);
      sh->done += mine;
      if (sh->done == chunks) sh->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < chunks; ++t) {
    pool->Schedule([shared, fp, drain] { drain(shared.get(), fp); });
  }
  drain(shared.get(), fp);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == chunks; });
}

template <typename V, typename I>
ffi::Error run(ffi::ThreadPool* pool, const V* x, int64_t batch, int64_t n_in,
               const V* values, const I* idx, const V* bias, int64_t n_active, int64_t k,
               int64_t G, V* y) {
  const int64_t n_groups = n_active / G;
  const int64_t nnz = n_active * k;
  int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
  // ~1 chunk per 64k multiply-adds: tiny layers stay on one thread. Chunks are claimed
  // dynamically (see parallel_for), so a busy pool costs little more than a hand-off.
  // Chunks hold whole groups (G = 1: whole neurons).
  const int64_t work = std::max<int64_t>(batch, 1) * nnz;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({threads, work / (1 << 16), n_active / 16, n_groups}));
  const int64_t per = (n_groups + chunks - 1) / chunks;  // groups per chunk
  // Each chunk range-checks its own groups' indices (in parallel, and just before a small
  // batch reads them again from cache); nothing is computed unless all are in range.
  std::vector<char> ok(chunks, 1);
  auto check = [&](int64_t c) {
    const int64_t g0 = c * per, g1 = std::min(n_groups, g0 + per);
    ok[c] = g1 > g0 ? in_range(idx + g0 * k, (g1 - g0) * k, n_in) : 1;
    return ok[c];
  };
  auto first_bad = [&]() {
    for (int64_t e = 0; e < n_groups * k; ++e) {
      const int64_t j = static_cast<int64_t>(idx[e]);
      if (j < 0 || j >= n_in) {
        return ffi::Error::InvalidArgument(
            "condensed_matmul: index " + std::to_string(j) + " out of range [0, " +
            std::to_string(n_in) + ")");
      }
    }
    return ffi::Error::Success();
  };

  if (batch < 8) {
    std::vector<float> xf(batch * n_in);
    for (int64_t e = 0; e < batch * n_in; ++e) xf[e] = to_f32(x[e]);
    parallel_for(pool, chunks, [&](int64_t c) {
      if (!check(c)) return;
      const int64_t g0 = c * per, g1 = std::min(n_groups, g0 + per);
      if (G == 1) {
        for (int64_t r = 0; r < batch; ++r) {
          rows_small(xf.data() + r * n_in, values, idx, bias, g0, g1, k, y + r * n_active);
        }
        return;
      }
      std::vector<float> xg(k);
      for (int64_t r = 0; r < batch; ++r) {
        rows_small_grouped(xf.data() + r * n_in, values, idx, bias, g0, g1, G, k, xg.data(),
                           y + r * n_active);
      }
    });
    if (std::find(ok.begin(), ok.end(), 0) != ok.end()) return first_bad();
    return ffi::Error::Success();
  }
  parallel_for(pool, chunks, check);
  if (std::find(ok.begin(), ok.end(), 0) != ok.end()) return first_bad();
  std::vector<float> xt(n_in * kTile);
  for (int64_t r0 = 0; r0 < batch; r0 += kTile) {
    const int64_t rows = std::min<int64_t>(kTile, batch - r0);
    for (int64_t c = 0; c < n_in; ++c) {
      float* dst = xt.data() + c * kTile;
      for (int64_t t = 0; t < rows; ++t) dst[t] = to_f32(x[(r0 + t) * n_in + c]);
      for (int64_t t = rows; t < kTile; ++t) dst[t] = 0.0f;
    }
    parallel_for(pool, chunks, [&](int64_t c) {
      const int64_t n0 = c * per * G, n1 = std::min(n_active, n0 + per * G);
      tile_large(xt.data(), values, idx, bias, n0, n1, k, G, rows, n_active,
                 y + r0 * n_active);
    });
  }
  return ffi::Error::Success();
}

template <typename V>
ffi::Error by_index(ffi::ThreadPool* pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                    ffi::AnyBuffer indices, ffi::AnyBuffer bias, V* y) {
  auto xd = x.dimensions();
  auto vd = values.dimensions();
  const int64_t n_in = xd.back();
  const int64_t batch = n_in ? static_cast<int64_t>(x.element_count()) / n_in : 0;
  const int64_t n_active = vd[0], k = vd[1];
  if (n_active == 0) return ffi::Error::Success();
  const int64_t G = n_active / indices.dimensions()[0];
  const V* xp = static_cast<const V*>(x.untyped_data());
  const V* vp = static_cast<const V*>(values.untyped_data());
  const V* bp = static_cast<const V*>(bias.untyped_data());
  switch (indices.element_type()) {
    case ffi::DataType::S8:
      return run(pool, xp, batch, n_in, vp, static_cast<const int8_t*>(indices.untyped_data()),
                 bp, n_active, k, G, y);
    case ffi::DataType::S16:
      return run(pool, xp, batch, n_in, vp,
                 static_cast<const int16_t*>(indices.untyped_data()), bp, n_active, k, G, y);
    case ffi::DataType::S32:
      return run(pool, xp, batch, n_in, vp,
                 static_cast<const int32_t*>(indices.untyped_data()), bp, n_active, k, G, y);
    default:
      return ffi::Error::InvalidArgument("condensed_matmul: indices must be int8/16/32");
  }
}

ffi::Error CondensedMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                               ffi::AnyBuffer indices, ffi::AnyBuffer bias,
                               ffi::Result<ffi::AnyBuffer> y) {
  auto vd = values.dimensions();
  auto xd = x.dimensions();
  if (vd.size() != 2 || indices.dimensions().size() != 2 || xd.size() < 1 ||
      bias.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("condensed_matmul: bad ranks");
  }
  const int64_t idx_rows = indices.dimensions()[0];
  const bool grouped = idx_rows > 0 ? vd[0] % idx_rows == 0 : vd[0] == 0;
  if (!grouped || indices.dimensions()[1] != vd[1] || bias.dimensions()[0] != vd[0]) {
    return ffi::Error::InvalidArgument(
        "condensed_matmul: values [n_active, k], indices [n_active / G, k] and bias "
        "[n_active] do not fit together");
  }
  const auto dt = x.element_type();
  if (values.element_type() != dt || bias.element_type() != dt || y->element_type() != dt) {
    return ffi::Error::InvalidArgument("condensed_matmul: x, values, bias, y dtypes differ");
  }
  ffi::ThreadPool* pp = &pool;
  if (dt == ffi::DataType::F32) {
    return by_index(pp, x, values, indices, bias, static_cast<float*>(y->untyped_data()));
  }
  if (dt == ffi::DataType::BF16) {
    return by_index(pp, x, values, indices, bias, static_cast<bf16*>(y->untyped_data()));
  }
  return ffi::Error::InvalidArgument("condensed_matmul: dtype must be float32 or bfloat16");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseCondensedMatmul, CondensedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
