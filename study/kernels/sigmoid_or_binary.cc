// Fused CPU kernels of the sigmoid-or-binary activation (study/activations.py has the formulas).
//
// StudySigmoidOrBinary, one pass over x:
//     z    = x + noise_std * N(0, 1)                                   (noise_std > 0)
//     sig  = sigmoid(slope * z)
//     y    = B ? 1[z > 0] : clip(cutoff * sig - offset, 0, 1)         offset = (cutoff - 1) / 2
//     aux  = "sig": |z| >= threshold ? 0 : sig    (SigmoidGrad of it is the sigmoid surrogate,
//                                                  0 from T = threshold on, where sat is clipped)
//            "z":   z  (the ste/hard_sigmoid surrogates with noise);   "none": an empty tensor
// B, the coin, is "soft" (0), "hard" (1), or drawn: one for the batch ("batch") or one per row of
// the first dimension ("example"), u < p with u the uniforms of keras.random.uniform; one per
// element ("unit"), m < ceil(p 2^23) with m a 23-bit uniform integer (the same law) of which only
// the top 8 bits are drawn for all but 1 coin in 256 (UnitCoins). The draws are made inside the
// pass from Philox, keyed by the seeds keras.random.uniform / keras.random.normal are given: the
// batch and example uniforms are keras.random.uniform's bit for bit; the normals are TensorFlow's
// Box-Muller on the Philox words of keras.random.normal, with Eigen's vectorized log/sin/cos in
// place of libm's (a few ulps apart). study/activations.py's _unit_coins draws the same unit coins
// with TensorFlow ops.
//
// StudySigmoidOrBinaryGrad, one pass over dy and aux:
//     "sigmoid":      dx = dy * (aux * (1 - aux)) * scale          (scale = slope * cutoff)
//     "ste":          dx = |aux| <= 1 ? dy : 0
//     "hard_sigmoid": dx = |aux| <= 1 ? 0.5 dy : 0
//
// StudyCodeStats, one pass over the pre-activations [N, U] of an evaluation batch:
//     ones[u] = #{n: pre[n, u] > 0}      outside = #{(n, u): not |pre[n, u]| < bound}  ("lt")
//                                                 or #{(n, u): not |pre[n, u]| <= bound} ("le")
//
// Every element goes through Eigen's packet functions (those of TensorFlow's Sigmoid and
// SigmoidGrad), the last partial packet included, so no value depends on how the work is split.
// Built by `make setup` (the Makefile's $(KERNEL) rule): -mavx2 -mno-fma where the CPU has AVX2, so
// the float arithmetic is TensorFlow's own (built for AVX, without FMA) and Philox runs 8 blocks
// wide; elsewhere the portable paths (scalar Philox, the compiler's default vector width) compute
// the same values.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/lib/random/philox_random.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace study {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using Philox = ::tensorflow::random::PhiloxRandom;
namespace ei = Eigen::internal;

using Packet = ei::packet_traits<float>::type;
using PacketI = ei::unpacket_traits<Packet>::integer_packet;
constexpr int kLanes = ei::unpacket_traits<Packet>::size;
constexpr int kBlocks = 32;              // Philox blocks per draw group
constexpr int64_t kTile = 16 * kBlocks;  // elements per unit of work: the unit coins of one group
static_assert(kBlocks % kLanes == 0, "a draw group is whole packets of blocks");

// Up to this many elements a pass runs on the calling thread: below it, handing tiles to the
// intra-op pool costs more than a second thread saves (docs/benchmarks.md, "Figures behind the
// design").
constexpr int64_t kSerial = int64_t{1} << 17;

// Tiles [0, ceil(n / kTile)) of work(first, last), on the intra-op pool when n is large enough.
template <typename Work>
void RunTiles(OpKernelContext* ctx, int64_t n, const Eigen::TensorOpCost& cost, Work& work) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (n <= kSerial) {
    work(0, tiles);
  } else {
    ctx->eigen_device<Eigen::ThreadPoolDevice>().parallelFor(tiles, cost, work);
  }
}

enum class Coin { kSoft, kHard, kBatch, kExample, kUnit };
enum class Keep { kNone, kSig, kZ };

Packet Load(const float* p, int64_t m) {
  return m == kLanes ? ei::ploadu<Packet>(p) : ei::ploadu_partial<Packet>(p, m);
}

void Store(float* p, const Packet& v, int64_t m) {
  if (m == kLanes) {
    ei::pstoreu(p, v);
  } else {
    ei::pstoreu_partial(p, v, m);
  }
}

// The Philox stream of TensorFlow's stateless random ops for a Keras seed: keras.random.* reduces
// the int64 seed with floormod(seed, 2^31 - 2) to int32, StatelessRandomGetKeyCounter scrambles it
// (GenerateKey in tensorflow/core/kernels/stateless_random_ops.cc), and element i of a draw is word
// i % 4 of the block at counter + i / 4.
struct Stream {
  Philox::Key key;
  Philox::ResultType counter;

  explicit Stream(const Tensor& seed) {
    const auto s = seed.flat<int64_t>();
    uint64_t words[2];
    for (int i = 0; i < 2; ++i) {
      int64_t v = s(i) % 2147483646;
      if (v < 0) v += 2147483646;
      words[i] = static_cast<uint64_t>(v);
    }
    key[0] = 0x3ec8f720;
    key[1] = 0x02461e29;
    counter[0] = static_cast<uint32_t>(words[0]);
    counter[1] = static_cast<uint32_t>(words[0] >> 32);
    counter[2] = static_cast<uint32_t>(words[1]);
    counter[3] = static_cast<uint32_t>(words[1] >> 32);
    const auto mix = Philox(counter, key)();
    key[0] = mix[0];
    key[1] = mix[1];
    counter[0] = counter[1] = 0;
    counter[2] = mix[2];
    counter[3] = mix[3];
  }
  Stream() = default;

  // Words of blocks [first, first + kBlocks): w[j][b] is word j of block first + b.
  void Words(uint64_t first, uint32_t (&w)[4][kBlocks]) const {
    for (int b = 0; b < kBlocks; ++b) {  // counter + first + b, a 128-bit addition
      const uint64_t low = (uint64_t{counter[1]} << 32 | counter[0]), sum = low + first + b;
      const uint64_t high = (uint64_t{counter[3]} << 32 | counter[2]) + (sum < low ? 1 : 0);
      w[0][b] = static_cast<uint32_t>(sum);
      w[1][b] = static_cast<uint32_t>(sum >> 32);
      w[2][b] = static_cast<uint32_t>(high);
      w[3][b] = static_cast<uint32_t>(high >> 32);
    }
#if defined(__AVX2__)
    // Philox-4x32-10 on 8 blocks per vector, 4 vectors interleaved (TensorFlow's rounds exactly).
    constexpr int kSets = kBlocks / 8;
    __m256i c[4][kSets];
    for (int j = 0; j < 4; ++j)
      for (int s = 0; s < kSets; ++s) c[j][s] = _mm256_loadu_si256(reinterpret_cast<__m256i*>(&w[j][8 * s]));
    const __m256i ma = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m256i mb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int s = 0; s < kSets; ++s) {
        const __m256i even0 = _mm256_mul_epu32(c[0][s], ma);
        const __m256i odd0 = _mm256_mul_epu32(_mm256_srli_epi64(c[0][s], 32), ma);
        const __m256i even1 = _mm256_mul_epu32(c[2][s], mb);
        const __m256i odd1 = _mm256_mul_epu32(_mm256_srli_epi64(c[2][s], 32), mb);
        const __m256i lo0 = _mm256_blend_epi32(even0, _mm256_slli_epi64(odd0, 32), 0xAA);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(even0, 32), odd0, 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(even1, _mm256_slli_epi64(odd1, 32), 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(even1, 32), odd1, 0xAA);
        c[0][s] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[1][s]), key0);
        c[2][s] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[3][s]), key1);
        c[1][s] = lo1;
        c[3][s] = lo0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int j = 0; j < 4; ++j)
      for (int s = 0; s < kSets; ++s) _mm256_storeu_si256(reinterpret_cast<__m256i*>(&w[j][8 * s]), c[j][s]);
#else
    for (int b = 0; b < kBlocks; ++b) {
      Philox::ResultType at;
      for (int j = 0; j < 4; ++j) at[j] = w[j][b];
      const auto out = Philox(at, key)();
      for (int j = 0; j < 4; ++j) w[j][b] = out[j];
    }
#endif
  }
};

// TensorFlow's Uint32ToFloat on a packet: 23 random mantissa bits, a float in [0, 1).
Packet UniformOf(const uint32_t* words) {
  const PacketI bits = ei::ploadu<PacketI>(reinterpret_cast<const int32_t*>(words));
  const PacketI one = ei::por(ei::pand(bits, ei::pset1<PacketI>(0x7fffff)), ei::pset1<PacketI>(0x3f800000));
  return ei::psub(ei::preinterpret<Packet>(one), ei::pset1<Packet>(1.0f));
}

// Stores 4 word-major packets (word j of kLanes blocks) as 4 * kLanes elements in stream order.
void StoreElements(ei::PacketBlock<Packet, 4>& words, float* out) {
  ei::ptranspose(words);
  for (int j = 0; j < 4; ++j) ei::pstoreu(out + j * kLanes, words.packet[j]);
}

// Uniforms [4 first, 4 first + kTile) of the stream (keras.random.uniform's values).
void Uniforms(const Stream& stream, uint64_t first_block, float* out) {
  alignas(64) uint32_t w[4][kBlocks];
  for (int64_t g = 0; g < kTile / 4; g += kBlocks) {
    stream.Words(first_block + g, w);
    for (int b = 0; b < kBlocks; b += kLanes) {
      ei::PacketBlock<Packet, 4> u;
      for (int j = 0; j < 4; ++j) u.packet[j] = UniformOf(&w[j][b]);
      StoreElements(u, out + 4 * (g + b));
    }
  }
}

// Normals [4 first, 4 first + kTile) of the stream: Box-Muller as TensorFlow's BoxMullerFloat,
// words (0, 1) and (2, 3) of a block give r sin(a) and r cos(a), r = sqrt(-2 log max(u0, 1e-7)),
// a = float(2 pi (double) u1).
void Normals(const Stream& stream, uint64_t first_block, float* out) {
  alignas(64) uint32_t w[4][kBlocks];
  alignas(64) float u[4][kBlocks];
  constexpr double kTwoPi = 2.0 * M_PI;
  const Packet eps = ei::pset1<Packet>(1.0e-7f), minus_two = ei::pset1<Packet>(-2.0f);
  for (int64_t g = 0; g < kTile / 4; g += kBlocks) {
    stream.Words(first_block + g, w);
    for (int j = 0; j < 4; ++j)
      for (int b = 0; b < kBlocks; b += kLanes) ei::pstoreu(&u[j][b], UniformOf(&w[j][b]));
    for (int j = 1; j < 4; j += 2)
      for (int b = 0; b < kBlocks; ++b) u[j][b] = static_cast<float>(kTwoPi * static_cast<double>(u[j][b]));
    for (int b = 0; b < kBlocks; b += kLanes) {
      ei::PacketBlock<Packet, 4> n;
      for (int j = 0; j < 4; j += 2) {
        const Packet r = ei::psqrt(ei::pmul(minus_two, ei::plog(ei::pmax(ei::ploadu<Packet>(&u[j][b]), eps))));
        const Packet a = ei::ploadu<Packet>(&u[j + 1][b]);
        n.packet[j] = ei::pmul(ei::psin(a), r);
        n.packet[j + 1] = ei::pmul(ei::pcos(a), r);
      }
      StoreElements(n, out + 4 * (g + b));
    }
  }
}

// The unit coins [first, first + kTile), first a multiple of kTile, as 1.0 (hard) or 0.0: B = m < P
// with m a 23-bit uniform integer and P = ceil(p 2^23), the law of keras.random.uniform(...) < p,
// from 8 bits per coin: m's top 8 bits are byte i % 16 of block i / 16 of the stream, and only
// where they equal P's (1 coin in 256) its low 15 bits, word i % 4 of block i / 4 of `ties`.
void UnitCoins(const Stream& stream, const Stream& ties, int64_t first, int64_t n, uint32_t P, float* out) {
  alignas(64) uint32_t w[4][kBlocks];
  alignas(64) uint32_t words[kTile / 4];  // in stream order: word j of block b at 4 b + j
  stream.Words(static_cast<uint64_t>(first / 16), w);
  for (int b = 0; b < kBlocks; ++b)
    for (int j = 0; j < 4; ++j) words[4 * b + j] = w[j][b];
  const uint8_t* top = reinterpret_cast<const uint8_t*>(words);  // little-endian bytes
  const uint32_t top_p = P >> 15, low_p = P & 0x7fff;
  for (int64_t i = 0; i < n; ++i) out[i] = top[i] < top_p ? 1.0f : 0.0f;
  if (top_p > 255 || low_p == 0) return;  // no tie can be hard
  for (const void* tie = std::memchr(top, static_cast<int>(top_p), n); tie != nullptr;) {
    const int64_t i = static_cast<const uint8_t*>(tie) - top, at = first + i;
    Philox::ResultType counter = ties.counter;
    Philox gen(counter, ties.key);
    gen.Skip(static_cast<uint64_t>(at / 4));
    out[i] = (gen()[at % 4] & 0x7fff) < low_p ? 1.0f : 0.0f;
    tie = i + 1 < n ? std::memchr(top + i + 1, static_cast<int>(top_p), n - i - 1) : nullptr;
  }
}

struct Forward {
  float slope, cutoff, offset, threshold, noise_std;
  Keep keep;

  // Elements [0, n). coin: B per element (1.0 hard, 0.0 soft), or nullptr for one B, `hard`, for all.
  void Run(const float* x, const float* noise, const float* coin, bool hard, int64_t n, float* y,
           float* aux) const {
    const int mode = coin != nullptr ? kPerElement : hard ? kAllHard : kAllSoft;
    switch (mode * 3 + static_cast<int>(keep)) {
#define STUDY_CASE(c, k)                                 \
  case c * 3 + static_cast<int>(k):                      \
    return WithNoise<c, k>(x, noise, coin, n, y, aux);
      STUDY_CASE(kAllHard, Keep::kNone)
      STUDY_CASE(kAllHard, Keep::kSig)
      STUDY_CASE(kAllHard, Keep::kZ)
      STUDY_CASE(kAllSoft, Keep::kNone)
      STUDY_CASE(kAllSoft, Keep::kSig)
      STUDY_CASE(kAllSoft, Keep::kZ)
      STUDY_CASE(kPerElement, Keep::kNone)
      STUDY_CASE(kPerElement, Keep::kSig)
      STUDY_CASE(kPerElement, Keep::kZ)
#undef STUDY_CASE
    }
  }

 private:
  static constexpr int kAllHard = 0, kAllSoft = 1, kPerElement = 2;

  template <int kCoin, Keep kKeep>
  void WithNoise(const float* x, const float* noise, const float* coin, int64_t n, float* y, float* aux) const {
    if (noise != nullptr) {
      cutoff != 1.0f ? Loop<kCoin, kKeep, true, true>(x, noise, coin, n, y, aux)
                     : Loop<kCoin, kKeep, true, false>(x, noise, coin, n, y, aux);
    } else {
      cutoff != 1.0f ? Loop<kCoin, kKeep, false, true>(x, noise, coin, n, y, aux)
                     : Loop<kCoin, kKeep, false, false>(x, noise, coin, n, y, aux);
    }
  }

  template <int kCoin, Keep kKeep, bool kNoise, bool kClip>
  void Loop(const float* x, const float* noise, const float* coin, int64_t n, float* y, float* aux) const {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) Step<kCoin, kKeep, kNoise, kClip>(x, noise, coin, i, kLanes, y, aux);
    if (i < n) Step<kCoin, kKeep, kNoise, kClip>(x, noise, coin, i, n - i, y, aux);
  }

  // Packet [i, i + m) (m < kLanes only for the last one).
  template <int kCoin, Keep kKeep, bool kNoise, bool kClip>
  EIGEN_ALWAYS_INLINE void Step(const float* x, const float* noise, const float* coin, int64_t i, int64_t m,
                                float* y, float* aux) const {
    const Packet one = ei::pset1<Packet>(1.0f), zero = ei::pzero(one);
    Packet z = Load(x + i, m);
    if (kNoise) z = ei::padd(z, ei::pmul(ei::pset1<Packet>(noise_std), Load(noise + i, m)));
    constexpr bool kSig = kKeep == Keep::kSig || kCoin != kAllHard;
    Packet sig = zero, soft = zero, step = zero;
    if (kSig) sig = ei::scalar_logistic_op<float>().packetOp(slope == 1.0f ? z : ei::pmul(z, ei::pset1<Packet>(slope)));
    if (kCoin != kAllSoft) step = ei::pand(ei::pcmp_lt(zero, z), one);
    if (kCoin != kAllHard) {
      soft = sig;
      if (kClip) {  // tf.clip_by_value: maximum(minimum(t, 1), 0); pmin/pmax keep a NaN t
        soft = ei::psub(ei::pmul(ei::pset1<Packet>(cutoff), sig), ei::pset1<Packet>(offset));
        soft = ei::pmax(ei::pmin(soft, one), zero);
      }
    }
    if (kCoin == kAllHard) {
      Store(y + i, step, m);
    } else if (kCoin == kAllSoft) {
      Store(y + i, soft, m);
    } else {
      Store(y + i, ei::pselect(ei::pcmp_lt(zero, Load(coin + i, m)), step, soft), m);
    }
    if (kKeep == Keep::kSig) {
      // With cutoff 1, T is infinite: |z| >= T only where z = +-inf, where sig is 0 or 1 and the
      // gradient sig (1 - sig) is already 0.
      if (kClip) sig = ei::pselect(ei::pcmp_le(ei::pset1<Packet>(threshold), ei::pabs(z)), zero, sig);
      Store(aux + i, sig, m);
    } else if (kKeep == Keep::kZ) {
      Store(aux + i, z, m);
    }
  }
};

class SigmoidOrBinaryOp : public OpKernel {
 public:
  explicit SigmoidOrBinaryOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string coin, keep;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("coin", &coin));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("keep", &keep));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("slope", &fwd_.slope));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cutoff", &fwd_.cutoff));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &fwd_.offset));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("threshold", &fwd_.threshold));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("noise_std", &fwd_.noise_std));
    coin_ = coin == "soft"      ? Coin::kSoft
            : coin == "hard"    ? Coin::kHard
            : coin == "batch"   ? Coin::kBatch
            : coin == "example" ? Coin::kExample
                                : Coin::kUnit;
    fwd_.keep = keep == "sig" ? Keep::kSig : keep == "z" ? Keep::kZ : Keep::kNone;
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& p_t = ctx->input(1);
    const bool draws = coin_ == Coin::kBatch || coin_ == Coin::kExample || coin_ == Coin::kUnit;
    const bool noisy = fwd_.noise_std > 0.0f;
    OP_REQUIRES(ctx, p_t.NumElements() == 1, tensorflow::errors::InvalidArgument("p must be a scalar"));
    OP_REQUIRES(ctx, !draws || ctx->input(2).NumElements() == 2,
                tensorflow::errors::InvalidArgument("coin_seed must hold 2 integers"));
    OP_REQUIRES(ctx, !noisy || ctx->input(3).NumElements() == 2,
                tensorflow::errors::InvalidArgument("noise_seed must hold 2 integers"));
    OP_REQUIRES(ctx, coin_ != Coin::kExample || x.dims() >= 1,
                tensorflow::errors::InvalidArgument("the example coin needs a batch dimension"));
    const float p = p_t.flat<float>()(0);

    const int64_t n = x.NumElements();
    const Stream coins = draws ? Stream(ctx->input(2)) : Stream();
    const Stream noise = noisy ? Stream(ctx->input(3)) : Stream();
    // The batch coin and the example coins: the first uniforms of the stream, drawn here.
    const int64_t rows = n == 0 ? 0 : coin_ == Coin::kBatch ? 1 : coin_ == Coin::kExample ? x.dim_size(0) : 0;
    Tensor head;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({(rows + kTile - 1) / kTile * kTile}),
                                           &head));
    float* row_u = head.flat<float>().data();
    for (int64_t r = 0; r < rows; r += kTile) Uniforms(coins, static_cast<uint64_t>(r / 4), row_u + r);
    const bool hard = coin_ == Coin::kHard || (coin_ == Coin::kBatch && row_u[0] < p);
    const int64_t row = rows > 0 ? n / rows : 0;
    // The unit coins' threshold P = ceil(p 2^23) in [0, 2^23], and their stream for ties.
    const double scaled = std::ceil(static_cast<double>(p) * 8388608.0);
    const uint32_t P = scaled > 0 ? static_cast<uint32_t>(std::min(scaled, 8388608.0)) : 0;
    Stream ties = coins;
    ties.counter[3] ^= 0x80000000u;

    Forward fwd = fwd_;
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));  // in place
    // With cutoff 1 and the soft branch everywhere, aux would equal y but where |z| = inf, and there
    // y (0 or 1) gives the same gradient (0): one buffer for both.
    const bool soft_everywhere = coin_ == Coin::kSoft || (coin_ == Coin::kBatch && !hard);
    if (fwd.keep == Keep::kSig && fwd.cutoff == 1.0f && soft_everywhere) {
      ctx->set_output(1, *y);
      fwd.keep = Keep::kNone;
    }
    Tensor* aux = nullptr;
    if (fwd.keep != Keep::kNone || fwd_.keep == Keep::kNone) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, fwd.keep == Keep::kNone ? TensorShape({0}) : x.shape(), &aux));
    }
    if (n == 0) return;

    const float* xp = x.flat<float>().data();
    float* yp = y->flat<float>().data();
    float* ap = fwd.keep == Keep::kNone ? nullptr : aux->flat<float>().data();
    const Coin mode = coin_;
    auto work = [&, fwd, mode, hard, p, P](Eigen::Index first_tile, Eigen::Index last_tile) {
      alignas(64) float unit[kTile];
      alignas(64) float normal[kTile];
      const bool per_tile = noisy || mode == Coin::kUnit;  // draws per element
      const int64_t step = per_tile ? kTile : (last_tile - first_tile) * kTile;
      for (int64_t start = first_tile * kTile; start < std::min<int64_t>(n, last_tile * kTile); start += step) {
        const int64_t m = std::min<int64_t>(step, n - start);
        if (noisy) Normals(noise, static_cast<uint64_t>(start / 4), normal);
        if (mode == Coin::kUnit) UnitCoins(coins, ties, start, m, P, unit);
        auto run = [&](int64_t i, int64_t end, bool hard_run) {  // elements [start + i, start + end)
          fwd.Run(xp + start + i, noisy ? normal + i : nullptr, mode == Coin::kUnit ? unit + i : nullptr,
                  hard_run, end - i, yp + start + i, ap ? ap + start + i : nullptr);
        };
        if (mode != Coin::kExample) {
          run(0, m, hard);
          continue;
        }
        for (int64_t i = 0; i < m;) {  // runs of one row, one coin
          const int64_t r = (start + i) / row, end = std::min<int64_t>(m, (r + 1) * row - start);
          run(i, end, row_u[r] < p);
          i = end;
        }
      }
    };
    // Cycles per element, vectorized (as Eigen counts TensorFlow's own element-wise ops): the
    // sigmoid and the select; the unit coins' Philox (a block per 16); the noise's Box-Muller.
    const double cycles = 6 + (mode == Coin::kUnit ? 1 : 0) + (noisy ? 12 : 0);
    const Eigen::TensorOpCost cost(kTile * 4.0, kTile * (ap ? 8.0 : 4.0), kTile * cycles);
    RunTiles(ctx, n, cost, work);
  }

 private:
  Forward fwd_{};
  Coin coin_ = Coin::kSoft;
};

class SigmoidOrBinaryGradOp : public OpKernel {
 public:
  explicit SigmoidOrBinaryGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string surrogate;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("surrogate", &surrogate));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    sigmoid_ = surrogate == "sigmoid";
    inside_ = surrogate == "ste" ? 1.0f : 0.5f;
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& aux = ctx->input(1);
    OP_REQUIRES(ctx, dy.shape() == aux.shape(),
                tensorflow::errors::InvalidArgument("dy and aux differ in shape: ", dy.shape().DebugString(),
                                                    " and ", aux.shape().DebugString()));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, dy.shape(), &dx));
    const int64_t n = dy.NumElements();
    if (n == 0) return;
    const float* g = dy.flat<float>().data();
    const float* a = aux.flat<float>().data();
    float* out = dx->flat<float>().data();
    const bool sigmoid = sigmoid_;
    const float scale = scale_, inside = inside_;
    auto work = [=](Eigen::Index first_tile, Eigen::Index last_tile) {
      const int64_t end = std::min<int64_t>(n, last_tile * kTile);
      const Packet one = ei::pset1<Packet>(1.0f);
      for (int64_t i = first_tile * kTile; i < end; i += kLanes) {
        const int64_t m = std::min<int64_t>(kLanes, end - i);
        const Packet d = Load(g + i, m), v = Load(a + i, m);
        Packet r;
        if (sigmoid) {  // TensorFlow's SigmoidGrad packet op, then the scale
          r = ei::pmul(d, ei::pmul(v, ei::psub(one, v)));
          if (scale != 1.0f) r = ei::pmul(r, ei::pset1<Packet>(scale));
        } else {
          r = ei::pand(ei::pcmp_le(ei::pabs(v), one), inside == 1.0f ? d : ei::pmul(d, ei::pset1<Packet>(inside)));
        }
        Store(out + i, r, m);
      }
    };
    RunTiles(ctx, n, Eigen::TensorOpCost(kTile * 8.0, kTile * 4.0, kTile * 1.0), work);
  }

 private:
  float scale_ = 1.0f, inside_ = 1.0f;
  bool sigmoid_ = true;
};

class CodeStatsOp : public OpKernel {
 public:
  explicit CodeStatsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string inside;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("inside", &inside));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bound", &bound_));
    strict_ = inside == "lt";
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& pre = ctx->input(0);
    OP_REQUIRES(ctx, pre.dims() == 2, tensorflow::errors::InvalidArgument("pre must be [N, U]"));
    const int64_t rows = pre.dim_size(0), units = pre.dim_size(1);
    Tensor* ones = nullptr;
    Tensor* outside = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({units}), &ones));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &outside));
    const float* x = pre.flat<float>().data();
    float* out = ones->flat<float>().data();
    constexpr int64_t kColumns = 256;
    const int64_t chunks = (units + kColumns - 1) / kColumns;
    std::vector<int64_t> outside_per_chunk(chunks, 0);
    const float bound = bound_;
    const bool strict = strict_;
    auto work = [&](Eigen::Index first, Eigen::Index last) {
      for (Eigen::Index chunk = first; chunk < last; ++chunk) {
        const int64_t u0 = chunk * kColumns, width = std::min<int64_t>(kColumns, units - u0);
        int32_t count[kColumns] = {0};
        int64_t out_of_bound = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const float* row = x + r * units + u0;
          int32_t inside = 0;
          for (int64_t u = 0; u < width; ++u) {
            count[u] += row[u] > 0.0f;
            const float a = std::fabs(row[u]);
            inside += strict ? a < bound : a <= bound;
          }
          out_of_bound += width - inside;
        }
        for (int64_t u = 0; u < width; ++u) out[u0 + u] = static_cast<float>(count[u]);
        outside_per_chunk[chunk] = out_of_bound;
      }
    };
    ctx->eigen_device<Eigen::ThreadPoolDevice>().parallelFor(
        chunks, Eigen::TensorOpCost(rows * kColumns * 4.0, kColumns * 4.0, rows * kColumns * 2.0), work);
    int64_t total = 0;
    for (const int64_t v : outside_per_chunk) total += v;
    outside->scalar<int64_t>()() = total;
  }

 private:
  float bound_ = 0.0f;
  bool strict_ = true;
};

}  // namespace
}  // namespace study

// Not stateful: the draws are a function of the seed inputs.
REGISTER_OP("StudySigmoidOrBinary")
    .Input("x: float")
    .Input("p: float")
    .Input("coin_seed: int64")
    .Input("noise_seed: int64")
    .Output("y: float")
    .Output("aux: float")
    .Attr("coin: {'soft', 'hard', 'batch', 'example', 'unit'}")
    .Attr("keep: {'none', 'sig', 'z'}")
    .Attr("slope: float")
    .Attr("cutoff: float")
    .Attr("offset: float")
    .Attr("threshold: float")
    .Attr("noise_std: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      std::string keep;
      TF_RETURN_IF_ERROR(c->GetAttr("keep", &keep));
      c->set_output(1, keep == "none" ? c->Vector(0) : c->input(0));
      return absl::OkStatus();
    })
    .Doc("The sigmoid-or-binary activation's forward pass (study/kernels/sigmoid_or_binary.cc).");

REGISTER_OP("StudySigmoidOrBinaryGrad")
    .Input("dy: float")
    .Input("aux: float")
    .Output("dx: float")
    .Attr("surrogate: {'sigmoid', 'ste', 'hard_sigmoid'}")
    .Attr("scale: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("dy times the surrogate gradient, from the forward's aux output.");

REGISTER_OP("StudyCodeStats")
    .Input("pre: float")
    .Output("ones: float")
    .Output("outside: int64")
    .Attr("inside: {'lt', 'le'}")
    .Attr("bound: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle pre;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &pre));
      c->set_output(0, c->Vector(c->Dim(pre, 1)));
      c->set_output(1, c->Scalar());
      return absl::OkStatus();
    })
    .Doc("Ones per unit and the count of units outside |pre| < bound (or <= bound), one pass.");

REGISTER_KERNEL_BUILDER(Name("StudySigmoidOrBinary").Device(::tensorflow::DEVICE_CPU), study::SigmoidOrBinaryOp);
REGISTER_KERNEL_BUILDER(Name("StudySigmoidOrBinaryGrad").Device(::tensorflow::DEVICE_CPU),
                        study::SigmoidOrBinaryGradOp);
REGISTER_KERNEL_BUILDER(Name("StudyCodeStats").Device(::tensorflow::DEVICE_CPU), study::CodeStatsOp);
