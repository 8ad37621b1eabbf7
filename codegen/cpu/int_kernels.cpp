// qcompile CPU integer path: integer weights times integer activations (built into the same
// library as kernels.cpp by codegen/cpu/build.py).
//
// For int elements on both sides (mxint8, int8, bfp, int4 weights, ...) the activations are
// quantised here (``act_quantize``: the reference's block scale and codes, bit for bit), each
// activation block's dot product with the weight is an exact integer sum, and the result is the
// Triton integer path's formula, the same on every instruction set:
//
//     y = fl32(...fl32(fl32(D_0 s_0) + fl32(D_1 s_1))... + b),  tiles in K order,
//
// ``D_t`` the integer dot product over activation block t, ``s_t = fl32(a_x a_w)`` and
// ``a = multiplier * 2^-frac`` (exact). The sum over tiles is sequential per output, so the
// kernels vectorise over weight rows: ``W`` rows at a time (16 with AVX-512), each lane one
// output.
//
// Integer dot products: with AVX-512 VNNI (its own build, QC_ISA 3), ``vpdpbusd`` multiplies
// unsigned by signed bytes, so a weight code w is offset to w + 128 and the activation block's
// code sum is subtracted times 128 (exact: every partial sum is an int32); without VNNI (AVX2,
// AVX-512 without VNNI), ``vpmaddubsw`` on |w| and x * sign(w) (|products| <= 2 * 127 * 127
// fits int16), then ``vpmaddwd``; the scalar build loops. 4-bit weight codes are read packed by
// the AVX2 / AVX-512 (no VNNI) dot products (dots8_nibbles, blocks of a multiple of 32 codes);
// other widths (and 4-bit codes elsewhere) are unpacked to signed bytes for the row group first.
//
// Elements whose every value is an integer multiple of 2^-s (mxfp4 / nvfp4's E2M1: s = 1, 2^s v
// in {0, +-1, 2, 3, 4, 6, 8, 12}; the selector's rule, qcompile.formats.elements.integer_grid)
// run the same integer dot products through a table of the integers 2^s v of every code (the
// ``_t`` entry points, ``CodeInts``), the block multiplier times 2^-s: packed 4-bit codes meet
// vpshufb (u = 2^s v + off, off = -min, an unsigned vpmaddubsw operand; off x the code sum
// comes out), other reads unpack the codes to signed bytes through the table.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "args.h"
#include "decode.h"
#include "simd.h"

namespace {

inline float pow2i(int e) {  // qcompile.formats.bits.pow2: 2^e from bits (the same wrap-around)
    const uint32_t b = e >= -126 ? (uint32_t)std::max(e + 127, 1) << 23
                                 : 1u << std::min(std::max(e + 149, 0), 22);
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline int floor_log2(float a) { int e; std::frexp(a, &e); return e - 1; }

// One activation block: its stored scale's multiplier * 2^-frac, its codes and their sum.
void act_block(const ActArgs& a, const float* x, int64_t len, int8_t* q, float* ax, int32_t* sum) {
    bool bad = false, plus_zero = false;
    float amax = 0.0f, hi = -INFINITY, lo = INFINITY;
    for (int64_t k = 0; k < len; ++k) {
        const float v = x[k];
        if (!std::isfinite(v)) bad = true;
        amax = std::max(amax, std::fabs(v));
        hi = std::max(hi, v);
        lo = std::min(lo, v);
        plus_zero |= v == 0.0f && !std::signbit(v);
    }
    if (len < a.tile || a.clamped) {  // zero padding (or the clamped block's +0) in the stats
        hi = std::max(hi, 0.0f);
        lo = std::min(lo, 0.0f);
        plus_zero = true;
    }
    float qmul, mult;
    if (a.scale == 0) {
        int e = -127;
        if (amax > 0.0f && !bad) {
            const int top = floor_log2(amax);
            if (a.rule == 0) e = top - a.emax;
            else if (a.rule == 1) {
                int ignored;
                e = top + (std::frexp(amax, &ignored) != 0.5f) - a.emax;  // not a power of two
            }
            else if (a.rule == 2) {
                e = top - floor_log2(a.maxv);
                e += a.maxv * pow2i(e) < amax;
            } else {
                const int step = a.frac + a.emax;
                const float m = amax * pow2i(-top);
                const bool carries = std::nearbyint(m * std::ldexp(1.0f, step)) >=
                                     std::ldexp(1.0f, step + 1);
                e = top - a.emax + carries;
            }
            e = std::min(std::max(e, -127), 127);
        }
        qmul = pow2i(-e);
        mult = bad ? NAN : pow2i(e);
    } else {
        float s = a.is_signed ? (hi >= -lo ? hi : lo) : amax;
        if (a.is_signed && s == 0.0f) s = plus_zero ? 0.0f : -0.0f;
        if (bad) s = NAN;
        qmul = s == 0.0f ? 0.0f : std::min(std::max(a.maxv / s, -FLT_MAX), FLT_MAX);
        if (std::isnan(s)) qmul = NAN;
        mult = s / a.maxv;
    }
    *ax = mult * a.xstep;
    const float grid = std::ldexp(1.0f, a.frac), top = (float)a.qmax;
    int32_t total = 0;
    for (int64_t k = 0; k < a.tile; ++k) {
        int c = 0;
        if (k < len && !bad)  // nearbyint: half to even (the default rounding mode)
            c = (int)std::min(std::max(std::nearbyint(x[k] * qmul * grid), -top), top);
        q[k] = (int8_t)c;
        total += c;
    }
    *sum = total;
}

void act_quantize(const ActArgs& a, int threads) {
    #pragma omp parallel for schedule(static) num_threads(a.M > 1 ? threads : 1)
    for (int64_t m = 0; m < a.M; ++m)
        for (int64_t t = 0; t < a.n_tiles; ++t) {
            const int64_t k0 = t * a.tile, len = std::min(a.tile, a.K - k0);
            act_block(a, a.x + m * a.ldx + k0, len, a.xq + (m * a.n_tiles + t) * a.tile,
                      a.ax + m * a.n_tiles + t, a.xsum + m * a.n_tiles + t);
        }
}

// A table element's codes as integers: v[c] = 2^s value(c) = table[c] / wstep (exact: the selector
// admits only such elements, |v| <= 127); for the packed 4-bit dot products u[c] = v[c] + off,
// off = -min v, taken where u <= 64 (four products u x added in int16 stay below 2^15).
struct CodeInts {
    int8_t v[256];
    alignas(16) uint8_t u[16];
    int32_t off;
    bool packed;
};
template <int BITS>
CodeInts code_ints(const IntArgs& a) {
    CodeInts t{};
    int lo = 0, hi = 0;
    for (int c = 0; c < (1 << BITS); ++c) {
        t.v[c] = (int8_t)std::lrint(a.table[c] / a.wstep);
        lo = std::min(lo, (int)t.v[c]);
        hi = std::max(hi, (int)t.v[c]);
    }
    t.off = -lo;
    t.packed = BITS == 4 && hi + t.off <= 64;
    for (int c = 0; c < 16 && BITS == 4; ++c) t.u[c] = (uint8_t)(t.v[c] + t.off);
    return t;
}

// D[r] = sum_k x[k] w_r[k] over one block of T codes, r < 8 (no VNNI): |w| times x * sign(w)
// in vpmaddubsw (|pair sums| <= 2 * 127 * 127 < 2^15), then vpmaddwd into int32 lanes.
#if QC_ISA >= 1
inline __m256i load_part(const int8_t* p, int64_t n) {  // n < 32 bytes, the rest zero
    alignas(32) int8_t buf[32] = {0};
    std::memcpy(buf, p, n);
    return _mm256_load_si256((const __m256i*)buf);
}
// 8 vectors of 8 int32 lanes -> lane r = the sum of vector r
inline __m256i reduce8(const __m256i* acc) {
    const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]),
                                         _mm256_hadd_epi32(acc[2], acc[3]));
    const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[4], acc[5]),
                                         _mm256_hadd_epi32(acc[6], acc[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20),
                            _mm256_permute2x128_si256(g0, g1, 0x31));
}
inline void dots8(const int8_t* const* w, const int8_t* x, int64_t T, int32_t* D) {
    __m256i acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t c = 0; c < T; c += 32) {
        const int64_t n = std::min<int64_t>(32, T - c);
        const __m256i xv = n == 32 ? _mm256_loadu_si256((const __m256i*)(x + c))
                                   : load_part(x + c, n);
        for (int r = 0; r < 8; ++r) {
            const __m256i wv = n == 32 ? _mm256_loadu_si256((const __m256i*)(w[r] + c))
                                       : load_part(w[r] + c, n);
            const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv),
                                                   _mm256_sign_epi8(xv, wv));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
        }
    }
    _mm256_storeu_si256((__m256i*)D, reduce8(acc));
}

// 4-bit weight codes read packed, 8 rows (no VNNI): byte b holds elements 2j (high nibble) and
// 2j + 1 (low); b ^ 0x88 turns each two's complement nibble w into u = w + 8 in 0..15, an
// unsigned vpmaddubsw operand as it is (|u0 x0 + u1 x1| <= 2 * 15 * 127, two such sums added
// in int16 <= 7620 < 2^15), and D = sum u x - 8 sum x, the activation block's code sum. One
// 32-byte load is 64 elements: its high nibbles are the even elements, its low nibbles the odd
// ones, so x comes in that order (nibble_order: per 64 codes the 32 even ones, then the 32 odd
// ones; a last 32 alone: its 16 even, then 16 odd). Unpacking the codes to bytes first cost
// more than the dot products: 3.5x the instructions and a round trip through memory.
// A table element (TAB): each nibble c becomes u[c] by vpshufb on the table in both lanes.
template <bool TAB>
inline __m256i nibble_dot(__m256i b, __m256i xe, __m256i xo, __m256i tab) {
    const __m256i low = _mm256_set1_epi8(15);
    if (!TAB) b = _mm256_xor_si256(b, _mm256_set1_epi8((char)0x88));
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low), lo = _mm256_and_si256(b, low);
    if (TAB) {
        hi = _mm256_shuffle_epi8(tab, hi);
        lo = _mm256_shuffle_epi8(tab, lo);
    }
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(hi, xe), _mm256_maddubs_epi16(lo, xo));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
// D[r] for one block of T codes (T % 32 == 0): w[r] the rows' packed bytes at the block's start,
// x the block's codes in nibble order (ci: a table element's integers, else int4's w + 8)
template <bool TAB>
inline void dots8_nibbles(const uint8_t* const* w, const int8_t* x, int64_t T, int32_t xsum,
                          int32_t* D, const CodeInts* ci) {
    const __m256i tab = TAB ? _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)ci->u))
                            : _mm256_setzero_si256();
    const int32_t off = TAB ? ci->off : 8;
    __m256i acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_si256();
    int64_t c = 0;
    for (; c + 64 <= T; c += 64) {
        const __m256i xe = _mm256_loadu_si256((const __m256i*)(x + c));
        const __m256i xo = _mm256_loadu_si256((const __m256i*)(x + c + 32));
        for (int r = 0; r < 8; ++r) {
            const __m256i b = _mm256_loadu_si256((const __m256i*)(w[r] + c / 2));
            acc[r] = _mm256_add_epi32(acc[r], nibble_dot<TAB>(b, xe, xo, tab));
        }
    }
    if (c < T) {  // 32 codes: 16 bytes; the upper lanes of every operand zero
        const __m256i xe = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(x + c)));
        const __m256i xo = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(x + c + 16)));
        for (int r = 0; r < 8; ++r) {
            const __m256i b = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(w[r] + c / 2)));
            acc[r] = _mm256_add_epi32(acc[r], nibble_dot<TAB>(b, xe, xo, tab));
        }
    }
    _mm256_storeu_si256((__m256i*)D, _mm256_sub_epi32(reduce8(acc), _mm256_set1_epi32(off * xsum)));
}
#endif

#if QC_ISA == 3
// 16 rows with VNNI: two rows' 32-byte chunks share a zmm (row r low, row r + 4 or r + 12
// high, so that reduce16 ends in row order), codes offset by 128 (unsigned): the offset is
// taken out with the activation block's code sum.
constexpr int LO[8] = {0, 1, 2, 3, 8, 9, 10, 11}, HI[8] = {4, 5, 6, 7, 12, 13, 14, 15};
inline __mmask32 chunk_mask(int64_t n) {
    return n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
}
inline __m512i weight_pair(const int8_t* const* w, int i, int64_t c, __mmask32 k) {
    const __m256i lo = _mm256_maskz_loadu_epi8(k, w[LO[i]] + c);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                         _mm256_maskz_loadu_epi8(k, w[HI[i]] + c), 1);
    return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
}
// 8 vectors (two rows' 8 lanes each) -> lane r = the sum of row r's lanes
inline __m512i reduce16(const __m512i* v) {
    __m512i c4[4], d2[2];
    for (int j = 0; j < 4; ++j)
        c4[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * j], v[2 * j + 1]),
                                 _mm512_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 2; ++j)
        d2[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(c4[2 * j], c4[2 * j + 1]),
                                 _mm512_unpackhi_epi64(c4[2 * j], c4[2 * j + 1]));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(d2[0], d2[1], 0x88),
                            _mm512_shuffle_i32x4(d2[0], d2[1], 0xDD));
}
// One row x one activation row (M = 1), blocks of a multiple of 32 codes: D[t] for every block,
// the row read front to back (one memory stream, which the prefetchers follow; 16 rows read
// side by side are 16 streams), 8 blocks reduced together.
inline void row_dots_vnni(const int8_t* w, const int8_t* x, const int32_t* xsum, int64_t T,
                          int64_t n_tiles, int32_t* D) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    int64_t t = 0;
    for (; t < n_tiles; t += 8) {
        const int tiles = (int)std::min<int64_t>(8, n_tiles - t);
        __m256i acc[8];
        for (int j = 0; j < 8; ++j) {
            acc[j] = _mm256_setzero_si256();
            for (int64_t c = 0; j < tiles && c < T; c += 32) {
                const int64_t k = (t + j) * T + c;
                const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + k)),
                                                    flip);
                const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + k));
                acc[j] = _mm256_dpbusd_epi32(acc[j], wv, xv);
            }
        }
        const __mmask8 k = (__mmask8)((1u << tiles) - 1);
        const __m256i s = reduce8(acc);
        const __m256i off = _mm256_slli_epi32(_mm256_maskz_loadu_epi32(k, xsum + t), 7);
        _mm256_mask_storeu_epi32(D + t, k, _mm256_sub_epi32(s, off));
    }
}
// D of one block for 16 rows (any block length: the weights are read per chunk)
inline void dots16_vnni(const int8_t* const* w, const int8_t* x, int64_t T, int32_t xsum,
                        int32_t* D) {
    __m512i v[8];
    for (int i = 0; i < 8; ++i) v[i] = _mm512_setzero_si512();
    for (int64_t c = 0; c < T; c += 32) {
        const __mmask32 k = chunk_mask(T - c);
        const __m512i xv = _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(k, x + c));
        for (int i = 0; i < 8; ++i) v[i] = _mm512_dpbusd_epi32(v[i], weight_pair(w, i, c, k), xv);
    }
    _mm512_storeu_si512(D, _mm512_sub_epi32(reduce16(v), _mm512_set1_epi32(128 * xsum)));
}
// Block t (at most 32 * CH codes) for every row of x: the 16 rows' codes stay in registers.
template <int CH>
void tile_vnni(const IntArgs& a, const int8_t* const* wt, int64_t t, F aw, float* acc) {
    __m512i wv[CH][8];
    for (int c = 0; c < CH; ++c)
        for (int i = 0; i < 8; ++i)
            wv[c][i] = weight_pair(wt, i, 32 * c, chunk_mask(a.tile - 32 * c));
    for (int64_t m = 0; m < a.M; ++m) {
        const int8_t* x = a.xq + (m * a.n_tiles + t) * a.tile;
        __m512i v[8];
        for (int i = 0; i < 8; ++i) v[i] = _mm512_setzero_si512();
        for (int c = 0; c < CH; ++c) {
            const __m512i xv = _mm512_broadcast_i64x4(
                _mm256_maskz_loadu_epi8(chunk_mask(a.tile - 32 * c), x + 32 * c));
            for (int i = 0; i < 8; ++i) v[i] = _mm512_dpbusd_epi32(v[i], wv[c][i], xv);
        }
        const __m512i d = _mm512_sub_epi32(reduce16(v),
                                           _mm512_set1_epi32(128 * a.xsum[m * a.n_tiles + t]));
        const F s = vmul(vset(a.ax[m * a.n_tiles + t]), aw);
        vstore(acc + m * 16, vadd(vload(acc + m * 16), vmul(_mm512_cvtepi32_ps(d), s)));
    }
}
#endif

constexpr int ROWS = W;  // weight rows per group: one output per float lane

// D[r] of one block for the ROWS rows of a group (NIB: 4-bit codes as packed, x in nibble
// order; ci: a table element's integers, null for int elements)
template <bool NIB>
inline void block_dots(const int8_t* const* wt, const int8_t* x, int64_t T, int32_t xsum,
                       int32_t* D, const CodeInts* ci) {
#if QC_ISA == 1 || QC_ISA == 2
    if (NIB) {
        const uint8_t* const* wb = (const uint8_t* const*)wt;
        for (int r0 = 0; r0 < ROWS; r0 += 8) {
            if (ci) dots8_nibbles<true>(wb + r0, x, T, xsum, D + r0, ci);
            else dots8_nibbles<false>(wb + r0, x, T, xsum, D + r0, ci);
        }
        return;
    }
#else
    (void)ci;
#endif
#if QC_ISA == 3
    dots16_vnni(wt, x, T, xsum, D);
#elif QC_ISA >= 1
    for (int r0 = 0; r0 < ROWS; r0 += 8) dots8(wt + r0, x, T, D + r0);
#else
    (void)xsum;
    int32_t dot = 0;
    for (int64_t k = 0; k < T; ++k) dot += (int32_t)x[k] * wt[0][k];
    D[0] = dot;
#endif
}

// 4-bit codes read packed by dots8_nibbles (AVX2 and AVX-512 without VNNI): for blocks of a
// multiple of 32 codes (a table element's where its u fit the int16 sums)
template <int BITS, bool TAB>
inline bool reads_nibbles(const IntArgs& a, const CodeInts& ci) {
    return BITS == 4 && (QC_ISA == 1 || QC_ISA == 2) && a.tile % 32 == 0 && (!TAB || ci.packed);
}

// Every block's codes in nibble order (dots8_nibbles): per 64 codes the even ones then the odd
// ones, a last 32 likewise by 16.
void nibble_order(const int8_t* xq, int64_t blocks, int64_t T, int8_t* out) {
    for (int64_t i = 0; i < blocks; ++i) {
        const int8_t* x = xq + i * T;
        int8_t* o = out + i * T;
        for (int64_t c = 0; c < T; c += 64) {
            const int64_t half = std::min<int64_t>(64, T - c) / 2;
            for (int64_t j = 0; j < half; ++j) {
                o[c + j] = x[c + 2 * j];
                o[c + half + j] = x[c + 2 * j + 1];
            }
        }
    }
}

// The row group n0 .. n0 + ROWS: y[m, n] for every m, from codes w[r] (signed bytes; NIB: 4-bit
// codes as packed, x in nibble order). Blocks in K order, each for every row of x (the group's
// codes of a block are read once); acc holds the M x ROWS running sums.
template <bool NIB>
void int_group(const IntArgs& a, const int8_t* xq, const int8_t* const* w, int64_t n0,
               const float* awt, float* acc, int32_t* rowD, const CodeInts* ci) {
    const int rows = (int)std::min<int64_t>(ROWS, a.N - n0);
    alignas(64) int32_t D[ROWS];
    for (int64_t m = 0; m < a.M; ++m) vstore(acc + m * ROWS, vzero());
#if QC_ISA == 3
    // decoding with short rows (at most 64 blocks: rowwise beat 16 rows side by side for
    // SmolLM2's K = 576 and 1536, lost for K = 4096; 2-core EPYC): rowD [row][block] first
    if (!NIB && a.M == 1 && a.tile % 32 == 0 && a.n_tiles <= 64) {
        for (int r = 0; r < ROWS; ++r)
            row_dots_vnni(w[r], a.xq, a.xsum, a.tile, a.n_tiles, rowD + r * a.n_tiles);
        const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                               6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32((int)a.n_tiles));
        F sum = vzero();
        for (int64_t t = 0; t < a.n_tiles; ++t) {
            const F d = _mm512_cvtepi32_ps(_mm512_i32gather_epi32(at, rowD + t, 4));
            const F s = vmul(vset(a.ax[t]), vload(awt + (t * a.tile / a.block) * ROWS));
            sum = vadd(sum, vmul(d, s));  // the formula's two roundings
        }
        vstore(acc, sum);
        for (int r = 0; r < rows; ++r) a.y[n0 + r] = acc[r] + (a.bias ? a.bias[n0 + r] : 0.0f);
        return;
    }
#endif
    for (int64_t t = 0; t < a.n_tiles; ++t) {
        const int64_t k0 = t * a.tile;
        const int8_t* wt[ROWS];
        for (int r = 0; r < ROWS; ++r) wt[r] = w[r] + (NIB ? k0 / 2 : k0);
        const F aw = vload(awt + (k0 / a.block) * ROWS);
#if QC_ISA == 3
        if (a.tile <= 32) { tile_vnni<1>(a, wt, t, aw, acc); continue; }
        if (a.tile <= 64) { tile_vnni<2>(a, wt, t, aw, acc); continue; }
#endif
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* x = xq + (m * a.n_tiles + t) * a.tile;
            block_dots<NIB>(wt, x, a.tile, a.xsum[m * a.n_tiles + t], D, ci);
            F d;
#if QC_ISA >= 2
            d = _mm512_cvtepi32_ps(_mm512_load_si512(D));
#elif QC_ISA == 1
            d = _mm256_cvtepi32_ps(_mm256_load_si256((const __m256i*)D));
#else
            d = (float)D[0];
#endif
            const F s = vmul(vset(a.ax[m * a.n_tiles + t]), aw);
            vstore(acc + m * ROWS, vadd(vload(acc + m * ROWS), vmul(d, s)));  // the formula's
        }                                                                    // two roundings
    }
    for (int64_t m = 0; m < a.M; ++m)
        for (int r = 0; r < rows; ++r)
            a.y[m * a.N + n0 + r] = acc[m * ROWS + r] + (a.bias ? a.bias[n0 + r] : 0.0f);
}

// Codes narrower than a byte, sign-extended to bytes: (c ^ half) - half. 4-bit codes (two per
// byte, the first in the high nibble) 32 at a time with 128-bit byte ops: a scalar loop here
// cost more than the integer dot products themselves (int4 x int8 ran at 4x the time of
// mxint8 x mxint8, whose bytes are read as they are).
template <int BITS>
inline void unpack_signed(const uint8_t* row, int64_t len, int8_t* u) {
    constexpr int half = 1 << (BITS - 1);
    int64_t k = 0;
#if QC_ISA >= 1
    if (BITS == 4) {
        const __m128i low = _mm_set1_epi8(15), sign = _mm_set1_epi8(8);
        for (; k + 32 <= len; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(row + k / 2));
            const __m128i hi = _mm_sub_epi8(_mm_xor_si128(
                _mm_and_si128(_mm_srli_epi16(b, 4), low), sign), sign);  // elements k, k+2, ..
            const __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(b, low), sign), sign);
            _mm_storeu_si128((__m128i*)(u + k), _mm_unpacklo_epi8(hi, lo));
            _mm_storeu_si128((__m128i*)(u + k + 16), _mm_unpackhi_epi8(hi, lo));
        }
    }
#endif
    for (; k < len; ++k) u[k] = (int8_t)((code_at<BITS>(row, k) ^ half) - half);
}

// A table element's codes as their integers ci.v[code] (4-bit codes 32 at a time by vpshufb).
template <int BITS>
inline void unpack_table(const uint8_t* row, int64_t len, const CodeInts& ci, int8_t* u) {
    int64_t k = 0;
#if QC_ISA >= 1
    if (BITS == 4) {
        const __m128i low = _mm_set1_epi8(15), tab = _mm_loadu_si128((const __m128i*)ci.v);
        for (; k + 32 <= len; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(row + k / 2));
            const __m128i hi = _mm_shuffle_epi8(tab, _mm_and_si128(_mm_srli_epi16(b, 4), low));
            const __m128i lo = _mm_shuffle_epi8(tab, _mm_and_si128(b, low));
            _mm_storeu_si128((__m128i*)(u + k), _mm_unpacklo_epi8(hi, lo));
            _mm_storeu_si128((__m128i*)(u + k + 16), _mm_unpackhi_epi8(hi, lo));
        }
    }
#endif
    for (; k < len; ++k) u[k] = ci.v[code_at<BITS>(row, k)];
}

// awt[b * ROWS + r] = a_w of block b of row n: multiplier * 2^-frac. Float32 scales divided W
// at a time (the same IEEE quotients): one division per block, one at a time, cost a third of
// a 4096-long int4 row's time.
template <int SCALE>
void block_multipliers(const IntArgs& a, const Args& wa, int64_t n, int r, float* awt) {
    int64_t b = 0;
    if (SCALE == 1) {
        const float* s = (const float*)a.scales + n * a.n_blocks;
        alignas(64) float v[W];
        for (; b + W <= a.n_blocks; b += W) {
            vstore(v, vmul(vdiv(vload(s + b), vset(a.maxv)), vset(a.wstep)));
            for (int j = 0; j < W; ++j) awt[(b + j) * ROWS + r] = v[j];
        }
    }
    for (; b < a.n_blocks; ++b) awt[b * ROWS + r] = multiplier<SCALE>(wa, n, b) * a.wstep;
}

// TAB: codes read through the table of a table element's integers (CodeInts)
template <int BITS, int SCALE, bool TAB>
void int_linear(const IntArgs& a, int threads) {
    const int64_t groups = (a.N + ROWS - 1) / ROWS, len = a.n_tiles * a.tile;
    CodeInts ints{};
    if (TAB) ints = code_ints<BITS>(a);
    const CodeInts* ci = TAB ? &ints : nullptr;
    const bool nib = reads_nibbles<BITS, TAB>(a, ints);
    const bool as_stored = (BITS == 8 && !TAB) || nib;  // the codes are read where they are
    std::vector<int8_t> xn(nib ? a.M * len : 0);  // x in nibble order
    if (nib) nibble_order(a.xq, a.M * a.n_tiles, a.tile, xn.data());
    #pragma omp parallel num_threads(threads)
    {
        std::vector<int8_t> unpacked(as_stored ? 0 : ROWS * len);
        std::vector<float> awt(a.n_blocks * ROWS + W, 0.0f);  // [block][row]: a_w
        std::vector<float> acc(a.M * ROWS);
        std::vector<int32_t> rowD(a.M == 1 ? ROWS * a.n_tiles : 0);  // M = 1: [row][block] D
        Args wa{};
        wa.scales = a.scales; wa.n_blocks = a.n_blocks; wa.mult_table = a.mult_table;
        wa.maxv = a.maxv;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t n0 = g * ROWS;
            const int8_t* w[ROWS];
            for (int r = 0; r < ROWS; ++r) {
                const int64_t n = std::min(n0 + r, a.N - 1);  // rows past N: computed, not stored
                const uint8_t* row = a.codes + n * a.row_bytes;
                block_multipliers<SCALE>(a, wa, n, r, awt.data());
                if (as_stored) { w[r] = (const int8_t*)row; continue; }
                int8_t* u = unpacked.data() + r * len;
                if (TAB) unpack_table<BITS>(row, len, ints, u);
                else unpack_signed<BITS>(row, len, u);
                w[r] = u;
            }
            if (nib) int_group<true>(a, xn.data(), w, n0, awt.data(), acc.data(), rowD.data(), ci);
            else int_group<false>(a, a.xq, w, n0, awt.data(), acc.data(), rowD.data(), ci);
        }
    }
}

}  // namespace

// per weight width and scale kind (the activation side is data: ActArgs), named
// qc_int_linear_b<BITS>_s<SCALE>, and _t for codes read through a table of integers
#define QC_INT_ENTRY(BITS, SCALE)                                                              \
    void qc_int_linear_b##BITS##_s##SCALE(const IntArgs* a, int threads) {                     \
        int_linear<BITS, SCALE, false>(*a, threads);                                           \
    }                                                                                          \
    void qc_int_linear_b##BITS##_s##SCALE##_t(const IntArgs* a, int threads) {                 \
        int_linear<BITS, SCALE, true>(*a, threads);                                            \
    }
#define QC_INT_SCALES(BITS) QC_INT_ENTRY(BITS, 0) QC_INT_ENTRY(BITS, 1)

extern "C" {
void qc_act_quantize(const ActArgs* a, int threads) { act_quantize(*a, threads); }
QC_INT_SCALES(2) QC_INT_SCALES(3) QC_INT_SCALES(4) QC_INT_SCALES(5) QC_INT_SCALES(6)
QC_INT_SCALES(7) QC_INT_SCALES(8)
}  // extern "C"
