// Filter gradient of a stride-1 2D convolution, NHWC, float32, on the CPU:
//
//   dw[a, b, i, o] = sum_{n, h, w} x[n, h + a - pad_h, w + b - pad_w, i] g[n, h, w, o]
//
// x: [N, Hx, Wx, Ci], g: [N, Hg, Wg, Co] (the cotangent of the conv output),
// dw: [KH, KW, Ci, Co]; terms whose x index falls outside x are zero padding.
// Co must be a multiple of 16. For every group of output rows (about 128
// pixels) the accumulators of a block of input channels times 1, 2 or 4
// registers of output channels stay in registers while the rows stream
// through once per kernel offset, so x and g are read from memory about once.
// Rows are split into `parts` fixed parts, run on XLA's thread pool, each
// summing into its own dw; the parts are added in order at the end. Also
// here: the flipped, transposed kernel that the input gradient convolves with.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel_chunks.h"
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

// A pair of rows that meet at one kernel row: x_row + shift pixels and g_row.
struct RowPair {
  const float* x_row;
  const float* g_row;
};

// dw_block[c, 0:kLanes kVecs] += sum over pairs and w in [w_lo, w_hi) of
//     x_row[w + shift, c0 + c] g_row[w, o0:o0 + kLanes kVecs]
// Per pixel: kVecs loads of g and kBlock broadcasts of x feed kBlock * kVecs
// FMAs, so wider output blocks need fewer loads per FMA; several row pairs
// per call keep narrow rows from spending their time loading and storing dw.
template <int kBlock, int kVecs>
void AccumulateBlock(const RowPair* pairs, int64_t num_pairs, int64_t c0,
                     int64_t o0, float* dw_block, int64_t w_lo, int64_t w_hi,
                     int64_t shift, int64_t ci, int64_t co) {
  Vec acc[kBlock][kVecs];
  for (int c = 0; c < kBlock; ++c)
    for (int v = 0; v < kVecs; ++v) acc[c][v] = Vec{};
  for (int64_t p = 0; p < num_pairs; ++p) {
    const float* x_row = pairs[p].x_row + c0;
    const float* g_row = pairs[p].g_row + o0;
    for (int64_t w = w_lo; w < w_hi; ++w) {
      Vec g[kVecs];
      for (int v = 0; v < kVecs; ++v)
        g[v] = *reinterpret_cast<const UnalignedVec*>(g_row + w * co + kLanes * v);
      const float* x = x_row + (w + shift) * ci;
      for (int c = 0; c < kBlock; ++c)
        for (int v = 0; v < kVecs; ++v) acc[c][v] += x[c] * g[v];
    }
  }
  for (int c = 0; c < kBlock; ++c)
    for (int v = 0; v < kVecs; ++v)
      *reinterpret_cast<UnalignedVec*>(dw_block + c * co + kLanes * v) += acc[c][v];
}

using BlockFn = void (*)(const RowPair*, int64_t, int64_t, int64_t, float*,
                         int64_t, int64_t, int64_t, int64_t, int64_t);

// kBlockFns<kVecs>[b - 1] handles a block of b input channels.
template <int kVecs, int... kBlocks>
constexpr std::array<BlockFn, sizeof...(kBlocks)> MakeBlockFns(
    std::integer_sequence<int, kBlocks...>) {
  return {AccumulateBlock<kBlocks + 1, kVecs>...};
}

template <int kVecs>
constexpr auto kBlockFns = MakeBlockFns<kVecs>(
    std::make_integer_sequence<int, kAccumulators / kVecs>{});

// Output rows are taken in groups of about kGroupPixels pixels.
constexpr int64_t kGroupPixels = 128;

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
  const int64_t group = std::max<int64_t>(1, kGroupPixels / std::max<int64_t>(s.g_w, 1));
  std::vector<RowPair> pairs(group);
  for (int64_t r0 = row_lo; r0 < row_hi; r0 += group) {
    const int64_t r1 = std::min(row_hi, r0 + group);
    for (int64_t a = 0; a < s.k_h; ++a) {
      int64_t num_pairs = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / s.g_h, h = r % s.g_h;
        const int64_t x_h = h + a - s.pad_h;
        if (x_h < 0 || x_h >= s.x_h) continue;
        pairs[num_pairs++] = {x + (n * s.x_h + x_h) * s.x_w * s.ci,
                              g + (n * s.g_h + h) * s.g_w * s.co};
      }
      if (num_pairs == 0) continue;
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
            fn(pairs.data(), num_pairs, c0, o0, dw_block, w_lo, w_hi, shift,
               s.ci, s.co);
          }
        }
      }
    }
  }
}

ffi::Error ConvFilterGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> g,
                                  ffi::ResultBuffer<ffi::F32> dw,
                                  int64_t pad_h, int64_t pad_w,
                                  int64_t parts) {
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
  const int64_t count = std::clamp<int64_t>(parts, 1, std::max<int64_t>(rows, 1));
  float* out = dw->typed_data();
  std::memset(out, 0, size * sizeof(float));
  std::vector<std::vector<float>> partial(count - 1, std::vector<float>(size));
  fcn_jax::ParallelChunks(pool, count, [&](int64_t t) {
    AccumulateRows(x.typed_data(), g.typed_data(),
                   t == 0 ? out : partial[t - 1].data(), s, rows * t / count,
                   rows * (t + 1) / count);
  });
  for (const auto& part : partial) {
    for (int64_t j = 0; j < size; ++j) out[j] += part[j];
  }
  return ffi::Error::Success();
}

// The kernel of a stride-1 conv's input gradient, a conv of the output
// cotangent: out[a, b, o, i] = w[KH - 1 - a, KW - 1 - b, i, o], copied in
// 32 x 32 tiles. XLA:CPU's own reverse-and-transpose of a [3, 3, 1024, 1024]
// kernel moves under 1 GB/s.
ffi::Error FlippedTransposedKernelImpl(ffi::Buffer<ffi::F32> w,
                                       ffi::ResultBuffer<ffi::F32> out) {
  const auto wd = w.dimensions();
  const auto od = out->dimensions();
  if (wd.size() != 4 || od.size() != 4 || od[0] != wd[0] || od[1] != wd[1] ||
      od[2] != wd[3] || od[3] != wd[2]) {
    return ffi::Error::InvalidArgument("expected w [KH, KW, Ci, Co] -> [KH, KW, Co, Ci]");
  }
  const int64_t k_h = wd[0], k_w = wd[1], ci = wd[2], co = wd[3];
  constexpr int64_t kTile = 32;
  for (int64_t a = 0; a < k_h; ++a) {
    for (int64_t b = 0; b < k_w; ++b) {
      const float* src = w.typed_data() + ((k_h - 1 - a) * k_w + (k_w - 1 - b)) * ci * co;
      float* dst = out->typed_data() + (a * k_w + b) * co * ci;
      for (int64_t i0 = 0; i0 < ci; i0 += kTile) {
        const int64_t i1 = std::min(ci, i0 + kTile);
        for (int64_t o0 = 0; o0 < co; o0 += kTile) {
          const int64_t o1 = std::min(co, o0 + kTile);
          for (int64_t o = o0; o < o1; ++o)
            for (int64_t i = i0; i < i1; ++i) dst[o * ci + i] = src[i * co + o];
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnJaxConvFilterGradient, ConvFilterGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w")
                                  .Attr<int64_t>("parts"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnJaxFlippedTransposedKernel,
                              FlippedTransposedKernelImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
