// Stride-1 2D convolution, NHWC, float32, on the CPU:
//
//   y[n, h, w, o] = sum_{a, b, i} x[n, h + a - pad_h, w + b - pad_w, i] k[a, b, i, o]
//
// x: [N, Hx, Wx, Ci], k: [KH, KW, Ci, Co], y: [N, Hy, Wy, Co]; x indices
// outside x are zero padding (pad_h, pad_w on the low side; the high side
// follows from Hy, Wy). Co must be a multiple of 16. It serves both the
// forward pass and the input gradient (a conv of the output cotangent with
// the flipped, transposed kernel).
//
// XLA:CPU lowers a conv to image patches packed for a GEMM; with 16-64
// channels the packing costs as much as the multiply. Here a block of output
// pixels of one row times 1, 2 or 4 registers of output channels stays in
// registers while every kernel tap and input channel adds one broadcast of x
// times one register of k, so x is read from cache, never copied into
// patches. Output rows are taken in chunks whose input rows, zero-padded, are
// copied into a per-thread buffer (in cache), so the inner loop has no bounds
// checks. Chunks run on XLA's own thread pool (see parallel_chunks.h).
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

// Registers of 16 float lanes with AVX-512 (32 registers), else 8 (AVX2, 16).
// With one register of output channels the block is kept at 16 pixels: wider
// blocks measured at half the speed (256x256, 16 -> 16 channels).
#ifdef __AVX512F__
#define FCN_JAX_CONV_LANES 16
constexpr int kAccumulators = 28;
constexpr int kMaxPixelsOneVec = 16;
#else
#define FCN_JAX_CONV_LANES 8
constexpr int kAccumulators = 12;
constexpr int kMaxPixelsOneVec = 12;
#endif
constexpr int kLanes = FCN_JAX_CONV_LANES;
typedef float Vec __attribute__((vector_size(FCN_JAX_CONV_LANES * 4)));
typedef float UnalignedVec
    __attribute__((vector_size(FCN_JAX_CONV_LANES * 4), aligned(4)));

// Output rows per chunk of padded input rows.
constexpr int64_t kChunkRows = 8;

struct Geometry {
  int64_t n, x_h, x_w, y_h, y_w, ci, co, k_h, k_w, pad_h, pad_w;
};

// y[p, 0:kLanes kVecs] for kPixels consecutive output pixels, from padded
// input rows starting at `rows` (pixel p's window starts at rows + p ci) and
// one block of the packed kernel, [KH, KW, Ci, kLanes kVecs].
template <int kPixels, int kVecs>
void OutputBlock(const float* rows, int64_t row_stride, const float* k,
                 float* y, int64_t k_h, int64_t k_w, int64_t ci, int64_t co) {
  constexpr int64_t kWidth = kLanes * kVecs;
  Vec acc[kPixels][kVecs];
  for (int p = 0; p < kPixels; ++p)
    for (int v = 0; v < kVecs; ++v) acc[p][v] = Vec{};
  for (int64_t a = 0; a < k_h; ++a) {
    for (int64_t b = 0; b < k_w; ++b) {
      const float* x = rows + a * row_stride + b * ci;
      const float* k_tap = k + (a * k_w + b) * ci * kWidth;
      for (int64_t i = 0; i < ci; ++i) {
        Vec weights[kVecs];
        for (int v = 0; v < kVecs; ++v)
          weights[v] = *reinterpret_cast<const UnalignedVec*>(
              k_tap + i * kWidth + kLanes * v);
        for (int p = 0; p < kPixels; ++p) {
          const float value = x[p * ci + i];
          for (int v = 0; v < kVecs; ++v) acc[p][v] += value * weights[v];
        }
      }
    }
  }
  for (int p = 0; p < kPixels; ++p)
    for (int v = 0; v < kVecs; ++v)
      *reinterpret_cast<UnalignedVec*>(y + p * co + kLanes * v) = acc[p][v];
}

using BlockFn = void (*)(const float*, int64_t, const float*, float*, int64_t,
                         int64_t, int64_t, int64_t);

// kBlockFns<kVecs>[p - 1] handles a block of p pixels.
template <int kVecs, int... kPixels>
constexpr std::array<BlockFn, sizeof...(kPixels)> MakeBlockFns(
    std::integer_sequence<int, kPixels...>) {
  return {OutputBlock<kPixels + 1, kVecs>...};
}

template <int kVecs>
constexpr int kMaxPixels = kVecs == 1 ? kMaxPixelsOneVec : kAccumulators / kVecs;

template <int kVecs>
constexpr auto kBlockFns =
    MakeBlockFns<kVecs>(std::make_integer_sequence<int, kMaxPixels<kVecs>>{});

// Copies the input rows of output rows [h0, h0 + rows - k_h + 1) of image n
// into buffer, zero-padded to y_w + k_w - 1 pixels per row.
void CopyPaddedRows(const float* x, const Geometry& s, int64_t n, int64_t h0,
                    int64_t rows, float* buffer) {
  const int64_t width = s.y_w + s.k_w - 1;
  const int64_t c_lo = std::min(s.pad_w, width);
  const int64_t c_hi = std::clamp<int64_t>(s.pad_w + s.x_w, c_lo, width);
  for (int64_t j = 0; j < rows; ++j) {
    float* dst = buffer + j * width * s.ci;
    const int64_t x_h = h0 + j - s.pad_h;
    if (x_h < 0 || x_h >= s.x_h) {
      std::memset(dst, 0, width * s.ci * sizeof(float));
      continue;
    }
    const float* src = x + ((n * s.x_h + x_h) * s.x_w + c_lo - s.pad_w) * s.ci;
    std::memset(dst, 0, c_lo * s.ci * sizeof(float));
    std::memcpy(dst + c_lo * s.ci, src, (c_hi - c_lo) * s.ci * sizeof(float));
    std::memset(dst + c_hi * s.ci, 0, (width - c_hi) * s.ci * sizeof(float));
  }
}

// k [KH, KW, Ci, Co] -> [Co / width, KH, KW, Ci, width]: each block of
// output channels reads its weights in order. Read in place, rows of k
// Co floats apart alias to a few cache sets once Co reaches 256 (2-3x slower).
std::vector<float> PackKernel(const float* k, const Geometry& s, int64_t width) {
  const int64_t rows = s.k_h * s.k_w * s.ci;
  std::vector<float> packed(rows * s.co);
  for (int64_t o0 = 0; o0 < s.co; o0 += width) {
    float* dst = packed.data() + o0 * rows;
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + r * width, k + r * s.co + o0, width * sizeof(float));
  }
  return packed;
}

// Output rows [h0, h1) of image n; k packed by PackKernel.
template <int kVecs>
void ConvRows(const float* x, const float* k, float* y, const Geometry& s,
              int64_t n, int64_t h0, int64_t h1) {
  const int64_t width = s.y_w + s.k_w - 1;
  const int64_t row_stride = width * s.ci;
  thread_local std::vector<float> buffer;
  buffer.resize((h1 - h0 + s.k_h - 1) * row_stride);
  CopyPaddedRows(x, s, n, h0, h1 - h0 + s.k_h - 1, buffer.data());
  // Pixel blocks of nearly equal size, so no row ends in a sliver.
  const int64_t blocks = (s.y_w + kMaxPixels<kVecs> - 1) / kMaxPixels<kVecs>;
  // Each block of output channels runs over the whole chunk, so its part of
  // the kernel is read from cache while it lasts.
  for (int64_t o0 = 0; o0 < s.co; o0 += kLanes * kVecs) {
    for (int64_t h = h0; h < h1; ++h) {
      float* y_row = y + (n * s.y_h + h) * s.y_w * s.co;
      const float* rows = buffer.data() + (h - h0) * row_stride;
      for (int64_t j = 0, w0 = 0; j < blocks; ++j) {
        const int64_t w1 = s.y_w * (j + 1) / blocks;
        kBlockFns<kVecs>[w1 - w0 - 1](rows + w0 * s.ci, row_stride,
                                      k + o0 * s.k_h * s.k_w * s.ci,
                                      y_row + w0 * s.co + o0, s.k_h, s.k_w,
                                      s.ci, s.co);
        w0 = w1;
      }
    }
  }
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                    int64_t pad_h, int64_t pad_w) {
  const auto xd = x.dimensions();
  const auto kd = k.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("x, k and y must have rank 4");
  }
  const Geometry s{xd[0], xd[1], xd[2], yd[1], yd[2], xd[3],
                   kd[3], kd[0], kd[1], pad_h, pad_w};
  // Any output size is valid: rows and columns past x read zeros.
  if (yd[0] != s.n || kd[2] != s.ci || yd[3] != s.co || pad_h < 0 ||
      pad_w < 0 || s.y_h < 1 || s.y_w < 1) {
    return ffi::Error::InvalidArgument("x, k and y shapes do not match");
  }
  if (s.co % 16 != 0) {
    return ffi::Error::InvalidArgument("output channels must be a multiple of 16");
  }
  const int vecs = s.co % (4 * kLanes) == 0   ? 4
                   : s.co % (2 * kLanes) == 0 ? 2
                                              : 1;
  const auto run = vecs == 4 ? ConvRows<4> : vecs == 2 ? ConvRows<2> : ConvRows<1>;
  const std::vector<float> packed = PackKernel(k.typed_data(), s, kLanes * vecs);
  const int64_t chunks_per_image = (s.y_h + kChunkRows - 1) / kChunkRows;
  fcn_jax::ParallelChunks(pool, s.n * chunks_per_image, [&](int64_t chunk) {
    const int64_t n = chunk / chunks_per_image;
    const int64_t h0 = chunk % chunks_per_image * kChunkRows;
    run(x.typed_data(), packed.data(), y->typed_data(), s, n, h0,
        std::min(s.y_h, h0 + kChunkRows));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcnJaxConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));
