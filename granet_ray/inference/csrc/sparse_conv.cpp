// Sparse-weight x dense-activation kernels for CPU inference (granet_ray.inference).
//
// One kernel serves every Conv2d (any stride, padding, dilation, groups, kernel shape) and
// Linear layer. The Python side lays the input out as "planes": for a convolution, the
// zero-padded input split into its stride phases, (C, sy, sx, Hs, Ws) per image, so that every
// weight (ci, ky, kx) reads one contiguous run of a plane at a fixed offset; for a Linear
// layer, the transposed input (in_features, N). The weight is CSR over output channels, its
// column index already turned into that element offset. For each output channel and each tile
// of up to 128 output positions (64 without AVX-512) the kernel keeps the accumulators in vector registers and
// streams the row's nonzeros: broadcast w, load the shifted input run, fused multiply-add
// (the "direct sparse convolution" of Park et al. 2017, vectorized over output positions as
// in Elsen et al. 2020). Positions are "wide": Ws per output row, of which the first Wo are
// stored; the rest are never written.
//
// Compiled at first use with the machine's own compiler: AVX-512 or AVX2 paths when the build
// targets them, a portable scalar path otherwise. Threads: OpenMP, as many as the caller asks.

#include <cstdint>
#include <algorithm>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int64_t kTile = 128;   // output positions per register tile: 8 zmm accumulators
#else
constexpr int64_t kTile = 64;    // 8 ymm accumulators (AVX2), or 64 floats (portable)
#endif
constexpr int64_t kBlock = 16;   // output channels per work item

struct Problem {
  const float* x;          // input planes of image 0
  int64_t x_image;         // elements between images in x
  const int64_t* rowptr;   // (m + 1)
  const int64_t* offset;   // (nnz): element offset of each weight's run, in one image
  const float* value;      // (nnz)
  const float* bias;       // (m) or null
  const float* residual;   // added to the output before the ReLU, laid out as y; or null
  bool relu;               // max(0, .) on the output
  float* y;                // output of image 0
  int64_t y_image;         // elements between images in y
  int64_t y_row;           // elements between output channels in y
  int64_t m;               // output channels
  int64_t length;          // wide positions per output channel
  int64_t wide;            // wide row width Ws
  int64_t width;           // stored row width Wo (<= Ws)
};

// dst = relu?(src + res?) over count values; res may be null.
inline void emit(float* dst, const float* src, const float* res, int64_t count, bool relu) {
  if (res == nullptr && !relu) {
    std::memcpy(dst, src, sizeof(float) * count);
  } else if (res == nullptr) {
    for (int64_t i = 0; i < count; ++i) dst[i] = std::max(src[i], 0.0f);
  } else if (relu) {
    for (int64_t i = 0; i < count; ++i) dst[i] = std::max(src[i] + res[i], 0.0f);
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i] + res[i];
  }
}

// Stores n accumulated values of wide positions [p0, p0 + n) into output row `out` (residual
// row `res`, or null), dropping the columns ox >= width of each wide row.
inline void store(const float* acc, int64_t p0, int64_t n, const Problem& pb, float* out,
                  const float* res) {
  if (pb.wide == pb.width) {
    emit(out + p0, acc, res ? res + p0 : nullptr, n, pb.relu);
    return;
  }
  int64_t p = p0;
  const int64_t end = p0 + n;
  while (p < end) {
    const int64_t oy = p / pb.wide;
    const int64_t ox = p - oy * pb.wide;
    const int64_t row_end = p + (pb.wide - ox);
    if (ox < pb.width) {
      const int64_t stop = (p + (pb.width - ox) < end) ? p + (pb.width - ox) : end;
      const int64_t at = oy * pb.width + ox;
      emit(out + at, acc + (p - p0), res ? res + at : nullptr, stop - p, pb.relu);
    }
    p = row_end;
  }
}

#if defined(__AVX512F__)

template <int NV>
inline void tile(const float* x, const Problem& pb, int64_t row, int64_t p0, int64_t n,
                 float* out, const float* res) {
  __m512 acc[NV];
  const float b = pb.bias ? pb.bias[row] : 0.0f;
  for (int v = 0; v < NV; ++v) acc[v] = _mm512_set1_ps(b);
  const int64_t rest = n - 16 * (NV - 1);  // lanes of the last vector, 1..16
  const __mmask16 last = static_cast<__mmask16>((rest >= 16) ? 0xFFFF : ((1u << rest) - 1u));
  const float* base = x + p0;
  for (int64_t k = pb.rowptr[row]; k < pb.rowptr[row + 1]; ++k) {
    const __m512 w = _mm512_set1_ps(pb.value[k]);
    const float* src = base + pb.offset[k];
    for (int v = 0; v < NV - 1; ++v)
      acc[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(src + 16 * v), acc[v]);
    acc[NV - 1] =
        _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(last, src + 16 * (NV - 1)), acc[NV - 1]);
  }
  alignas(64) float buf[16 * NV];
  for (int v = 0; v < NV; ++v) _mm512_store_ps(buf + 16 * v, acc[v]);
  store(buf, p0, n, pb, out, res);
}

inline void run_tile(const float* x, const Problem& pb, int64_t row, int64_t p0, int64_t n,
                     float* out, const float* res) {
  switch ((n + 15) / 16) {
    case 1: tile<1>(x, pb, row, p0, n, out, res); break;
    case 2: tile<2>(x, pb, row, p0, n, out, res); break;
    case 3: tile<3>(x, pb, row, p0, n, out, res); break;
    case 4: tile<4>(x, pb, row, p0, n, out, res); break;
    case 5: tile<5>(x, pb, row, p0, n, out, res); break;
    case 6: tile<6>(x, pb, row, p0, n, out, res); break;
    case 7: tile<7>(x, pb, row, p0, n, out, res); break;
    default: tile<8>(x, pb, row, p0, n, out, res); break;
  }
}

// One output of a matrix-vector product (length 1): gathers 16 inputs per step, so the
// multiply-adds do not wait on each other one nonzero at a time.
inline float dot_row(const float* x, const Problem& pb, int64_t row) {
  int64_t k = pb.rowptr[row];
  const int64_t end = pb.rowptr[row + 1];
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; k + 16 <= end; k += 16) {
    const __m512i i0 = _mm512_loadu_si512(pb.offset + k);
    const __m512i i1 = _mm512_loadu_si512(pb.offset + k + 8);
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pb.value + k), _mm512_i64gather_ps(i0, x, 4), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pb.value + k + 8), _mm512_i64gather_ps(i1, x, 4),
                           acc1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  float sum = 0.0f;
  for (int i = 0; i < 8; ++i) sum += lanes[i];
  for (; k < end; ++k) sum += pb.value[k] * x[pb.offset[k]];
  return sum;
}

constexpr const char* kIsa = "avx512";

#elif defined(__AVX2__)

template <int NV>
inline void tile(const float* x, const Problem& pb, int64_t row, int64_t p0, int64_t n,
                 float* out, const float* res) {
  __m256 acc[NV];
  const float b = pb.bias ? pb.bias[row] : 0.0f;
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_set1_ps(b);
  const int64_t rest = n - 8 * (NV - 1);  // lanes of the last vector, 1..8
  alignas(32) int32_t lanes[8];
  for (int i = 0; i < 8; ++i) lanes[i] = (i < rest) ? -1 : 0;
  const __m256i last = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  const float* base = x + p0;
  for (int64_t k = pb.rowptr[row]; k < pb.rowptr[row + 1]; ++k) {
    const __m256 w = _mm256_set1_ps(pb.value[k]);
    const float* src = base + pb.offset[k];
    for (int v = 0; v < NV - 1; ++v)
      acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(src + 8 * v), acc[v]);
    acc[NV - 1] = _mm256_fmadd_ps(w, _mm256_maskload_ps(src + 8 * (NV - 1), last), acc[NV - 1]);
  }
  alignas(32) float buf[8 * NV];
  for (int v = 0; v < NV; ++v) _mm256_store_ps(buf + 8 * v, acc[v]);
  store(buf, p0, n, pb, out, res);
}

inline void run_tile(const float* x, const Problem& pb, int64_t row, int64_t p0, int64_t n,
                     float* out, const float* res) {
  switch ((n + 7) / 8) {
    case 1: tile<1>(x, pb, row, p0, n, out, res); break;
    case 2: tile<2>(x, pb, row, p0, n, out, res); break;
    case 3: tile<3>(x, pb, row, p0, n, out, res); break;
    case 4: tile<4>(x, pb, row, p0, n, out, res); break;
    case 5: tile<5>(x, pb, row, p0, n, out, res); break;
    case 6: tile<6>(x, pb, row, p0, n, out, res); break;
    case 7: tile<7>(x, pb, row, p0, n, out, res); break;
    default: tile<8>(x, pb, row, p0, n, out, res); break;
  }
}

// One output of a matrix-vector product (length 1), four independent partial sums.
inline float dot_row(const float* x, const Problem& pb, int64_t row) {
  int64_t k = pb.rowptr[row];
  const int64_t end = pb.rowptr[row + 1];
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (; k + 4 <= end; k += 4)
    for (int i = 0; i < 4; ++i) part[i] += pb.value[k + i] * x[pb.offset[k + i]];
  float sum = (part[0] + part[1]) + (part[2] + part[3]);
  for (; k < end; ++k) sum += pb.value[k] * x[pb.offset[k]];
  return sum;
}

constexpr const char* kIsa = "avx2";

#else

// Portable path: fixed-size inner loops the compiler may vectorize for the target it has.
inline void run_tile(const float* x, const Problem& pb, int64_t row, int64_t p0, int64_t n,
                     float* out, const float* res) {
  float acc[kTile];
  const float b = pb.bias ? pb.bias[row] : 0.0f;
  for (int64_t i = 0; i < n; ++i) acc[i] = b;
  const float* base = x + p0;
  for (int64_t k = pb.rowptr[row]; k < pb.rowptr[row + 1]; ++k) {
    const float w = pb.value[k];
    const float* src = base + pb.offset[k];
    for (int64_t i = 0; i < n; ++i) acc[i] += w * src[i];
  }
  store(acc, p0, n, pb, out, res);
}

// One output of a matrix-vector product (length 1), four independent partial sums.
inline float dot_row(const float* x, const Problem& pb, int64_t row) {
  int64_t k = pb.rowptr[row];
  const int64_t end = pb.rowptr[row + 1];
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (; k + 4 <= end; k += 4)
    for (int i = 0; i < 4; ++i) part[i] += pb.value[k + i] * x[pb.offset[k + i]];
  float sum = (part[0] + part[1]) + (part[2] + part[3]);
  for (; k < end; ++k) sum += pb.value[k] * x[pb.offset[k]];
  return sum;
}

constexpr const char* kIsa = "portable";

#endif

}  // namespace

extern "C" {

// Which vector path this build took: "avx512", "avx2" or "portable".
const char* granet_isa() { return kIsa; }

// y[n, row, :] (cropped from wide positions) = bias[row] + sum over the row's nonzeros k of
// value[k] * x[n][offset[k] : offset[k] + length], for n < images and row < m; then plus the
// residual (laid out as y) where given, then max(0, .) where relu.
void granet_sparse_conv(const float* x, int64_t x_image, const int64_t* rowptr,
                        const int64_t* offset, const float* value, const float* bias,
                        const float* residual, int relu, float* y,
                        int64_t y_image, int64_t y_row, int64_t m, int64_t length, int64_t wide,
                        int64_t width, int64_t images, int threads) {
  const Problem pb{x,      x_image, rowptr, offset, value, bias, residual, relu != 0,
                   y,      y_image, y_row,  m,      length, wide, width};
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  if (length == 1) {  // a matrix-vector product per image
    const int64_t items = images * blocks;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t block = item % blocks;
      const int64_t image = item / blocks;
      const int64_t row_end = (block + 1) * kBlock < m ? (block + 1) * kBlock : m;
      for (int64_t row = block * kBlock; row < row_end; ++row) {
        const int64_t at = image * y_image + row * y_row;
        float v = (bias ? bias[row] : 0.0f) + dot_row(x + image * x_image, pb, row);
        if (residual) v += residual[at];
        y[at] = relu ? std::max(v, 0.0f) : v;
      }
    }
    return;
  }
  const int64_t tiles = (length + kTile - 1) / kTile;
  const int64_t items = images * tiles * blocks;
  // Work items (image, tile, block), block fastest: a thread's consecutive items reuse the
  // same input tile from cache across output channels.
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t block = item % blocks;
    const int64_t t = (item / blocks) % tiles;
    const int64_t image = item / (blocks * tiles);
    const float* xi = x + image * x_image;
    const int64_t p0 = t * kTile;
    const int64_t n = (length - p0 < kTile) ? length - p0 : kTile;
    const int64_t row_end = (block + 1) * kBlock < m ? (block + 1) * kBlock : m;
    for (int64_t row = block * kBlock; row < row_end; ++row) {
      const int64_t at = image * y_image + row * y_row;
      run_tile(xi, pb, row, p0, n, y + at, residual ? residual + at : nullptr);
    }
  }
}

// The kernel's input layout in one pass: out[n, c, py, px, a, b] = x[n, c, py + step_y * a -
// top, px + step_x * b - left] for py < phases_y, px < phases_x, zero outside x; x is read
// through its strides (any memory format).
void granet_layout(const float* x, int64_t stride_n, int64_t stride_c, int64_t stride_h,
                   int64_t stride_w, int64_t images, int64_t channels, int64_t height,
                   int64_t width, int64_t phases_y, int64_t phases_x, int64_t step_y,
                   int64_t step_x, int64_t plane_h, int64_t plane_w, int64_t top, int64_t left,
                   float* out, int threads) {
  const int64_t rows = images * channels * phases_y * phases_x * plane_h;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 64)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = r % plane_h;
    const int64_t px = (r / plane_h) % phases_x;
    const int64_t py = (r / (plane_h * phases_x)) % phases_y;
    const int64_t c = (r / (plane_h * phases_x * phases_y)) % channels;
    const int64_t n = r / (plane_h * phases_x * phases_y * channels);
    float* dst = out + r * plane_w;
    const int64_t iy = py + step_y * a - top;
    if (iy < 0 || iy >= height) {
      std::memset(dst, 0, sizeof(float) * plane_w);
      continue;
    }
    const float* src = x + n * stride_n + c * stride_c + iy * stride_h;
    // the columns b with 0 <= px + step_x * b - left < width
    const int64_t lead = left - px;
    int64_t first = lead > 0 ? (lead + step_x - 1) / step_x : 0;
    int64_t stop = (width + lead + step_x - 1) / step_x;
    if (stop > plane_w) stop = plane_w;
    if (first > stop) first = stop;
    std::memset(dst, 0, sizeof(float) * first);
    const float* in = src + (px + step_x * first - left) * stride_w;
    if (step_x == 1 && stride_w == 1) {
      std::memcpy(dst + first, in, sizeof(float) * (stop - first));
    } else {
      int64_t b = first;
#if defined(__AVX512F__)
      if (step_x == 2 && stride_w == 1) {  // deinterleave 32 inputs into 16 outputs
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                               26, 28, 30);
        const int64_t ix = px + 2 * first - left;  // input column of output b = first
        for (; b + 16 <= stop && ix + 2 * (b - first) + 32 <= width; b += 16, in += 32) {
          const __m512 lo = _mm512_loadu_ps(in);
          const __m512 hi = _mm512_loadu_ps(in + 16);
          _mm512_storeu_ps(dst + b, _mm512_permutex2var_ps(lo, even, hi));
        }
      }
#endif
      const int64_t step = step_x * stride_w;
      for (; b < stop; ++b, in += step) dst[b] = *in;
    }
    std::memset(dst + stop, 0, sizeof(float) * (plane_w - stop));
  }
}

}  // extern "C"
