// qcompile CPU kernels: block-quantised weights decoded in registers (built and loaded by
// codegen/cpu/build.py, one library per instruction set, with int_kernels.cpp).
//
// One kernel body serves every format, because the format description enters as data computed
// by the reference implementation itself (codegen/cpu/plans.py):
// * the element: a table of the float32 values of all 2^bits codes (``element.decode`` of every
//   code), looked up per weight -- with one permute for widths up to 4 bits (a 16-entry table
//   is one AVX-512 register), as a sign-extended integer times a power of two where the table
//   is exactly that (int8, mxint8, bfp8: checked code by code), and with a gather otherwise;
// * the block multiplier: a table of the float32 multipliers of all 256 scale codes for byte
//   scales (E8M0, NVFP4's E4M3 times its tensor scale), or, for float32 absmax scales, the
//   reference's correctly rounded division ``scale / max_value``.
//
// A decoded weight is ``table[code] * multiplier`` in float32: the reference dequantise's value,
// bit for bit. The matmul accumulates ``x * w`` in float32 with FMA, within the bound of
// docs/architecture.md. Codes are read in their packed form (4-bit: a byte holds two codes, the
// first in the high nibble; 8-bit: one byte; other widths: the big-endian bit stream of
// qcompile/formats/packing.py, unpacked one block at a time).
//
// Compile-time values (-D flags): QC_ISA (simd.h), QC_PREFETCH (bytes that weight codes are
// fetched ahead of their use), QC_SOURCE_HASH (the hash of the sources and flags, checked when
// the library is loaded).
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

#if !defined(QC_ISA) || !defined(QC_PREFETCH) || !defined(QC_SOURCE_HASH)
#error "built by codegen/cpu/build.py, which defines QC_ISA, QC_PREFETCH and QC_SOURCE_HASH"
#endif

namespace {

// y[m, n] for MB rows of x starting at m0, one weight row n; R: each decoded weight rounded to
// the model's dtype (args.h's round_to), so no block factors out of the sum.
template <int BITS, int SCALE, int DEC, int MB, int R>
void row_dot(const Args& a, int64_t n, int64_t m0, uint8_t* unpacked) {
    const uint8_t* row = a.codes + n * a.row_bytes;
    const Table16 t16(a.table);
    F acc[MB];
    float tail[MB];
    for (int m = 0; m < MB; ++m) { acc[m] = vzero(); tail[m] = 0.0f; }
    for (int64_t b = 0; b < a.n_blocks; ++b) {
        const float mult = multiplier<SCALE>(a, n, b);
        const F vm = vset(mult);
        const int64_t k0 = b * a.block;
        if (BITS == 4 && (a.block & 1) == 0) {
            // W bytes hold 2W elements: decode the high (even) and low (odd) nibbles, then
            // interleave them back into element order
            const int64_t half = a.block / 2, j0 = k0 / 2;
            int64_t j = 0;
            for (; j + W <= half; j += W) {
                I cs = bytes_u8(row + j0 + j);
                F w0, w1;
                interleave(vround<R>(vmul(decode_vec<BITS, DEC>(a, t16, hi4(cs)), vm)),
                           vround<R>(vmul(decode_vec<BITS, DEC>(a, t16, lo4(cs)), vm)), w0, w1);
                for (int m = 0; m < MB; ++m) {
                    const float* xr = a.x + (m0 + m) * a.ldx + k0 + 2 * j;
                    acc[m] = vfma(vload(xr), w0, acc[m]);
                    acc[m] = vfma(vload(xr + W), w1, acc[m]);
                }
            }
            for (; j < half; ++j) {
                float we = sround<R>(element<BITS, DEC>(a, row[j0 + j] >> 4) * mult);
                float wo = sround<R>(element<BITS, DEC>(a, row[j0 + j] & 15) * mult);
                for (int m = 0; m < MB; ++m) {
                    const float* xr = a.x + (m0 + m) * a.ldx + k0 + 2 * j;
                    tail[m] += xr[0] * we + xr[1] * wo;
                }
            }
            continue;
        }
        const float ms = mult * a.step;
        if (DEC == 2 && R == 0 && std::isfinite(ms) && !(ms != 0.0f && std::fabs(ms) < FLT_MIN)) {
            // int8 codes: sum x * code over the block, then one multiply by mult * step (exact:
            // a normal float times a power of two); the block factors out, within the float32
            // bound of the docs. A subnormal or NaN product: each weight decoded, below.
            const uint8_t* cs = row + k0;
            for (int64_t l = 0; l < a.block; l += 64)  // fetch ahead: see group_dot
                __builtin_prefetch(cs + l + QC_PREFETCH);
            F t[MB], u[MB];  // two partial sums per row: see group_dot
            for (int m = 0; m < MB; ++m) t[m] = u[m] = vzero();
            int64_t k = 0;
            for (; k + 2 * W <= a.block; k += 2 * W) {
                const F c0 = tofloat(bytes_s8(cs + k)), c1 = tofloat(bytes_s8(cs + k + W));
                for (int m = 0; m < MB; ++m) {
                    const float* xr = a.x + (m0 + m) * a.ldx + k0 + k;
                    t[m] = vfma(vload(xr), c0, t[m]);
                    u[m] = vfma(vload(xr + W), c1, u[m]);
                }
            }
            for (; k + W <= a.block; k += W) {
                const F c = tofloat(bytes_s8(cs + k));
                for (int m = 0; m < MB; ++m)
                    t[m] = vfma(vload(a.x + (m0 + m) * a.ldx + k0 + k), c, t[m]);
            }
            const F vms = vset(ms);
            for (int m = 0; m < MB; ++m) acc[m] = vfma(vadd(t[m], u[m]), vms, acc[m]);
            for (; k < a.block; ++k) {
                const float w = element<BITS, DEC>(a, cs[k]) * mult;
                for (int m = 0; m < MB; ++m) tail[m] += a.x[(m0 + m) * a.ldx + k0 + k] * w;
            }
            continue;
        }
        const uint8_t* cs = row + k0;  // 8 bit: the codes themselves
        if (BITS != 8) {  // other widths (and odd 4-bit blocks): this block's codes, a byte each
            for (int64_t k = 0; k < a.block; ++k) unpacked[k] = (uint8_t)code_at<BITS>(row, k0 + k);
            cs = unpacked;
        }
        int64_t k = 0;
        for (; k + W <= a.block; k += W) {
            I c = DEC == 2 ? bytes_s8(cs + k) : bytes_u8(cs + k);
            F w = vround<R>(vmul(decode_vec<BITS, DEC>(a, t16, c), vm));
            for (int m = 0; m < MB; ++m)
                acc[m] = vfma(vload(a.x + (m0 + m) * a.ldx + k0 + k), w, acc[m]);
        }
        for (; k < a.block; ++k) {
            float w = sround<R>(element<BITS, DEC>(a, cs[k]) * mult);
            for (int m = 0; m < MB; ++m) tail[m] += a.x[(m0 + m) * a.ldx + k0 + k] * w;
        }
    }
    for (int m = 0; m < MB; ++m)
        a.y[(m0 + m) * a.N + n] = vsum(acc[m]) + tail[m] + (a.bias ? a.bias[n] : 0.0f);
}

#if QC_ISA >= 2
// 4-bit codes, AVX-512: 64 bytes (128 codes) per load, as 16 dwords; shifting them by 4j puts
// nibble j of every dword in its low 4 bits, which is all a permute reads, so one shift and one
// permute decode 16 weights. Nibble j of dword d is element 8d + E[j] of the group (the high
// nibble of a byte comes first), so x is rearranged to that order once per call. Eight
// consecutive elements share a lane, hence a block, when the block is a multiple of 8.
constexpr int E[8] = {1, 0, 3, 2, 5, 4, 7, 6};

// The multipliers of a group's 16 lanes: the group spans at most 16 blocks (blocks of 8 or more
// elements), first[g] the first; lane d takes block first[g] + rel[16 g + d] by one permute of
// the 16 block multipliers from first[g] on (lanes past the row are masked to zero).
template <int MB>
void group_dot(const Args& a, int64_t n, int64_t m0, const float* xr, int64_t groups,
               const float* block_mult, const int32_t* first, const int32_t* rel,
               const __mmask16* lanes) {
    const uint8_t* row = a.codes + n * a.row_bytes;
    const F lut = _mm512_loadu_ps(a.table);
    F acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = vzero();
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t left = a.row_bytes - g * 64;
        __builtin_prefetch(row + g * 64 + QC_PREFETCH);
        const I v = left >= 64 ? _mm512_loadu_si512(row + g * 64)
                               : _mm512_maskz_loadu_epi8((__mmask64)((1ull << left) - 1), row + g * 64);
        // sum x * element over the group's 8 nibbles, then one multiply by the lane
        // multipliers (the block factors out: within the float32 bound of the docs)
        // with few rows, P partial sums per row break the chain of dependent FMAs (their
        // latency, not their throughput, bounds a one-row GEMV)
        constexpr int P = MB == 1 ? 4 : MB == 2 ? 2 : 1;
        F t[MB][P];
        for (int m = 0; m < MB; ++m)
            for (int p = 0; p < P; ++p) t[m][p] = vzero();
        for (int j = 0; j < 8; ++j) {
            const F w = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), lut);
            for (int m = 0; m < MB; ++m)
                t[m][j % P] = vfma(vload(xr + (((m0 + m) * groups + g) * 8 + j) * 16), w,
                                   t[m][j % P]);
        }
        for (int m = 0; m < MB; ++m) {
            if (P == 4) t[m][0] = _mm512_add_ps(_mm512_add_ps(t[m][0], t[m][2]),
                                                _mm512_add_ps(t[m][1], t[m][3]));
            if (P == 2) t[m][0] = _mm512_add_ps(t[m][0], t[m][1]);
        }
        const F vm = _mm512_maskz_permutexvar_ps(lanes[g], _mm512_loadu_si512(rel + g * 16),
                                                 vload(block_mult + first[g]));
        for (int m = 0; m < MB; ++m) acc[m] = vfma(t[m][0], vm, acc[m]);
    }
    for (int m = 0; m < MB; ++m)
        a.y[(m0 + m) * a.N + n] = vsum(acc[m]) + (a.bias ? a.bias[n] : 0.0f);
}

// block_mult[b] = multiplier<SCALE>(a, n, b) for every block of row n, 16 at a time
template <int SCALE>
void row_multipliers(const Args& a, int64_t n, float* block_mult) {
    for (int64_t b = 0; b < a.n_blocks; b += 16) {
        const __mmask16 k = a.n_blocks - b >= 16 ? (__mmask16)0xFFFF
                                                 : (__mmask16)((1u << (a.n_blocks - b)) - 1);
        F m;
        if (SCALE == 0) {
            const uint8_t* codes = (const uint8_t*)a.scales + n * a.n_blocks + b;
            const I c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes));
            m = _mm512_mask_i32gather_ps(vzero(), k, c, a.mult_table, 4);
        } else {  // the same IEEE division as the scalar s / maxv
            const float* s = (const float*)a.scales + n * a.n_blocks + b;
            m = _mm512_div_ps(_mm512_maskz_loadu_ps(k, s), vset(a.maxv));
        }
        _mm512_mask_storeu_ps(block_mult + b, k, m);
    }
}

template <int SCALE>
void linear4(const Args& a, int threads) {
    const int64_t kp = a.n_blocks * a.block, groups = (kp + 127) / 128;
    std::vector<float> xr(a.M * groups * 128);
    for (int64_t m = 0; m < a.M; ++m)
        for (int64_t g = 0; g < groups; ++g)
            for (int j = 0; j < 8; ++j)
                for (int d = 0; d < 16; ++d) {
                    const int64_t k = g * 128 + 8 * d + E[j];
                    xr[((m * groups + g) * 8 + j) * 16 + d] = k < kp ? a.x[m * a.ldx + k] : 0.0f;
                }
    // lane d of group g holds elements g*128 + 8d .. +7: one block, as the block is a multiple
    // of 8 (lanes past the row: masked off)
    std::vector<int32_t> first(groups), rel(groups * 16, 0);
    std::vector<__mmask16> lanes(groups, 0);
    for (int64_t g = 0; g < groups; ++g) {
        first[g] = (int32_t)(g * 128 / a.block);
        for (int d = 0; d < 16; ++d) {
            const int64_t k = g * 128 + 8 * d;
            if (k >= kp) continue;
            rel[g * 16 + d] = (int32_t)(k / a.block - first[g]);
            lanes[g] |= (__mmask16)(1u << d);
        }
    }
    #pragma omp parallel num_threads(threads)
    {
        std::vector<float> block_mult(a.n_blocks + 16, 0.0f);  // + 16: whole vector loads
        float* bm = block_mult.data();
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < a.N; ++n) {
            row_multipliers<SCALE>(a, n, bm);
            int64_t m = 0;
            for (; m + 4 <= a.M; m += 4)
                group_dot<4>(a, n, m, xr.data(), groups, bm, first.data(), rel.data(), lanes.data());
            switch (a.M - m) {
                case 3: group_dot<3>(a, n, m, xr.data(), groups, bm, first.data(), rel.data(), lanes.data()); break;
                case 2: group_dot<2>(a, n, m, xr.data(), groups, bm, first.data(), rel.data(), lanes.data()); break;
                case 1: group_dot<1>(a, n, m, xr.data(), groups, bm, first.data(), rel.data(), lanes.data()); break;
                default: break;
            }
        }
    }
}
#endif

template <int BITS, int SCALE, int DEC, int R>
void rows_linear(const Args& a, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        std::vector<uint8_t> buffer(BITS == 8 ? 0 : a.block + W);  // one block's codes
        uint8_t* unpacked = buffer.data();
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < a.N; ++n) {
            int64_t m = 0;
            for (; m + 4 <= a.M; m += 4) row_dot<BITS, SCALE, DEC, 4, R>(a, n, m, unpacked);
            switch (a.M - m) {
                case 3: row_dot<BITS, SCALE, DEC, 3, R>(a, n, m, unpacked); break;
                case 2: row_dot<BITS, SCALE, DEC, 2, R>(a, n, m, unpacked); break;
                case 1: row_dot<BITS, SCALE, DEC, 1, R>(a, n, m, unpacked); break;
                default: break;
            }
        }
    }
}

// 4-bit codes through the 16-entry table (DEC 0), even blocks: row_dot's sums, in its order
// (bit for bit its results), with each block's 16 decoded values (table * multiplier, rounded
// to the model's dtype R) made once per block instead of per weight: the multiply and the
// rounding are per element, so the values are the same; a bfloat16 model's rounding was most
// of the work of each weight.
template <int SCALE, int R, int MB>
void table4_dot(const Args& a, int64_t n, int64_t m0) {
    const uint8_t* row = a.codes + n * a.row_bytes;
    F acc[MB];
    float tail[MB];
    for (int m = 0; m < MB; ++m) { acc[m] = vzero(); tail[m] = 0.0f; }
    alignas(64) float lut[16];
    for (int64_t b = 0; b < a.n_blocks; ++b) {
        const F vm = vset(multiplier<SCALE>(a, n, b));
        for (int i = 0; i < 16; i += W) vstore(lut + i, vround<R>(vmul(vload(a.table + i), vm)));
        const Table16 t(lut);
        const int64_t k0 = b * a.block, half = a.block / 2, j0 = k0 / 2;
        for (int64_t l = 0; l < half; l += 64)  // fetch ahead: see group_dot
            __builtin_prefetch(row + j0 + l + QC_PREFETCH);
        int64_t j = 0;
        for (; j + W <= half; j += W) {
            const I cs = bytes_u8(row + j0 + j);
            F w0, w1;
            interleave(look16(t, hi4(cs)), look16(t, lo4(cs)), w0, w1);
            for (int m = 0; m < MB; ++m) {
                const float* xr = a.x + (m0 + m) * a.ldx + k0 + 2 * j;
                acc[m] = vfma(vload(xr), w0, acc[m]);
                acc[m] = vfma(vload(xr + W), w1, acc[m]);
            }
        }
        for (; j < half; ++j) {
            const float we = lut[row[j0 + j] >> 4], wo = lut[row[j0 + j] & 15];
            for (int m = 0; m < MB; ++m) {
                const float* xr = a.x + (m0 + m) * a.ldx + k0 + 2 * j;
                tail[m] += xr[0] * we + xr[1] * wo;
            }
        }
    }
    for (int m = 0; m < MB; ++m)
        a.y[(m0 + m) * a.N + n] = vsum(acc[m]) + tail[m] + (a.bias ? a.bias[n] : 0.0f);
}

template <int SCALE, int R>
void table4_linear(const Args& a, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < a.N; ++n) {
        int64_t m = 0;
        for (; m + 4 <= a.M; m += 4) table4_dot<SCALE, R, 4>(a, n, m);
        switch (a.M - m) {
            case 3: table4_dot<SCALE, R, 3>(a, n, m); break;
            case 2: table4_dot<SCALE, R, 2>(a, n, m); break;
            case 1: table4_dot<SCALE, R, 1>(a, n, m); break;
            default: break;
        }
    }
}

template <int BITS, int SCALE, int DEC>
void linear(const Args& a, int threads) {
    // a bfloat16 / float16 model: its weights rounded one by one (the group kernel linear4
    // factors each block's multiplier out of its sums, so it serves float32 models only)
    // (a float32 model keeps rows_linear on AVX2: table4_linear measured 1.09x its decode time
    // on SmolLM2, twice in paired runs)
    if (BITS == 4 && DEC == 0 && (a.block & 1) == 0) {
        if (a.round_to == 1) return table4_linear<SCALE, 1>(a, threads);
        if (a.round_to == 2) return table4_linear<SCALE, 2>(a, threads);
    }
    if (a.round_to == 1) return rows_linear<BITS, SCALE, DEC, 1>(a, threads);
    if (a.round_to == 2) return rows_linear<BITS, SCALE, DEC, 2>(a, threads);
#if QC_ISA >= 2
    if (BITS == 4 && DEC == 0 && a.block % 8 == 0) return linear4<SCALE>(a, threads);
#endif
    rows_linear<BITS, SCALE, DEC, 0>(a, threads);
}

// Rows n0..n1 of the weight, decoded: out[(n - n0) * n_blocks * block + k], float32; each
// value is element * multiplier, the reference's, bit for bit (vectorised for 4 and 8 bits).
template <int BITS, int SCALE, int DEC>
void decode(const Args& a, int64_t n0, int64_t n1, float* out, int threads) {
    const int64_t len = a.n_blocks * a.block;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = a.codes + n * a.row_bytes;
        const Table16 t16(a.table);
        float* o = out + (n - n0) * len;
        for (int64_t b = 0; b < a.n_blocks; ++b) {
            const float mult = multiplier<SCALE>(a, n, b);
            const F vm = vset(mult);
            int64_t k = b * a.block;
            const int64_t end = k + a.block;
            if (BITS == 4 && (a.block & 1) == 0) {
                for (; k + 2 * W <= end; k += 2 * W) {
                    I cs = bytes_u8(row + k / 2);
                    F w0, w1;
                    interleave(vmul(decode_vec<BITS, DEC>(a, t16, hi4(cs)), vm),
                               vmul(decode_vec<BITS, DEC>(a, t16, lo4(cs)), vm), w0, w1);
                    vstore(o + k, w0);
                    vstore(o + k + W, w1);
                }
            } else if (BITS == 8) {
                for (; k + W <= end; k += W) {
                    I c = DEC == 2 ? bytes_s8(row + k) : bytes_u8(row + k);
                    vstore(o + k, vmul(decode_vec<BITS, DEC>(a, t16, c), vm));
                }
            }
            for (; k < end; ++k) o[k] = element<BITS, DEC>(a, code_at<BITS>(row, k)) * mult;
        }
    }
}

// Decoded values at flat positions of the padded [N, n_blocks * block] layout.
template <int BITS, int SCALE, int DEC>
void values_at(const Args& a, const int64_t* flat, int64_t count, float* out) {
    const int64_t len = a.n_blocks * a.block;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t n = flat[i] / len, k = flat[i] % len;
        out[i] = element<BITS, DEC>(a, code_at<BITS>(a.codes + n * a.row_bytes, k)) *
                 multiplier<SCALE>(a, n, k / a.block);
    }
}

}  // namespace

// The exported entry points: linear, decode and decoded values at positions (OPQ outliers),
// per (bits, scale, dec) combination, named qc_<entry>_b<BITS>_s<SCALE>_d<DEC>
// (codegen/cpu/plans.py finds them by that name).
#define QC_ENTRIES(BITS, SCALE, DEC)                                                           \
    void qc_linear_b##BITS##_s##SCALE##_d##DEC(const Args* a, int threads) {                    \
        linear<BITS, SCALE, DEC>(*a, threads);                                                 \
    }                                                                                          \
    void qc_decode_b##BITS##_s##SCALE##_d##DEC(const Args* a, int64_t n0, int64_t n1,           \
                                               float* out, int threads) {                      \
        decode<BITS, SCALE, DEC>(*a, n0, n1, out, threads);                                    \
    }                                                                                          \
    void qc_values_b##BITS##_s##SCALE##_d##DEC(const Args* a, const int64_t* flat,              \
                                               int64_t count, float* out) {                    \
        values_at<BITS, SCALE, DEC>(*a, flat, count, out);                                     \
    }
// every combination a format can need: widths up to 4 the 16-entry table (DEC 0), every width
// the gather (DEC 1), 8-bit integers the integer conversion (DEC 2); both scale kinds
#define QC_SCALES(BITS, DEC) QC_ENTRIES(BITS, 0, DEC) QC_ENTRIES(BITS, 1, DEC)

extern "C" {
const char* qc_source_hash() { return QC_SOURCE_HASH; }
int qc_isa() { return QC_ISA; }
QC_SCALES(2, 0) QC_SCALES(3, 0) QC_SCALES(4, 0)
QC_SCALES(2, 1) QC_SCALES(3, 1) QC_SCALES(4, 1) QC_SCALES(5, 1) QC_SCALES(6, 1)
QC_SCALES(7, 1) QC_SCALES(8, 1)
QC_SCALES(8, 2)
}  // extern "C"
