// Fixed-point quantize of one float32 tensor with one power-of-two scale, in
// one op: the auto scale's reduction, the quantize and the clip test in two
// passes over memory, where the plain TensorFlow ops take about twenty ops.
//
// The values are those of nics_fix/quant.py bit for bit (the tests compare
// them on NaN, Inf, -0, subnormals and every width):
//   auto scale  s = ceil(log2(max |x| over finite x)), clamped to [-94, 126]
//   y           = round_half_even(clip(x, -2^s, 2^s - step) / step) * step
//   all_inside  = no element is NaN or outside [-2^s, 2^s - step]
// Widths 2..24 only: clipping first keeps |x / step| <= 2^23, where rounding
// to an integer is exact either way it is done: vroundps on AVX2, elsewhere
// adding and subtracting 2^23 (ties to even in the default rounding mode).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/tensor_util.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

constexpr int kMinScale = -94;
constexpr int kMaxScale = 126;
constexpr int64_t kChunk = 4096;  // elements per shard: 16 KiB, read once into L1 in auto mode

float Pow2(int e) {  // exact 2^e for e in [-126, 127]
  uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

int CeilLog2Clamped(float m) {  // ceil(log2(m)) for m clamped to [2^-94, 2^126]
  const float lo = Pow2(kMinScale), hi = Pow2(kMaxScale);
  if (!(m >= lo)) m = lo;  // also 0, -inf and NaN
  if (m > hi) m = hi;
  uint32_t bits;
  std::memcpy(&bits, &m, sizeof(bits));
  return static_cast<int>(((bits + 0x7FFFFFu) & 0x7F800000u) >> 23) - 127;
}

// SIMD through GCC/Clang vector extensions, no intrinsics: 4 float lanes (16
// bytes) runs on every target; on x86-64 the same code is also compiled for
// AVX2 with 8 lanes and chosen at run time, so one build works on every node
// of a cluster whatever its CPU.
// Forced: a vector function must be compiled inside its target-specific caller.
#define NF_INLINE inline __attribute__((always_inline))

// What the lanes need of their element type: the integer of the same width
// (for the sign bit) and 2^(mantissa bits), the number that rounds when added.
template <typename T>
struct Element;
template <>
struct Element<float> {
  typedef int32_t Int;
  static constexpr float kRoundingMagic = 8388608.0f;  // 2^23
};
template <>
struct Element<double> {
  typedef int64_t Int;
  static constexpr double kRoundingMagic = 4503599627370496.0;  // 2^52
};

// N lanes of T, and the same-width integers their compares give.
template <typename T, int N>
struct Vec {
  typedef T Values __attribute__((vector_size(sizeof(T) * N)));
  typedef typename Element<T>::Int Ints __attribute__((vector_size(sizeof(T) * N)));
};

template <typename V>
NF_INLINE V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Every lane set to f, for constants (the format's bounds and steps, +-Inf,
// the rounding magic, a sign bit) and running extremes: never for data, since
// adding -0 to zero lanes gives +0. Data lanes are loaded or set one by one.
// GCC makes this one add and one broadcast outside the loops; exact forms
// (f - V{}, a loop over the lanes) rebuilt the vectors inside them.
template <typename V, typename T>
NF_INLINE V Splat(T f) {
  V v = {};
  return v + f;
}

struct Extremes {
  float max = -std::numeric_limits<float>::infinity();
  float min = std::numeric_limits<float>::infinity();
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// vroundps/vroundpd: to nearest, ties to even, -0 kept, NaN kept, no
// exception flags. Through pointers: clang refuses 256-bit vector arguments
// between functions that disagree on AVX, even where the call is inlined.
__attribute__((target("avx2"))) inline void RoundAvx(const Vec<float, 8>::Values* s, Vec<float, 8>::Values* out) {
  *out = (Vec<float, 8>::Values)_mm256_round_ps((__m256)*s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
__attribute__((target("avx2"))) inline void RoundAvx(const Vec<double, 4>::Values* s, Vec<double, 4>::Values* out) {
  *out = (Vec<double, 4>::Values)_mm256_round_pd((__m256d)*s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

// Round half to even, lane by lane, for |s| below 2^(mantissa bits), keeping
// the sign (-0.3 gives -0). A 256-bit vector (only ever inlined into the
// target("avx2") functions) is one vroundps/vroundpd; the portable form adds
// and subtracts the magic number to |s|, which rounds ties to even in the
// default mode. Every rounding in this file goes through here.
template <typename T, int N>
NF_INLINE typename Vec<T, N>::Values RoundHalfEven(typename Vec<T, N>::Values s) {
  typedef typename Vec<T, N>::Values Values;
  typedef typename Vec<T, N>::Ints Ints;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if constexpr (sizeof(Values) == 32) {
    Values out;
    RoundAvx(&s, &out);
    return out;
  }
#endif
  const Ints sign_bit = Splat<Ints>(std::numeric_limits<typename Element<T>::Int>::min());
  const Ints sign = (Ints)s & sign_bit;  // a vector cast keeps the bits
  const Values magnitude = (Values)((Ints)s & ~sign_bit);
  const Values magic = Splat<Values>(Element<T>::kRoundingMagic);
  const Values rounded = (magnitude + magic) - magic;
  return (Values)((Ints)rounded | sign);
}

// round_half_even(clip(v, lo, hi) * inv_step) * step, lane by lane; NaN stays
// NaN (its compares are false) and -0 stays -0 (the sign is put back).
// ``clipped`` is set to all ones in the lanes that are NaN or were clipped.
template <typename T, int N>
NF_INLINE typename Vec<T, N>::Values QuantizeLanesV(typename Vec<T, N>::Values v, typename Vec<T, N>::Values lo,
                                                 typename Vec<T, N>::Values hi, typename Vec<T, N>::Values step,
                                                 typename Vec<T, N>::Values inv_step,
                                                 typename Vec<T, N>::Ints* clipped) {
  typedef typename Vec<T, N>::Values Values;
  Values c = v < lo ? lo : v;
  c = c > hi ? hi : c;
  *clipped = c != v;  // also NaN: it never equals itself
  const Values s = c * inv_step;  // exact: a power of two, and |s| <= 2^23
  return RoundHalfEven<T, N>(s) * step;
}

template <int N>
NF_INLINE typename Vec<float, N>::Values QuantizeLanes(typename Vec<float, N>::Values v, float low, float high,
                                                   float step, float inv_step, typename Vec<float, N>::Ints* clipped) {
  typedef typename Vec<float, N>::Values Floats;
  return QuantizeLanesV<float, N>(v, Splat<Floats>(low), Splat<Floats>(high), Splat<Floats>(step),
                                  Splat<Floats>(inv_step), clipped);
}

// The same for one element (the channels left over after the full lanes of a
// row), through one lane; ``outside`` counts it when it is NaN or clipped.
template <typename T>
NF_INLINE T QuantizeOne(T v, T low, T high, T step, T inv_step, int64_t* outside) {
  typedef typename Vec<T, 1>::Values One;
  typename Vec<T, 1>::Ints clipped;
  // Braces, not One{} + v: adding to a zero lane would turn -0 into +0.
  const One q = QuantizeLanesV<T, 1>(One{v}, One{low}, One{high}, One{step}, One{inv_step}, &clipped);
  *outside += clipped[0] != 0;
  return q[0];
}

// Any lane set in ``mask`` (all ones or zero per lane), as 0 or 1.
template <typename Ints>
NF_INLINE int64_t AnySet(Ints mask, int lanes) {
  int32_t any = 0;
  for (int k = 0; k < lanes; ++k) any |= mask[k];
  return any != 0;
}

// Quantizes x[0, n) into y; returns nonzero when an element is NaN or clipped.
// With ``kExtremes``, also the max and min of the non-NaN elements of x, in
// the same pass (every compare with NaN is false); without ``kQuantize``, only those.
template <int N, bool kExtremes, bool kQuantize = true>
NF_INLINE int64_t ChunkQuantizeN(const float* x, float* y, int64_t n, float low, float high, float step,
                              float inv_step, Extremes* extremes) {
  typedef typename Vec<float, N>::Values Floats;
  typedef typename Vec<float, N>::Ints Ints;
  Ints outside = Ints{}, clipped;
  Floats mx = Splat<Floats>(-std::numeric_limits<float>::infinity()), mn = -mx;
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const Floats v = Load<Floats>(x + i);
    if constexpr (kExtremes) {
      mx = v > mx ? v : mx;
      mn = v < mn ? v : mn;
    }
    if constexpr (kQuantize) {
      const Floats q = QuantizeLanes<N>(v, low, high, step, inv_step, &clipped);
      outside |= clipped;
      std::memcpy(y + i, &q, sizeof(q));
    }
  }
  if constexpr (kQuantize) {
    if (i < n) {  // the tail, through the same lanes (zeros in the unused ones are inside)
      Floats v = Splat<Floats>(0.0f);
      for (int64_t k = i; k < n; ++k) v[k - i] = x[k];
      const Floats q = QuantizeLanes<N>(v, low, high, step, inv_step, &clipped);
      outside |= clipped;
      for (int64_t k = i; k < n; ++k) y[k] = q[k - i];
    }
  }
  // The tail's extremes read x after y was written: the fused form (both flags)
  // never runs in place (the callers take the extremes-only form there).
  if constexpr (kExtremes) {
    Extremes out;
    for (int k = 0; k < N; ++k) {
      out.max = mx[k] > out.max ? mx[k] : out.max;
      out.min = mn[k] < out.min ? mn[k] : out.min;
    }
    for (; i < n; ++i) {
      out.max = x[i] > out.max ? x[i] : out.max;
      out.min = x[i] < out.min ? x[i] : out.min;
    }
    *extremes = out;
  }
  return AnySet(outside, N);
}

// One scale per channel of the last axis: ``rows`` rows of ``C`` channels.
// The formats of the channels, as arrays the lanes load side by side.
struct ChannelGrids {
  std::vector<float> low, high, step, inv_step;
};

// Max and min of each channel over the rows, into mx/mn (non-NaN elements only).
template <int N>
NF_INLINE void RowsExtremesN(const float* x, int64_t rows, int64_t C, float* mx, float* mn) {
  typedef typename Vec<float, N>::Values Floats;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
    int64_t c = 0;
    for (; c + N <= C; c += N) {
      const Floats v = Load<Floats>(row + c);
      Floats a = Load<Floats>(mx + c), b = Load<Floats>(mn + c);
      a = v > a ? v : a;
      b = v < b ? v : b;
      std::memcpy(mx + c, &a, sizeof(a));
      std::memcpy(mn + c, &b, sizeof(b));
    }
    for (; c < C; ++c) {
      mx[c] = row[c] > mx[c] ? row[c] : mx[c];
      mn[c] = row[c] < mn[c] ? row[c] : mn[c];
    }
  }
}

// Quantizes the rows channel by channel; returns nonzero when an element is NaN or clipped.
template <int N>
NF_INLINE int64_t RowsQuantizeN(const float* x, float* y, int64_t rows, int64_t C, const ChannelGrids& g) {
  typedef typename Vec<float, N>::Values Floats;
  typedef typename Vec<float, N>::Ints Ints;
  Ints outside = Ints{}, clipped;
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
    float* out = y + r * C;
    int64_t c = 0;
    for (; c + N <= C; c += N) {
      const Floats q = QuantizeLanesV<float, N>(Load<Floats>(row + c), Load<Floats>(g.low.data() + c),
                                                Load<Floats>(g.high.data() + c), Load<Floats>(g.step.data() + c),
                                                Load<Floats>(g.inv_step.data() + c), &clipped);
      outside |= clipped;
      std::memcpy(out + c, &q, sizeof(q));
    }
    for (; c < C; ++c) out[c] = QuantizeOne(row[c], g.low[c], g.high[c], g.step[c], g.inv_step[c], &total);
  }
  return total + AnySet(outside, N);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) Extremes ChunkExtremesAvx2(const float* x, int64_t n) {
  Extremes out;
  ChunkQuantizeN<8, true, false>(x, nullptr, n, 0, 0, 0, 0, &out);
  return out;
}
__attribute__((target("avx2"))) int64_t ChunkQuantizeAvx2(const float* x, float* y, int64_t n, float low,
                                                          float high, float step, float inv_step,
                                                          Extremes* extremes) {
  return extremes ? ChunkQuantizeN<8, true>(x, y, n, low, high, step, inv_step, extremes)
                  : ChunkQuantizeN<8, false>(x, y, n, low, high, step, inv_step, nullptr);
}
__attribute__((target("avx2"))) void RowsExtremesAvx2(const float* x, int64_t rows, int64_t C, float* mx,
                                                     float* mn) {
  RowsExtremesN<8>(x, rows, C, mx, mn);
}
__attribute__((target("avx2"))) int64_t RowsQuantizeAvx2(const float* x, float* y, int64_t rows, int64_t C,
                                                         const ChannelGrids& g) {
  return RowsQuantizeN<8>(x, y, rows, C, g);
}
bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

void RowsExtremes(const float* x, int64_t rows, int64_t C, float* mx, float* mn, bool portable) {
#ifdef __x86_64__
  if (!portable && HasAvx2()) return RowsExtremesAvx2(x, rows, C, mx, mn);
#endif
  RowsExtremesN<4>(x, rows, C, mx, mn);
}

int64_t RowsQuantize(const float* x, float* y, int64_t rows, int64_t C, const ChannelGrids& g, bool portable) {
#ifdef __x86_64__
  if (!portable && HasAvx2()) return RowsQuantizeAvx2(x, y, rows, C, g);
#endif
  return RowsQuantizeN<4>(x, y, rows, C, g);
}

// The constants of one format (bit width, scale): all exact powers of two or on the grid.
struct Grid {
  Grid(int scale, int bit_width) {
    const int step_exponent = scale - (bit_width - 1);
    step = Pow2(step_exponent);
    inv_step = Pow2(-step_exponent);
    low = -Pow2(scale);
    high = Pow2(scale) - step;  // exact: normal floats, both on the grid
  }
  float low, high, step, inv_step;
};

ChannelGrids MakeChannelGrids(const std::vector<int>& scales, int bit_width) {
  ChannelGrids g;
  for (int scale : scales) {
    const Grid one(scale, bit_width);
    g.low.push_back(one.low);
    g.high.push_back(one.high);
    g.step.push_back(one.step);
    g.inv_step.push_back(one.inv_step);
  }
  return g;
}

int Clamped(int scale) { return std::min(std::max(scale, kMinScale), kMaxScale); }

// The max and min of x[0, n)'s non-NaN elements.
Extremes ChunkExtremes(const float* x, int64_t n, bool portable) {
#ifdef __x86_64__
  if (!portable && HasAvx2()) return ChunkExtremesAvx2(x, n);
#endif
  Extremes out;
  ChunkQuantizeN<4, true, false>(x, nullptr, n, 0, 0, 0, 0, &out);
  return out;
}

// Quantizes x[0, n) into y (nonzero when an element is NaN or clipped); with
// ``extremes``, also gives the max and min of x's non-NaN elements.
int64_t ChunkQuantize(const float* x, float* y, int64_t n, const Grid& g, bool portable,
                      Extremes* extremes = nullptr) {
#ifdef __x86_64__
  if (!portable && HasAvx2()) return ChunkQuantizeAvx2(x, y, n, g.low, g.high, g.step, g.inv_step, extremes);
#endif
  return extremes ? ChunkQuantizeN<4, true>(x, y, n, g.low, g.high, g.step, g.inv_step, extremes)
                  : ChunkQuantizeN<4, false>(x, y, n, g.low, g.high, g.step, g.inv_step, nullptr);
}

float ChunkFiniteAbsMax(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    m = (a <= std::numeric_limits<float>::max() && a > m) ? a : m;
  }
  return m;
}

// What both ops share: the bit width, auto or given scale, the SIMD choice, and the thread pool.
class FusedQuantizeKernel : public OpKernel {
 public:
  explicit FusedQuantizeKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bit_width", &bit_width_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("auto_scale", &auto_scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("portable", &portable_));
    OP_REQUIRES(ctx, bit_width_ >= 2 && bit_width_ <= 24,
                tensorflow::errors::InvalidArgument("bit_width must be 2..24, got ", bit_width_));
  }

 protected:
  // ParallelFor over ``shards`` pieces of ``cost`` (about one cycle per element and pass) each.
  static void ForShards(OpKernelContext* ctx, int64_t shards, int64_t cost,
                        const std::function<void(int64_t)>& work) {
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        shards, cost, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) work(i);
        });
  }

  int bit_width_;
  bool auto_scale_;
  bool portable_;  // the narrow SIMD code even where AVX2 is present (the tests compare both)
};

// Rows of C channels cut into blocks of about kChunk elements (one block is in
// cache while it is reduced and quantized), and the blocks into a few shards
// per thread, each with its own partial results.
struct RowShards {
  RowShards(OpKernelContext* ctx, int64_t rows, int64_t C)
      : rows(rows), block_rows(std::max<int64_t>(1, kChunk / C)) {
    blocks = (rows + block_rows - 1) / block_rows;
    count = std::min<int64_t>(blocks, 4 * std::max(1, ctx->device()->tensorflow_cpu_worker_threads()->num_threads));
    cost = C * block_rows * std::max<int64_t>(1, blocks / std::max<int64_t>(1, count));
  }
  // Blocks [first, second) of shard s.
  std::pair<int64_t, int64_t> Blocks(int64_t s) const { return {s * blocks / count, (s + 1) * blocks / count}; }
  // (first row, number of rows) of block b, or of all the blocks of shard s.
  std::pair<int64_t, int64_t> BlockRows(int64_t b) const {
    return {b * block_rows, std::min(block_rows, rows - b * block_rows)};
  }
  std::pair<int64_t, int64_t> ShardRows(int64_t s) const {
    const int64_t begin = Blocks(s).first * block_rows;
    return {begin, std::min(rows, Blocks(s).second * block_rows) - begin};
  }
  int64_t rows, block_rows, blocks, count, cost;
};

class FixedPointQuantizeOp : public FusedQuantizeKernel {
 public:
  explicit FixedPointQuantizeOp(OpKernelConstruction* ctx) : FusedQuantizeKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("per_channel", &per_channel_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& input = ctx->input(0);
    const Tensor& scale = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckScale(input, scale));
    Tensor* output = nullptr;
    // The input's buffer where no other op reads it (an activation in
    // evaluation): a new one costs page faults the size of the tensor.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, input.shape(), &output));
    Tensor* scale_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, per_channel_ ? tensorflow::TensorShape({scale.NumElements()})
                                                             : tensorflow::TensorShape({}),
                                             &scale_out));
    const int64_t outside = Quantize(ctx, input, scale, output, scale_out->flat<int32_t>().data());
    Tensor* inside_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, {}, &inside_out));
    inside_out->scalar<bool>()() = outside == 0;
  }

 protected:
  // ``scale`` fits ``input``: one value per channel of its last axis, or a scalar.
  tensorflow::Status CheckScale(const Tensor& input, const Tensor& scale) const {
    if (scale.dtype() != tensorflow::DT_INT32) return tensorflow::errors::InvalidArgument("scale must be int32");
    if (per_channel_) {
      if (input.dims() < 1 || input.dim_size(input.dims() - 1) == 0)
        return tensorflow::errors::InvalidArgument("per-channel scales need a last axis of size > 0");
      const int64_t channels = input.dim_size(input.dims() - 1);
      if (scale.NumElements() != channels)
        return tensorflow::errors::InvalidArgument("scale must hold one scale per channel (", channels,
                                                   "), got ", scale.NumElements());
    } else if (!tensorflow::TensorShapeUtils::IsScalar(scale.shape())) {
      return tensorflow::errors::InvalidArgument("scale must be a scalar");
    }
    return tensorflow::OkStatus();
  }

  // ``input`` quantized into ``output`` with the given scales (or, in auto mode,
  // its own, with ``scale`` as the guess), which go to ``scale_out``; returns
  // nonzero when an element is NaN or clipped. ``CheckScale`` must have passed.
  int64_t Quantize(OpKernelContext* ctx, const Tensor& input, const Tensor& scale, Tensor* output,
                   int32_t* scale_out) {
    if (per_channel_) return PerChannel(ctx, input, scale, output, input.dim_size(input.dims() - 1), scale_out);
    return PerTensor(ctx, input, scale, output, scale_out);
  }

 private:
  // One scale for the tensor; returns nonzero when an element is NaN or clipped.
  int64_t PerTensor(OpKernelContext* ctx, const Tensor& input, const Tensor& given, Tensor* output,
                    int32_t* scale_out) {
    const float* x = input.flat<float>().data();
    float* y = output->flat<float>().data();
    const int64_t n = input.NumElements();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    auto chunk_size = [&](int64_t c) { return std::min(kChunk, n - c * kChunk); };
    std::vector<int64_t> outside(chunks, 0);
    auto quantize_all = [&](const Grid& grid) {
      ForShards(ctx, chunks, kChunk, [&](int64_t c) {
        outside[c] = ChunkQuantize(x + c * kChunk, y + c * kChunk, chunk_size(c), grid, portable_);
      });
    };

    // In auto mode the scale input is a guess (the scale stored last time):
    // each chunk's extremes and its quantize with the guess are computed in
    // one pass over the chunk, so a right guess costs one pass over memory.
    // A wrong one is only a second quantize pass: the output is always that
    // of the scale computed from the data. Where the output took over the
    // input's buffer, the extremes come first in a read-only pass instead.
    const bool in_place = x == y;
    const int guess = Clamped(given.scalar<int32_t>()());
    int scale = guess;
    if (auto_scale_) {
      const Grid guessed(guess, bit_width_);
      std::vector<Extremes> parts(chunks);
      ForShards(ctx, chunks, kChunk, [&](int64_t c) {
        const int64_t begin = c * kChunk, size = chunk_size(c);
        if (in_place) {
          parts[c] = ChunkExtremes(x + begin, size, portable_);
        } else {
          outside[c] = ChunkQuantize(x + begin, y + begin, size, guessed, portable_, &parts[c]);
        }
      });
      Extremes all;
      for (const Extremes& e : parts) {
        all.max = std::max(all.max, e.max);
        all.min = std::min(all.min, e.min);
      }
      float m = std::max(all.max, -all.min);
      if (!std::isfinite(m)) {  // an Inf (or nothing but NaN): the max over finite values only
        std::vector<float> finite(chunks, 0.0f);
        ForShards(ctx, chunks, kChunk, [&](int64_t c) {
          finite[c] = ChunkFiniteAbsMax(x + c * kChunk, chunk_size(c));
        });
        m = 0.0f;
        for (float f : finite) m = std::max(m, f);
      }
      scale = CeilLog2Clamped(m);
      if (in_place || scale != guess) quantize_all(Grid(scale, bit_width_));
    } else {
      quantize_all(Grid(scale, bit_width_));
    }
    *scale_out = scale;
    int64_t total = 0;
    for (int64_t o : outside) total += o;
    return total;
  }

  // One scale per channel of the last axis, the same way: blocks of whole rows,
  // each block's extremes and its quantize with the guessed scales while it is in cache.
  int64_t PerChannel(OpKernelContext* ctx, const Tensor& input, const Tensor& given_scales, Tensor* output,
                     int64_t C, int32_t* scale_out) {
    const float* x = input.flat<float>().data();
    float* y = output->flat<float>().data();
    const RowShards shards(ctx, input.NumElements() / C, C);
    const int64_t rows = shards.rows;
    std::vector<int64_t> outside(shards.count, 0);
    auto quantize_all = [&](const ChannelGrids& grids) {
      ForShards(ctx, shards.count, shards.cost, [&](int64_t s) {
        outside[s] = 0;
        for (int64_t b = shards.Blocks(s).first; b < shards.Blocks(s).second; ++b) {
          const auto span = shards.BlockRows(b);
          outside[s] += RowsQuantize(x + span.first * C, y + span.first * C, span.second, C, grids, portable_);
        }
      });
    };

    const bool in_place = x == y;  // then the extremes come first, read-only, as per tensor
    std::vector<int> guess(C), scales(C);
    const auto given = given_scales.flat<int32_t>();
    for (int64_t c = 0; c < C; ++c) guess[c] = Clamped(given(c));
    scales = guess;
    if (auto_scale_) {
      const ChannelGrids guessed = MakeChannelGrids(guess, bit_width_);
      std::vector<float> mx(shards.count * C, -std::numeric_limits<float>::infinity());
      std::vector<float> mn(shards.count * C, std::numeric_limits<float>::infinity());
      ForShards(ctx, shards.count, shards.cost, [&](int64_t s) {
        for (int64_t b = shards.Blocks(s).first; b < shards.Blocks(s).second; ++b) {
          const auto span = shards.BlockRows(b);
          const float* rows_x = x + span.first * C;
          RowsExtremes(rows_x, span.second, C, mx.data() + s * C, mn.data() + s * C, portable_);
          if (!in_place) outside[s] += RowsQuantize(rows_x, y + span.first * C, span.second, C, guessed, portable_);
        }
      });
      bool same = true;
      for (int64_t c = 0; c < C; ++c) {
        float hi = -std::numeric_limits<float>::infinity(), lo = std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < shards.count; ++s) {
          hi = std::max(hi, mx[s * C + c]);
          lo = std::min(lo, mn[s * C + c]);
        }
        float m = std::max(hi, -lo);
        if (!std::isfinite(m)) {  // an Inf in this channel (or nothing but NaN): its finite values only
          m = 0.0f;
          for (int64_t r = 0; r < rows; ++r) {
            const float a = std::fabs(x[r * C + c]);
            m = (a <= std::numeric_limits<float>::max() && a > m) ? a : m;
          }
        }
        scales[c] = CeilLog2Clamped(m);
        same = same && scales[c] == guess[c];
      }
      if (in_place || !same) quantize_all(MakeChannelGrids(scales, bit_width_));
    } else {
      quantize_all(MakeChannelGrids(scales, bit_width_));
    }
    for (int64_t c = 0; c < C; ++c) scale_out[c] = scales[c];
    int64_t total = 0;
    for (int64_t o : outside) total += o;
    return total;
  }

  bool per_channel_;  // one scale per channel of the last axis instead of one for the tensor
};

// ---- A weight's quantized copy, kept between evaluation calls ----
// One op instead of a tf.cond per weight: when ``current`` holds true it
// outputs ``copy`` as it is; otherwise it quantizes ``weight`` as
// NicsFixFixedPointQuantize does (with ``scale`` as the given scales or the
// auto guess), stores the result in ``copy`` and the scales used in ``scale``
// (auto and constant modes), and sets ``current``. Stale copies are marked by
// assigning false to ``current``, as with the tf.cond it replaces.
class CachedQuantizeOp : public FixedPointQuantizeOp {
 public:
  explicit CachedQuantizeOp(OpKernelConstruction* ctx) : FixedPointQuantizeOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("constant_scale", &constant_scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_constant", &use_constant_));
    OP_REQUIRES(ctx, !(use_constant_ && auto_scale_),
                tensorflow::errors::InvalidArgument("a constant scale is not an auto scale"));
  }

  void Compute(OpKernelContext* ctx) override {
    using tensorflow::core::RefCountPtr;
    RefCountPtr<tensorflow::Var> weight, copy, current, scale;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &weight));
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 1), &copy));
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 2), &current));
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 3), &scale));
    Tensor is_current, w, stored;
    OP_REQUIRES_OK(ctx, Read(current.get(), tensorflow::DT_BOOL, &is_current));
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(is_current.shape()),
                tensorflow::errors::InvalidArgument("current must be a scalar"));
    OP_REQUIRES_OK(ctx, Read(weight.get(), tensorflow::DT_FLOAT, &w));
    if (is_current.scalar<bool>()()) {
      Tensor kept;
      OP_REQUIRES_OK(ctx, Read(copy.get(), tensorflow::DT_FLOAT, &kept));
      OP_REQUIRES(ctx, kept.shape() == w.shape(),
                  tensorflow::errors::InvalidArgument("the copy's shape ", kept.shape().DebugString(),
                                                      " is not the weight's ", w.shape().DebugString()));
      ctx->set_output(0, kept);
      return;
    }
    OP_REQUIRES_OK(ctx, Read(scale.get(), tensorflow::DT_INT32, &stored));
    Tensor given = stored;
    if (use_constant_) {  // quantize with the constant; store it in every entry of the scale variable
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT32, {}, &given));
      given.scalar<int32_t>()() = constant_scale_;
    }
    OP_REQUIRES_OK(ctx, CheckScale(w, given));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, w.shape(), &output));
    Tensor used;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT32, given.shape(), &used));
    Quantize(ctx, w, given, output, used.flat<int32_t>().data());
    if (use_constant_) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT32, stored.shape(), &used));
      used.flat<int32_t>().setConstant(constant_scale_);
    }
    if (auto_scale_ || use_constant_) {
      Tensor reshaped;  // the variable's shape: (C,) and (1, C) hold the same values
      OP_REQUIRES(ctx, reshaped.CopyFrom(used, stored.shape()),
                  tensorflow::errors::Internal("the scales do not fit the scale variable"));
      Write(scale.get(), reshaped);
    }
    Write(copy.get(), *output);
    Tensor flag;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_BOOL, {}, &flag));
    flag.scalar<bool>()() = true;
    Write(current.get(), flag);
  }

 private:
  // The variable's value (a reference to its buffer, as ReadVariableOp gives).
  static tensorflow::Status Read(tensorflow::Var* var, tensorflow::DataType dtype, Tensor* out) {
    tensorflow::tf_shared_lock lock(*var->mu());
    if (!var->is_initialized) return tensorflow::errors::FailedPrecondition("a variable is not initialized");
    if (var->tensor()->dtype() != dtype)
      return tensorflow::errors::InvalidArgument("a variable holds ", tensorflow::DataTypeString(var->tensor()->dtype()),
                                                 ", expected ", tensorflow::DataTypeString(dtype));
    if (var->copy_on_read_mode.load()) {  // sparse updates write it in place: read a copy, as ReadVariableOp does
      *out = tensorflow::tensor::DeepCopy(*var->tensor());
    } else {
      *out = *var->tensor();
    }
    return tensorflow::OkStatus();
  }
  // Replaces the variable's buffer (never writes into one a reader may hold).
  static void Write(tensorflow::Var* var, const Tensor& value) {
    tensorflow::mutex_lock lock(*var->mu());
    *var->tensor() = value;
    var->is_initialized = true;
  }

  int constant_scale_;
  bool use_constant_;
};

// ---- Batch normalization in evaluation: quantize(x * a + c) ----
// t = double(x) * a[ch] + c[ch] (per channel of the last axis; two double
// roundings, as the plain ops make them), its auto scale from float(t) (as the
// plain ops cast it to take the scale), and t quantized in double, then
// stored as float (exact: on the grid of at most 24 bits).
struct DoubleGrid {
  DoubleGrid(int scale, int bit_width) {
    const Grid g(scale, bit_width);
    low = g.low;
    high = g.high;
    step = g.step;
    inv_step = g.inv_step;
  }
  double low, high, step, inv_step;
};

// Rows of C channels, t = double(x) * a + shift: with kWrite, y = quantize(t);
// with kTrack, the max and min of float(t) (non-NaN) go into *mx/*mn. Returns
// nonzero when a t is NaN or clipped (with kWrite).
template <int N, bool kTrack, bool kWrite>
NF_INLINE int64_t RowsScaleShiftN(const float* x, float* y, int64_t rows, int64_t C, const double* a,
                                  const double* shift, const DoubleGrid& g, float* mx, float* mn) {
  typedef typename Vec<double, N>::Values Doubles;
  typedef typename Vec<double, N>::Ints Longs;
  typedef typename Vec<float, N>::Values Floats;
  const Doubles lo = Splat<Doubles>(g.low), hi = Splat<Doubles>(g.high), step = Splat<Doubles>(g.step),
                inv = Splat<Doubles>(g.inv_step);
  Floats fmx = Splat<Floats>(*mx), fmn = Splat<Floats>(*mn);
  Longs outside = Longs{};
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
    float* out = y + r * C;
    int64_t c = 0;
    for (; c + N <= C; c += N) {
      Floats xf;
      std::memcpy(&xf, row + c, sizeof(xf));
      Doubles av, sv;
      std::memcpy(&av, a + c, sizeof(av));
      std::memcpy(&sv, shift + c, sizeof(sv));
      Doubles t = __builtin_convertvector(xf, Doubles) * av;
      t = t + sv;
      if constexpr (kTrack) {
        const Floats ft = __builtin_convertvector(t, Floats);
        fmx = ft > fmx ? ft : fmx;
        fmn = ft < fmn ? ft : fmn;
      }
      if constexpr (kWrite) {
        Longs clipped;
        const Doubles q = QuantizeLanesV<double, N>(t, lo, hi, step, inv, &clipped);
        outside |= clipped;
        const Floats qf = __builtin_convertvector(q, Floats);
        std::memcpy(out + c, &qf, sizeof(qf));
      }
    }
    for (; c < C; ++c) {
      double t = static_cast<double>(row[c]) * a[c];
      t = t + shift[c];
      if constexpr (kTrack) {
        const float ft = static_cast<float>(t);
        *mx = ft > *mx ? ft : *mx;
        *mn = ft < *mn ? ft : *mn;
      }
      if constexpr (kWrite) {
        out[c] = static_cast<float>(QuantizeOne<double>(t, g.low, g.high, g.step, g.inv_step, &total));
      }
    }
  }
  for (int k = 0; k < N; ++k) {
    total |= outside[k] != 0;
    *mx = fmx[k] > *mx ? fmx[k] : *mx;
    *mn = fmn[k] < *mn ? fmn[k] : *mn;
  }
  return total;
}

// The three forms the op runs: extremes only, quantize only, both in one pass.
enum class ScaleShiftPass { kExtremes, kQuantize, kBoth };

template <int N>
NF_INLINE int64_t RowsScaleShiftPass(ScaleShiftPass pass, const float* x, float* y, int64_t rows, int64_t C,
                                     const double* a, const double* shift, const DoubleGrid& g, float* mx,
                                     float* mn) {
  switch (pass) {
    case ScaleShiftPass::kExtremes: return RowsScaleShiftN<N, true, false>(x, y, rows, C, a, shift, g, mx, mn);
    case ScaleShiftPass::kQuantize: return RowsScaleShiftN<N, false, true>(x, y, rows, C, a, shift, g, mx, mn);
    default: return RowsScaleShiftN<N, true, true>(x, y, rows, C, a, shift, g, mx, mn);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) int64_t RowsScaleShiftAvx2(ScaleShiftPass pass, const float* x, float* y,
                                                           int64_t rows, int64_t C, const double* a,
                                                           const double* shift, const DoubleGrid& g, float* mx,
                                                           float* mn) {
  return RowsScaleShiftPass<4>(pass, x, y, rows, C, a, shift, g, mx, mn);
}
#endif

int64_t RowsScaleShift(ScaleShiftPass pass, const float* x, float* y, int64_t rows, int64_t C, const double* a,
                       const double* shift, const DoubleGrid& g, float* mx, float* mn, bool portable) {
#ifdef __x86_64__
  if (!portable && HasAvx2()) return RowsScaleShiftAvx2(pass, x, y, rows, C, a, shift, g, mx, mn);
#endif
  return RowsScaleShiftPass<2>(pass, x, y, rows, C, a, shift, g, mx, mn);
}

class ScaleShiftQuantizeOp : public FusedQuantizeKernel {
 public:
  explicit ScaleShiftQuantizeOp(OpKernelConstruction* ctx) : FusedQuantizeKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& input = ctx->input(0);
    OP_REQUIRES(ctx, input.dims() >= 1 && input.dim_size(input.dims() - 1) > 0,
                tensorflow::errors::InvalidArgument("x needs a last (channel) axis of size > 0"));
    const int64_t C = input.dim_size(input.dims() - 1);
    OP_REQUIRES(ctx, ctx->input(1).NumElements() == C && ctx->input(2).NumElements() == C,
                tensorflow::errors::InvalidArgument("a and c must hold one value per channel (", C, ")"));
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(ctx->input(3).shape()),
                tensorflow::errors::InvalidArgument("scale must be a scalar"));
    Tensor* output = nullptr;  // the input's buffer where no other op reads it, as above
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, input.shape(), &output));
    const float* x = input.flat<float>().data();
    float* y = output->flat<float>().data();
    const bool in_place = x == y;
    std::vector<double> a(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = ctx->input(1).flat<float>()(c);
      shift[c] = ctx->input(2).flat<float>()(c);
    }
    const RowShards shards(ctx, input.NumElements() / C, C);
    const int64_t rows = shards.rows;
    std::vector<int64_t> outside(shards.count, 0);
    std::vector<float> mx(shards.count, -std::numeric_limits<float>::infinity());
    std::vector<float> mn(shards.count, std::numeric_limits<float>::infinity());
    auto run = [&](const DoubleGrid& grid, ScaleShiftPass pass) {
      ForShards(ctx, shards.count, 4 * shards.cost, [&](int64_t s) {  // double lanes: about 4x the work
        const auto span = shards.ShardRows(s);
        const int64_t o = RowsScaleShift(pass, x + span.first * C, y + span.first * C, span.second, C, a.data(),
                                         shift.data(), grid, &mx[s], &mn[s], portable_);
        if (pass != ScaleShiftPass::kExtremes) outside[s] = o;
      });
    };
    const int guess = Clamped(ctx->input(3).scalar<int32_t>()());
    int scale = guess;
    // In auto mode the scale is a guess, as above; in place, the extremes come first.
    if (!auto_scale_) {
      run(DoubleGrid(guess, bit_width_), ScaleShiftPass::kQuantize);
    } else {
      run(DoubleGrid(guess, bit_width_), in_place ? ScaleShiftPass::kExtremes : ScaleShiftPass::kBoth);
      float hi = -std::numeric_limits<float>::infinity(), lo = std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < shards.count; ++s) {
        hi = std::max(hi, mx[s]);
        lo = std::min(lo, mn[s]);
      }
      float m = std::max(hi, -lo);
      if (!std::isfinite(m)) {  // an Inf in float(t) (or nothing but NaN): its finite values only
        m = 0.0f;
        for (int64_t i = 0; i < rows * C; ++i) {
          double t = static_cast<double>(x[i]) * a[i % C];
          t = t + shift[i % C];
          const float f = std::fabs(static_cast<float>(t));
          m = (f <= std::numeric_limits<float>::max() && f > m) ? f : m;
        }
      }
      scale = CeilLog2Clamped(m);
      if (in_place || scale != guess) run(DoubleGrid(scale, bit_width_), ScaleShiftPass::kQuantize);
    }
    int64_t total = 0;
    for (int64_t o : outside) total += o;
    Tensor* scale_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {}, &scale_out));
    scale_out->scalar<int32_t>()() = scale;
    Tensor* inside_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, {}, &inside_out));
    inside_out->scalar<bool>()() = total == 0;
  }

};

}  // namespace

REGISTER_OP("NicsFixFixedPointQuantize")
    .Input("x: float")
    .Input("scale: int32")
    .Output("y: float")
    .Output("scale_used: int32")
    .Output("all_inside: bool")
    .Attr("bit_width: int")
    .Attr("auto_scale: bool")
    .Attr("portable: bool = false")
    .Attr("per_channel: bool = false")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      bool per_channel = false;
      TF_RETURN_IF_ERROR(c->GetAttr("per_channel", &per_channel));
      c->set_output(0, c->input(0));
      if (per_channel) {
        tensorflow::shape_inference::ShapeHandle x;
        TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
        c->set_output(1, c->Vector(c->Dim(x, -1)));
      } else {
        tensorflow::shape_inference::ShapeHandle scalar;
        TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &scalar));
        c->set_output(1, c->Scalar());
      }
      c->set_output(2, c->Scalar());
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("NicsFixFixedPointQuantize").Device(tensorflow::DEVICE_CPU),
                        FixedPointQuantizeOp);

REGISTER_OP("NicsFixCachedQuantize")
    .Input("weight: resource")
    .Input("copy: resource")
    .Input("current: resource")
    .Input("scale: resource")
    .Output("y: float")
    .Attr("bit_width: int")
    .Attr("auto_scale: bool")
    .Attr("portable: bool = false")
    .Attr("per_channel: bool = false")
    .Attr("use_constant: bool = false")
    .Attr("constant_scale: int = 0")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::UnknownShape);

REGISTER_KERNEL_BUILDER(Name("NicsFixCachedQuantize").Device(tensorflow::DEVICE_CPU), CachedQuantizeOp);

REGISTER_OP("NicsFixScaleShiftQuantize")
    .Input("x: float")
    .Input("a: float")
    .Input("c: float")
    .Input("scale: int32")
    .Output("y: float")
    .Output("scale_used: int32")
    .Output("all_inside: bool")
    .Attr("bit_width: int")
    .Attr("auto_scale: bool")
    .Attr("portable: bool = false")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle scalar;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &scalar));
      c->set_output(0, c->input(0));
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("NicsFixScaleShiftQuantize").Device(tensorflow::DEVICE_CPU),
                        ScaleShiftQuantizeOp);
