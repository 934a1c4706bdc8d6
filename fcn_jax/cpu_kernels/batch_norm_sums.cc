// Per-channel sums of training-mode BatchNorm (+ ReLU), NHWC, float32, on the
// CPU, each in one read of its inputs:
//
//   ChannelMoments:            x [..., C] -> (sum x, sum x^2) [C]
//   ReluBatchNormGradientSums: x, dy [..., C], mean, inv, scale, bias [C] ->
//       (sum g, sum g x_hat) [C],  x_hat = (x - mean) inv,
//       g = dy where (x - mean) gain + bias > 0 else 0,  gain = inv scale
//
// The ReLU mask is recomputed from x, so the backward pass needs no ReLU
// output; it is tested as (x - mean) gain > -bias, which has the sign of the
// rounded sum whatever the rounding (and leaves no multiply-add to contract),
// so it equals the forward pass's mask exactly. XLA:CPU writes g to memory and sums it
// in separate passes; here each pixel's channels are read once. Pixels are
// taken in blocks of kBlockPixels, summed in float32 registers (16 or 8 lanes)
// and the block sums added in float64, so the rounding error is that of a sum
// of kBlockPixels values. C must be a multiple of the register width. Pixels
// are split into `parts` fixed parts, run on XLA's thread pool.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel_chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef __AVX512F__
#define FCN_JAX_BN_LANES 16
#else
#define FCN_JAX_BN_LANES 8
#endif
constexpr int kLanes = FCN_JAX_BN_LANES;
typedef float Vec __attribute__((vector_size(FCN_JAX_BN_LANES * 4)));
typedef float UnalignedVec
    __attribute__((vector_size(FCN_JAX_BN_LANES * 4), aligned(4)));
constexpr int64_t kBlockPixels = 256;
// Channel groups of kMaxVecs registers: with 6 per-channel registers per
// vector in GradientBlock, 4 fit AVX-512's 32 registers and 2 AVX2's 16.
constexpr int kMaxVecs = kLanes == 16 ? 4 : 2;

inline Vec Load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }

// Sums of x and x^2 over pixels [p_lo, p_hi) for channels [c0, c0 + kVecs
// kLanes), added to the float64 totals.
template <int kVecs>
void MomentsBlock(const float* x, int64_t c_total, int64_t c0, int64_t p_lo,
                  int64_t p_hi, double* sum, double* sum_sq) {
  Vec s[kVecs], q[kVecs];
  for (int v = 0; v < kVecs; ++v) s[v] = q[v] = Vec{};
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const float* row = x + p * c_total + c0;
    for (int v = 0; v < kVecs; ++v) {
      const Vec value = Load(row + kLanes * v);
      s[v] += value;
      q[v] += value * value;
    }
  }
  for (int v = 0; v < kVecs; ++v)
    for (int l = 0; l < kLanes; ++l) {
      sum[c0 + kLanes * v + l] += s[v][l];
      sum_sq[c0 + kLanes * v + l] += q[v][l];
    }
}

// Sums of g and g x_hat over pixels [p_lo, p_hi) for channels [c0, c0 + kVecs
// kLanes), added to the float64 totals.
template <int kVecs>
void GradientBlock(const float* x, const float* dy, const float* mean,
                   const float* inv, const float* gain, const float* bias,
                   int64_t c_total, int64_t c0, int64_t p_lo, int64_t p_hi,
                   double* sum_g, double* sum_g_x_hat) {
  // b holds -bias.
  Vec s[kVecs], t[kVecs], m[kVecs], k[kVecs], a[kVecs], b[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const int64_t c = c0 + kLanes * v;
    s[v] = t[v] = Vec{};
    m[v] = Load(mean + c);
    k[v] = Load(inv + c);
    a[v] = Load(gain + c);
    b[v] = -Load(bias + c);
  }
  const Vec zero = Vec{};
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const int64_t at = p * c_total + c0;
    for (int v = 0; v < kVecs; ++v) {
      const int64_t i = at + kLanes * v;
      const Vec centred = Load(x + i) - m[v];
      const Vec g = centred * a[v] > b[v] ? Load(dy + i) : zero;
      s[v] += g;
      t[v] += g * (centred * k[v]);
    }
  }
  for (int v = 0; v < kVecs; ++v)
    for (int l = 0; l < kLanes; ++l) {
      sum_g[c0 + kLanes * v + l] += s[v][l];
      sum_g_x_hat[c0 + kLanes * v + l] += t[v][l];
    }
}

struct Moments {
  const float* x;
  int64_t c_total;
  template <int kVecs>
  void operator()(int64_t c0, int64_t p0, int64_t p1, double* a, double* b) const {
    MomentsBlock<kVecs>(x, c_total, c0, p0, p1, a, b);
  }
};

struct GradientSums {
  const float *x, *dy, *mean, *inv, *gain, *bias;
  int64_t c_total;
  template <int kVecs>
  void operator()(int64_t c0, int64_t p0, int64_t p1, double* a, double* b) const {
    GradientBlock<kVecs>(x, dy, mean, inv, gain, bias, c_total, c0, p0, p1, a, b);
  }
};

// Runs block.operator()<kVecs>(c0, p0, p1, totals_a, totals_b) over every
// pixel block and channel group of pixels [p_lo, p_hi).
template <typename Block>
void SumPixels(int64_t c_total, int64_t p_lo, int64_t p_hi, double* a,
               double* b, const Block& block) {
  for (int64_t p0 = p_lo; p0 < p_hi; p0 += kBlockPixels) {
    const int64_t p1 = std::min(p_hi, p0 + kBlockPixels);
    int64_t c0 = 0;
    for (; c0 + kMaxVecs * kLanes <= c_total; c0 += kMaxVecs * kLanes)
      block.template operator()<kMaxVecs>(c0, p0, p1, a, b);
    for (; c0 + kLanes <= c_total; c0 += kLanes)
      block.template operator()<1>(c0, p0, p1, a, b);
  }
}

// Splits the pixels into `parts` fixed parts, each with its own float64
// totals, run on XLA's thread pool, and writes their sum, added in part
// order, as float32, so the result does not depend on which thread ran what.
template <typename Block>
void SumInParts(ffi::ThreadPool& pool, int64_t pixels, int64_t c_total,
                int64_t parts, float* out_a, float* out_b, const Block& block) {
  // Below ~64k values per part a part costs more than it saves.
  const int64_t useful = std::max<int64_t>(1, pixels * c_total / 65536);
  const int64_t count = std::clamp<int64_t>(parts, 1, std::min(useful, pixels));
  std::vector<double> totals(2 * c_total * count, 0.0);
  auto run = [&](int64_t t) {
    double* a = totals.data() + 2 * c_total * t;
    SumPixels(c_total, pixels * t / count, pixels * (t + 1) / count, a, a + c_total,
              block);
  };
  fcn_jax::ParallelChunks(pool, count, run);
  for (int64_t c = 0; c < c_total; ++c) {
    double a = 0.0, b = 0.0;
    for (int64_t t = 0; t < count; ++t) {
      a += totals[2 * c_total * t + c];
      b += totals[2 * c_total * t + c_total + c];
    }
    out_a[c] = static_cast<float>(a);
    out_b[c] = static_cast<float>(b);
  }
}

ffi::Error CheckChannels(int64_t c_total) {
  if (c_total % kLanes != 0) {
    return ffi::Error::InvalidArgument("channels must be a multiple of the register width");
  }
  return ffi::Error::Success();
}

ffi::Error ChannelMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::ResultBuffer<ffi::F32> sum,
                              ffi::ResultBuffer<ffi::F32> sum_sq, int64_t parts) {
  const auto xd = x.dimensions();
  if (xd.size() == 0) return ffi::Error::InvalidArgument("x must have a channel axis");
  const int64_t c_total = xd.back();
  if (auto error = CheckChannels(c_total); error.failure()) return error;
  if (sum->element_count() != c_total || sum_sq->element_count() != c_total) {
    return ffi::Error::InvalidArgument("sums must have one entry per channel");
  }
  const Moments block{x.typed_data(), c_total};
  SumInParts(pool, x.element_count() / c_total, c_total, parts,
             sum->typed_data(), sum_sq->typed_data(), block);
  return ffi::Error::Success();
}

ffi::Error ReluBatchNormGradientSumsImpl(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> inv,
    ffi::Buffer<ffi::F32> gain, ffi::Buffer<ffi::F32> bias,
    ffi::ResultBuffer<ffi::F32> sum_g, ffi::ResultBuffer<ffi::F32> sum_g_x_hat,
    int64_t parts) {
  const auto xd = x.dimensions();
  if (xd.size() == 0) return ffi::Error::InvalidArgument("x must have a channel axis");
  const int64_t c_total = xd.back();
  if (auto error = CheckChannels(c_total); error.failure()) return error;
  if (dy.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("x and dy must have the same shape");
  }
  for (const auto* per_channel : {&mean, &inv, &gain, &bias}) {
    if (per_channel->element_count() != c_total) {
      return ffi::Error::InvalidArgument(
          "mean, inv, gain and bias must have one entry per channel");
    }
  }
  if (sum_g->element_count() != c_total || sum_g_x_hat->element_count() != c_total) {
    return ffi::Error::InvalidArgument("the sums must have one entry per channel");
  }
  const GradientSums block{x.typed_data(),    dy.typed_data(),   mean.typed_data(),
                           inv.typed_data(),  gain.typed_data(), bias.typed_data(),
                           c_total};
  SumInParts(pool, x.element_count() / c_total, c_total, parts,
             sum_g->typed_data(), sum_g_x_hat->typed_data(), block);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnJaxChannelMoments, ChannelMomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("parts"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnJaxReluBatchNormGradientSums,
                              ReluBatchNormGradientSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("parts"));
