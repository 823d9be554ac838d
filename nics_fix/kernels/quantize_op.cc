// Fixed-point quantize of one float32 tensor with one power-of-two scale, in
// one op: the auto scale's reduction, the quantize and the clip test in two
// passes over memory, where the plain TensorFlow ops take about twenty ops.
//
// The values are those of nics_fix/quant.py bit for bit (the tests compare
// them on NaN, Inf, -0, subnormals and every width):
//   auto scale  s = ceil(log2(max |x| over finite x)), clamped to [-94, 126]
//   y           = round_half_even(clip(x, -2^s, 2^s - step) / step) * step
//   all_inside  = no element is NaN or outside [-2^s, 2^s - step]
// Widths 2..24 only: clipping first keeps |x / step| <= 2^23, where adding and
// subtracting 2^23 rounds ties to even exactly, with no rounding-mode calls.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
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

// SIMD through GCC/Clang vector extensions, no intrinsics: Lanes<4> (16
// bytes) runs on every target; on x86-64 the same code is also compiled for
// AVX2 with 8 lanes and chosen at run time, so one build works on every node
// of a cluster whatever its CPU.
// Forced: a vector function must be compiled inside its target-specific caller.
#define NF_INLINE inline __attribute__((always_inline))

template <int N>
struct Lanes {
  typedef float Floats __attribute__((vector_size(4 * N)));
  typedef int32_t Ints __attribute__((vector_size(4 * N)));
};

template <typename V>
NF_INLINE V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
NF_INLINE V Splat(float f) {
  V v = {};
  return v + f;
}

struct Extremes {
  float max = -std::numeric_limits<float>::infinity();
  float min = std::numeric_limits<float>::infinity();
};

// Max and min of the non-NaN elements (every compare with NaN is false).
template <int N>
NF_INLINE Extremes ChunkExtremesN(const float* x, int64_t n) {
  typedef typename Lanes<N>::Floats Floats;
  Floats mx = Splat<Floats>(-std::numeric_limits<float>::infinity()), mn = -mx;
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const Floats v = Load<Floats>(x + i);
    mx = v > mx ? v : mx;
    mn = v < mn ? v : mn;
  }
  Extremes out;
  for (int k = 0; k < N; ++k) {
    out.max = mx[k] > out.max ? mx[k] : out.max;
    out.min = mn[k] < out.min ? mn[k] : out.min;
  }
  for (; i < n; ++i) {
    out.max = x[i] > out.max ? x[i] : out.max;
    out.min = x[i] < out.min ? x[i] : out.min;
  }
  return out;
}

// round_half_even(clip(v, low, high) * inv_step) * step, lane by lane; NaN stays
// NaN (its compares are false) and -0 stays -0 (the sign is put back).
template <int N>
NF_INLINE typename Lanes<N>::Floats QuantizeLanes(typename Lanes<N>::Floats v, float low, float high,
                                               float step, float inv_step) {
  typedef typename Lanes<N>::Floats Floats;
  typedef typename Lanes<N>::Ints Ints;
  const Ints sign_bit = Ints{} + static_cast<int32_t>(0x80000000u);
  const Floats lo = Splat<Floats>(low), hi = Splat<Floats>(high);
  Floats c = v < lo ? lo : v;
  c = c > hi ? hi : c;
  const Floats s = c * inv_step;  // exact: a power of two, and |s| <= 2^23
  const Ints sign = (Ints)s & sign_bit;  // a vector cast keeps the bits
  const Ints magic_bits = (Ints{} + 0x4B000000) | sign;  // +-2^23
  const Floats magic = (Floats)magic_bits;
  const Floats rounded = (s + magic) - magic;  // ties to even, in the default rounding mode
  const Ints r = ((Ints)rounded & ~sign_bit) | sign;
  return (Floats)r * step;
}

// Quantizes x[0, n) into y; returns the number of elements that are NaN or clipped.
template <int N>
NF_INLINE int64_t ChunkQuantizeN(const float* x, float* y, int64_t n, float low, float high, float step,
                              float inv_step) {
  typedef typename Lanes<N>::Floats Floats;
  typedef typename Lanes<N>::Ints Ints;
  const Floats lo = Splat<Floats>(low), hi = Splat<Floats>(high);
  Ints outside = Ints{};
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const Floats v = Load<Floats>(x + i);
    outside -= ~((v >= lo) & (v <= hi));  // a true compare is -1
    const Floats q = QuantizeLanes<N>(v, low, high, step, inv_step);
    std::memcpy(y + i, &q, sizeof(q));
  }
  int64_t total = 0;
  for (int k = 0; k < N; ++k) total += outside[k];
  if (i < n) {  // the tail, through the same lanes
    Floats v = Splat<Floats>(0.0f);
    for (int64_t k = i; k < n; ++k) v[k - i] = x[k];
    const Ints tail_outside = ~((v >= lo) & (v <= hi));
    const Floats q = QuantizeLanes<N>(v, low, high, step, inv_step);
    for (int64_t k = i; k < n; ++k) {
      y[k] = q[k - i];
      total -= tail_outside[k - i];
    }
  }
  return total;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) Extremes ChunkExtremesAvx2(const float* x, int64_t n) {
  return ChunkExtremesN<8>(x, n);
}
__attribute__((target("avx2"))) int64_t ChunkQuantizeAvx2(const float* x, float* y, int64_t n, float low,
                                                          float high, float step, float inv_step) {
  return ChunkQuantizeN<8>(x, y, n, low, high, step, inv_step);
}
bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

Extremes ChunkExtremes(const float* x, int64_t n, bool portable) {
#ifdef __x86_64__
  if (!portable && HasAvx2()) return ChunkExtremesAvx2(x, n);
#endif
  return ChunkExtremesN<4>(x, n);
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

int64_t ChunkQuantize(const float* x, float* y, int64_t n, const Grid& g, bool portable) {
#ifdef __x86_64__
  if (!portable && HasAvx2()) return ChunkQuantizeAvx2(x, y, n, g.low, g.high, g.step, g.inv_step);
#endif
  return ChunkQuantizeN<4>(x, y, n, g.low, g.high, g.step, g.inv_step);
}

float ChunkFiniteAbsMax(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    m = (a <= std::numeric_limits<float>::max() && a > m) ? a : m;
  }
  return m;
}

class FixedPointQuantizeOp : public OpKernel {
 public:
  explicit FixedPointQuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bit_width", &bit_width_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("auto_scale", &auto_scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("portable", &portable_));
    OP_REQUIRES(ctx, bit_width_ >= 2 && bit_width_ <= 24,
                tensorflow::errors::InvalidArgument("bit_width must be 2..24, got ", bit_width_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& input = ctx->input(0);
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(ctx->input(1).shape()),
                tensorflow::errors::InvalidArgument("scale must be a scalar"));
    const float* x = input.flat<float>().data();
    const int64_t n = input.NumElements();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    // Cost per chunk in the pool's units (about one cycle per element and pass).
    auto for_chunks = [&](const std::function<void(int64_t)>& work) {
      workers->ParallelFor(chunks, kChunk, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) work(c);
      });
    };
    auto chunk_size = [&](int64_t c) { return std::min(kChunk, n - c * kChunk); };

    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, input.shape(), &output));
    float* y = output->flat<float>().data();
    std::vector<int64_t> outside(chunks, 0);
    auto quantize_all = [&](const Grid& grid) {
      for_chunks([&](int64_t c) {
        outside[c] = ChunkQuantize(x + c * kChunk, y + c * kChunk, chunk_size(c), grid, portable_);
      });
    };

    // In auto mode the scale input is a guess (the scale stored last time):
    // each chunk's extremes and its quantize with the guess are computed
    // while the chunk is in cache, so a right guess costs one pass over
    // memory. A wrong one is only a second quantize pass: the output is
    // always that of the scale computed from the data.
    const int guess = std::min(std::max(ctx->input(1).scalar<int32_t>()(), kMinScale), kMaxScale);
    int scale = guess;
    if (auto_scale_) {
      const Grid guessed(guess, bit_width_);
      std::vector<Extremes> parts(chunks);
      for_chunks([&](int64_t c) {
        const int64_t begin = c * kChunk, size = chunk_size(c);
        parts[c] = ChunkExtremes(x + begin, size, portable_);
        outside[c] = ChunkQuantize(x + begin, y + begin, size, guessed, portable_);
      });
      Extremes all;
      for (const Extremes& e : parts) {
        all.max = std::max(all.max, e.max);
        all.min = std::min(all.min, e.min);
      }
      float m = std::max(all.max, -all.min);
      if (!std::isfinite(m)) {  // an Inf (or nothing but NaN): the max over finite values only
        std::vector<float> finite(chunks, 0.0f);
        for_chunks([&](int64_t c) { finite[c] = ChunkFiniteAbsMax(x + c * kChunk, chunk_size(c)); });
        m = 0.0f;
        for (float f : finite) m = std::max(m, f);
      }
      scale = CeilLog2Clamped(m);
      if (scale != guess) quantize_all(Grid(scale, bit_width_));
    } else {
      quantize_all(Grid(scale, bit_width_));
    }
    int64_t total_outside = 0;
    for (int64_t o : outside) total_outside += o;

    Tensor* scale_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {}, &scale_out));
    scale_out->scalar<int32_t>()() = scale;
    Tensor* inside_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, {}, &inside_out));
    inside_out->scalar<bool>()() = total_outside == 0;
  }

 private:
  int bit_width_;
  bool auto_scale_;
  bool portable_;  // the 4-lane code even where AVX2 is present (the tests compare both)
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
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle scalar;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &scalar));
      c->set_output(0, c->input(0));
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      return tensorflow::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("NicsFixFixedPointQuantize").Device(tensorflow::DEVICE_CPU),
                        FixedPointQuantizeOp);
