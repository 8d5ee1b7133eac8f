// Backward pass of the condensed layer for the XLA CPU backend (XLA FFI custom calls).
//
// For y[b, i] = bias[i] + sum_j values[i, j] * x[b, indices[i, j]]:
//
//   dvalues[i, j] = sum_b dy[b, i] * x[b, indices[i, j]]          (per-slot dot products)
//   dx[b, c]      = sum_{i, j : indices[i, j] = c} dy[b, i] * values[i, j]   (scatter-add)
//
// x: [batch, n_in] f32, dy: [batch, n_out] f32, values: [n_out, k] f32, indices: [n_out, k]
// (s8, s16 or s32). One index list per neuron (no group-shared layout). Both kernels work
// on batch-transposed copies, so the inner loops read and write contiguous batch rows:
// * dvalues: xt[n_in][B] and dyt[n_out][B]; slot (i, j) is the dot product of row
//   indices[i, j] of xt with row i of dyt. Neurons are split over the thread pool.
// * dx: per tile of kTile batch rows, dxt[n_in][kTile] += values[i, j] * dyt[i] for every
//   slot: no atomics, because a chunk owns its tile's accumulator (tiles, or parts of the
//   neurons of one tile when there are fewer tiles than threads, summed afterwards).
// Indices are range-checked before any read or write through them: a bad index fails the
// call with an error naming it.
//
// The forward kernel and the helpers (thread pool loop, range check) come from
// condensed_cpu.cc, compiled into the same library.

#include "condensed_cpu.cc"

namespace {

typedef float vf8 __attribute__((vector_size(32), aligned(4)));
constexpr int kW = 8;  // floats per vector

// Batch-transposes src[rows][cols] into dst[cols][ld] (ld >= rows, tail zero-filled).
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  constexpr int64_t kB = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = std::min(rows, r0 + kB);
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t c1 = std::min(cols, c0 + kB);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ld + r] = src[r * cols + c];
      }
    }
  }
  if (ld > rows) {
    for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + c * ld + ld, 0.f);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {  // n % kW == 0
  vf8 s0{}, s1{};
  int64_t e = 0;
  for (; e + 2 * kW <= n; e += 2 * kW) {
    vf8 a0, a1, b0, b1;
    std::memcpy(&a0, a + e, sizeof(vf8));
    std::memcpy(&b0, b + e, sizeof(vf8));
    std::memcpy(&a1, a + e + kW, sizeof(vf8));
    std::memcpy(&b1, b + e + kW, sizeof(vf8));
    s0 += a0 * b0;
    s1 += a1 * b1;
  }
  for (; e < n; e += kW) {
    vf8 a0, b0;
    std::memcpy(&a0, a + e, sizeof(vf8));
    std::memcpy(&b0, b + e, sizeof(vf8));
    s0 += a0 * b0;
  }
  s0 += s1;
  float out[kW];
  std::memcpy(out, &s0, sizeof(out));
  float s = 0.f;
  for (int t = 0; t < kW; ++t) s += out[t];
  return s;
}

template <typename I>
ffi::Error check_all(ffi::ThreadPool* pool, const I* idx, int64_t n, int64_t n_in,
                     int64_t chunks) {
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<char> ok(chunks, 1);
  parallel_for(pool, chunks, [&](int64_t c) {
    const int64_t e0 = c * per, e1 = std::min(n, e0 + per);
    ok[c] = e1 > e0 ? in_range(idx + e0, e1 - e0, n_in) : 1;
  });
  if (std::find(ok.begin(), ok.end(), 0) == ok.end()) return ffi::Error::Success();
  for (int64_t e = 0; e < n; ++e) {
    const int64_t j = static_cast<int64_t>(idx[e]);
    if (j < 0 || j >= n_in) {
      return ffi::Error::InvalidArgument("condensed backward: index " + std::to_string(j) +
                                         " out of range [0, " + std::to_string(n_in) + ")");
    }
  }
  return ffi::Error::Success();
}

int64_t pool_threads(ffi::ThreadPool* pool) {
  return pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
}

template <typename I>
ffi::Error dvalues_run(ffi::ThreadPool* pool, const float* x, const float* dy, const I* idx,
                       int64_t batch, int64_t n_in, int64_t n_out, int64_t k, float* dv) {
  const int64_t threads = pool_threads(pool);
  const int64_t work = std::max<int64_t>(batch, 1) * n_out * k;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({threads, work / (1 << 16), n_out}));
  ffi::Error err = check_all(pool, idx, n_out * k, n_in, chunks);
  if (err.failure()) return err;
  const int64_t ld = (batch + kW - 1) / kW * kW;
  std::vector<float> xt(n_in * ld), dyt(n_out * ld);
  transpose(x, batch, n_in, ld, xt.data());
  transpose(dy, batch, n_out, ld, dyt.data());
  const int64_t per = (n_out + chunks - 1) / chunks;
  parallel_for(pool, chunks, [&](int64_t c) {
    const int64_t i0 = c * per, i1 = std::min(n_out, i0 + per);
    for (int64_t i = i0; i < i1; ++i) {
      const float* g = dyt.data() + i * ld;
      const I* ix = idx + i * k;
      for (int64_t j = 0; j < k; ++j) {
        dv[i * k + j] = dot(g, xt.data() + static_cast<int64_t>(ix[j]) * ld, ld);
      }
    }
  });
  return ffi::Error::Success();
}

constexpr int64_t kDxTile = 32;  // batch rows per dx accumulator row (4 AVX2 vectors)

template <typename I>
ffi::Error dx_run(ffi::ThreadPool* pool, const float* dy, const float* values, const I* idx,
                  int64_t batch, int64_t n_in, int64_t n_out, int64_t k, float* dx) {
  const int64_t threads = pool_threads(pool);
  const int64_t work = std::max<int64_t>(batch, 1) * n_out * k;
  const int64_t useful = std::max<int64_t>(1, std::min<int64_t>(threads, work / (1 << 16)));
  ffi::Error err = check_all(pool, idx, n_out * k, n_in, useful);
  if (err.failure()) return err;
  if (batch == 0) return ffi::Error::Success();
  const int64_t tiles = (batch + kDxTile - 1) / kDxTile;
  // Fewer tiles than threads: each tile's neurons are split into parts with their own
  // accumulators (summed below), so small batches still use every thread.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(useful / tiles, n_out));
  const int64_t chunks = tiles * parts;
  const int64_t per = (n_out + parts - 1) / parts;
  std::vector<float> acc(chunks * n_in * kDxTile);
  std::vector<float> dyt(tiles * n_out * kDxTile);
  parallel_for(pool, tiles, [&](int64_t t) {
    const int64_t r0 = t * kDxTile, rows = std::min(kDxTile, batch - r0);
    transpose(dy + r0 * n_out, rows, n_out, kDxTile, dyt.data() + t * n_out * kDxTile);
  });
  parallel_for(pool, chunks, [&](int64_t c) {
    const int64_t t = c / parts, p = c % parts;
    const int64_t i0 = p * per, i1 = std::min(n_out, i0 + per);
    float* a = acc.data() + c * n_in * kDxTile;
    std::fill(a, a + n_in * kDxTile, 0.f);
    const float* g = dyt.data() + t * n_out * kDxTile;
    for (int64_t i = i0; i < i1; ++i) {
      vf8 gi[kDxTile / kW];
      std::memcpy(gi, g + i * kDxTile, sizeof(gi));
      const float* v = values + i * k;
      const I* ix = idx + i * k;
      for (int64_t j = 0; j < k; ++j) {
        const float w = v[j];
        float* row = a + static_cast<int64_t>(ix[j]) * kDxTile;
        for (int q = 0; q < kDxTile / kW; ++q) {
          vf8 r;
          std::memcpy(&r, row + q * kW, sizeof(vf8));
          r += w * gi[q];
          std::memcpy(row + q * kW, &r, sizeof(vf8));
        }
      }
    }
  });
  parallel_for(pool, tiles, [&](int64_t t) {
    const int64_t r0 = t * kDxTile, rows = std::min(kDxTile, batch - r0);
    float* a = acc.data() + t * parts * n_in * kDxTile;
    for (int64_t p = 1; p < parts; ++p) {
      const float* b = a + p * n_in * kDxTile;
      for (int64_t e = 0; e < n_in * kDxTile; ++e) a[e] += b[e];
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < n_in; ++c) dx[(r0 + r) * n_in + c] = a[c * kDxTile + r];
    }
  });
  return ffi::Error::Success();
}

ffi::Error check_f32(std::initializer_list<ffi::DataType> types) {
  for (auto t : types) {
    if (t != ffi::DataType::F32) {
      return ffi::Error::InvalidArgument("condensed backward: float32 only");
    }
  }
  return ffi::Error::Success();
}

ffi::Error DvaluesImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                       ffi::AnyBuffer indices, ffi::Result<ffi::AnyBuffer> dv) {
  auto xd = x.dimensions(), gd = dy.dimensions(), id = indices.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || id.size() != 2 || xd[0] != gd[0] ||
      id[0] != gd[1] || dv->dimensions().size() != 2 || dv->dimensions()[0] != id[0] ||
      dv->dimensions()[1] != id[1]) {
    return ffi::Error::InvalidArgument(
        "condensed dvalues: x [B, n_in], dy [B, n_out], indices [n_out, k] and dvalues "
        "[n_out, k] do not fit together");
  }
  ffi::Error err = check_f32({x.element_type(), dy.element_type(), dv->element_type()});
  if (err.failure()) return err;
  const float* xp = static_cast<const float*>(x.untyped_data());
  const float* gp = static_cast<const float*>(dy.untyped_data());
  float* out = static_cast<float*>(dv->untyped_data());
  const int64_t batch = xd[0], n_in = xd[1], n_out = id[0], k = id[1];
  if (n_out == 0 || k == 0) return ffi::Error::Success();
  switch (indices.element_type()) {
    case ffi::DataType::S8:
      return dvalues_run(&pool, xp, gp, static_cast<const int8_t*>(indices.untyped_data()),
                         batch, n_in, n_out, k, out);
    case ffi::DataType::S16:
      return dvalues_run(&pool, xp, gp, static_cast<const int16_t*>(indices.untyped_data()),
                         batch, n_in, n_out, k, out);
    case ffi::DataType::S32:
      return dvalues_run(&pool, xp, gp, static_cast<const int32_t*>(indices.untyped_data()),
                         batch, n_in, n_out, k, out);
    default:
      return ffi::Error::InvalidArgument("condensed dvalues: indices must be int8/16/32");
  }
}

ffi::Error DxImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer values,
                  ffi::AnyBuffer indices, ffi::Result<ffi::AnyBuffer> dx) {
  auto gd = dy.dimensions(), vd = values.dimensions(), id = indices.dimensions();
  auto od = dx->dimensions();
  if (gd.size() != 2 || vd.size() != 2 || id.size() != 2 || od.size() != 2 ||
      vd[0] != id[0] || vd[1] != id[1] || gd[1] != vd[0] || od[0] != gd[0]) {
    return ffi::Error::InvalidArgument(
        "condensed dx: dy [B, n_out], values and indices [n_out, k] and dx [B, n_in] do not "
        "fit together");
  }
  ffi::Error err = check_f32({dy.element_type(), values.element_type(), dx->element_type()});
  if (err.failure()) return err;
  const float* gp = static_cast<const float*>(dy.untyped_data());
  const float* vp = static_cast<const float*>(values.untyped_data());
  float* out = static_cast<float*>(dx->untyped_data());
  const int64_t batch = gd[0], n_out = vd[0], k = vd[1], n_in = od[1];
  switch (indices.element_type()) {
    case ffi::DataType::S8:
      return dx_run(&pool, gp, vp, static_cast<const int8_t*>(indices.untyped_data()), batch,
                    n_in, n_out, k, out);
    case ffi::DataType::S16:
      return dx_run(&pool, gp, vp, static_cast<const int16_t*>(indices.untyped_data()), batch,
                    n_in, n_out, k, out);
    case ffi::DataType::S32:
      return dx_run(&pool, gp, vp, static_cast<const int32_t*>(indices.untyped_data()), batch,
                    n_in, n_out, k, out);
    default:
      return ffi::Error::InvalidArgument("condensed dx: indices must be int8/16/32");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseCondensedDvalues, DvaluesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseCondensedDx, DxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
