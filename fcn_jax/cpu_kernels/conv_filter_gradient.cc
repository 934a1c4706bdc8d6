// Filter gradient of a stride-1 2D convolution, NHWC, float32, on the CPU:
//
//   dw[a, b, i, o] = sum_{n, h, w} x[n, h + a - pad_h, w + b - pad_w, i] g[n, h, w, o]
//
// x: [N, Hx, Wx, Ci], g: [N, Hg, Wg, Co] (the cotangent of the conv output),
// dw: [KH, KW, Ci, Co]; terms whose x index falls outside x are zero padding.
// Co must be a multiple of 16. For every output row the accumulators of a
// block of input channels times 1, 2 or 4 registers of output channels stay in registers while
// the row streams through once per kernel offset, so x and g are read from
// memory about once. Rows are split among `threads` threads, each summing
// into its own dw, added at the end.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One register of floats: 16 lanes with AVX-512 (32 registers), else 8 (AVX2,
// 16 registers). A register block holds kAccumulators of them.
#ifdef __AVX512F__
#define FCN_JAX_LANES 16
constexpr int kAccumulators = 16;
#else
#define FCN_JAX_LANES 8
constexpr int kAccumulators = 12;
#endif
constexpr int kLanes = FCN_JAX_LANES;
typedef float Vec __attribute__((vector_size(FCN_JAX_LANES * 4)));
typedef float UnalignedVec
    __attribute__((vector_size(FCN_JAX_LANES * 4), aligned(4)));

struct Geometry {
  int64_t n, x_h, x_w, g_h, g_w, ci, co, k_h, k_w, pad_h, pad_w;
};

// dw_block[c, 0:kLanes kVecs] += sum_{w in [w_lo, w_hi)} x_row[w + shift, c] g_row[w, 0:kLanes kVecs]
// Per pixel: kVecs loads of g and kBlock broadcasts of x feed kBlock * kVecs
// FMAs, so wider output blocks need fewer loads per FMA.
template <int kBlock, int kVecs>
void AccumulateBlock(const float* x_row, const float* g_row, float* dw_block,
                     int64_t w_lo, int64_t w_hi, int64_t shift, int64_t ci,
                     int64_t co) {
  Vec acc[kBlock][kVecs];
  for (int c = 0; c < kBlock; ++c)
    for (int v = 0; v < kVecs; ++v) acc[c][v] = Vec{};
  for (int64_t w = w_lo; w < w_hi; ++w) {
    Vec g[kVecs];
    for (int v = 0; v < kVecs; ++v)
      g[v] = *reinterpret_cast<const UnalignedVec*>(g_row + w * co + kLanes * v);
    const float* x = x_row + (w + shift) * ci;
    for (int c = 0; c < kBlock; ++c)
      for (int v = 0; v < kVecs; ++v) acc[c][v] += x[c] * g[v];
  }
  for (int c = 0; c < kBlock; ++c)
    for (int v = 0; v < kVecs; ++v)
      *reinterpret_cast<UnalignedVec*>(dw_block + c * co + kLanes * v) += acc[c][v];
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t,
                         int64_t, int64_t, int64_t);

// kBlockFns<kVecs>[b - 1] handles a block of b input channels.
template <int kVecs, int... kBlocks>
constexpr std::array<BlockFn, sizeof...(kBlocks)> MakeBlockFns(
    std::integer_sequence<int, kBlocks...>) {
  return {AccumulateBlock<kBlocks + 1, kVecs>...};
}

template <int kVecs>
constexpr auto kBlockFns = MakeBlockFns<kVecs>(
    std::make_integer_sequence<int, kAccumulators / kVecs>{});

void AccumulateRows(const float* x, const float* g, float* dw,
                    const Geometry& s, int64_t row_lo, int64_t row_hi) {
  // As many output registers per block as divide Co, up to 4.
  const int vecs = s.co % (4 * kLanes) == 0   ? 4
                   : s.co % (2 * kLanes) == 0 ? 2
                                              : 1;
  const BlockFn* block_fns = vecs == 4   ? kBlockFns<4>.data()
                             : vecs == 2 ? kBlockFns<2>.data()
                                         : kBlockFns<1>.data();
  const int64_t channel_block = kAccumulators / vecs;
  for (int64_t r = row_lo; r < row_hi; ++r) {
    const int64_t n = r / s.g_h, h = r % s.g_h;
    const float* g_row = g + (n * s.g_h + h) * s.g_w * s.co;
    for (int64_t a = 0; a < s.k_h; ++a) {
      const int64_t x_h = h + a - s.pad_h;
      if (x_h < 0 || x_h >= s.x_h) continue;
      const float* x_row = x + (n * s.x_h + x_h) * s.x_w * s.ci;
      for (int64_t b = 0; b < s.k_w; ++b) {
        const int64_t shift = b - s.pad_w;
        const int64_t w_lo = std::max<int64_t>(0, -shift);
        const int64_t w_hi = std::min<int64_t>(s.g_w, s.x_w - shift);
        if (w_lo >= w_hi) continue;
        for (int64_t c0 = 0; c0 < s.ci; c0 += channel_block) {
          const int64_t block = std::min<int64_t>(channel_block, s.ci - c0);
          const BlockFn fn = block_fns[block - 1];
          for (int64_t o0 = 0; o0 < s.co; o0 += kLanes * vecs) {
            float* dw_block = dw + ((a * s.k_w + b) * s.ci + c0) * s.co + o0;
            fn(x_row + c0, g_row + o0, dw_block, w_lo, w_hi, shift, s.ci,
               s.co);
          }
        }
      }
    }
  }
}

ffi::Error ConvFilterGradientImpl(ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> g,
                                  ffi::ResultBuffer<ffi::F32> dw,
                                  int64_t pad_h, int64_t pad_w,
                                  int64_t threads) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4) {
    return ffi::Error::InvalidArgument("x, g and dw must have rank 4");
  }
  const Geometry s{xd[0], xd[1], xd[2], gd[1], gd[2], xd[3],
                   gd[3], wd[0], wd[1], pad_h, pad_w};
  if (gd[0] != s.n || wd[2] != s.ci || wd[3] != s.co) {
    return ffi::Error::InvalidArgument("x, g and dw shapes do not match");
  }
  if (s.co % 16 != 0) {
    return ffi::Error::InvalidArgument("output channels must be a multiple of 16");
  }
  const int64_t size = s.k_h * s.k_w * s.ci * s.co;
  const int64_t rows = s.n * s.g_h;
  const int64_t count = std::clamp<int64_t>(threads, 1, std::max<int64_t>(rows, 1));
  float* out = dw->typed_data();
  std::memset(out, 0, size * sizeof(float));
  std::vector<std::vector<float>> partial(count - 1, std::vector<float>(size));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < count; ++t) {
    pool.emplace_back(AccumulateRows, x.typed_data(), g.typed_data(),
                      partial[t - 1].data(), std::cref(s), rows * t / count,
                      rows * (t + 1) / count);
  }
  AccumulateRows(x.typed_data(), g.typed_data(), out, s, 0, rows / count);
  for (auto& thread : pool) thread.join();
  for (const auto& part : partial) {
    for (int64_t j = 0; j < size; ++j) out[j] += part[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnJaxConvFilterGradient, ConvFilterGradientImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w")
                                  .Attr<int64_t>("threads"));
