// Vector helpers for one instruction set, chosen at compile time by QC_ISA (3: AVX-512 with
// VNNI, 2: AVX-512, 1: AVX2 + FMA, 0: scalar): the kernels are written once over these, with
// ``F`` W float lanes and ``I`` W int32 lanes.
#pragma once
#include <cstdint>
#if QC_ISA > 0
#include <immintrin.h>
#endif

namespace {

#if QC_ISA >= 2  // ------------------------------------------------ AVX-512 (3: with VNNI)
constexpr int W = 16;
typedef __m512 F;
typedef __m512i I;
inline F vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, F a) { _mm512_storeu_ps(p, a); }
inline F vset(float a) { return _mm512_set1_ps(a); }
inline F vzero() { return _mm512_setzero_ps(); }
inline F vmul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F vadd(F a, F b) { return _mm512_add_ps(a, b); }
inline F vfma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(F a) { return _mm512_reduce_add_ps(a); }
inline I bytes_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline I bytes_s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline I hi4(I a) { return _mm512_srli_epi32(a, 4); }
inline I lo4(I a) { return _mm512_and_si512(a, _mm512_set1_epi32(15)); }
struct Table16 { F t; explicit Table16(const float* p) : t(_mm512_loadu_ps(p)) {} };
inline F look16(const Table16& tb, I i) { return _mm512_permutexvar_ps(i, tb.t); }
inline F gather(const float* t, I i) { return _mm512_i32gather_ps(i, t, 4); }
inline F tofloat(I a) { return _mm512_cvtepi32_ps(a); }
// (e0..e15, o0..o15) -> (e0 o0 e1 o1 .. e7 o7), (e8 o8 .. e15 o15)
inline void interleave(F e, F o, F& w0, F& w1) {
    const I i0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const I i1 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    w0 = _mm512_permutex2var_ps(e, i0, o);
    w1 = _mm512_permutex2var_ps(e, i1, o);
}
#elif QC_ISA == 1  // ----------------------------------------------------------- AVX2 + FMA
constexpr int W = 8;
typedef __m256 F;
typedef __m256i I;
inline F vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, F a) { _mm256_storeu_ps(p, a); }
inline F vset(float a) { return _mm256_set1_ps(a); }
inline F vzero() { return _mm256_setzero_ps(); }
inline F vmul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F vadd(F a, F b) { return _mm256_add_ps(a, b); }
inline F vfma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline I bytes_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
inline I bytes_s8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
inline I hi4(I a) { return _mm256_srli_epi32(a, 4); }
inline I lo4(I a) { return _mm256_and_si256(a, _mm256_set1_epi32(15)); }
struct Table16 {  // two 8-entry halves: permute within each, pick by bit 3 of the code
    F lo, hi;
    explicit Table16(const float* p) : lo(_mm256_loadu_ps(p)), hi(_mm256_loadu_ps(p + 8)) {}
};
inline F look16(const Table16& tb, I i) {
    F a = _mm256_permutevar8x32_ps(tb.lo, i), b = _mm256_permutevar8x32_ps(tb.hi, i);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))));
}
inline F gather(const float* t, I i) { return _mm256_i32gather_ps(t, i, 4); }
inline F tofloat(I a) { return _mm256_cvtepi32_ps(a); }
inline void interleave(F e, F o, F& w0, F& w1) {
    F lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);  // per 128-bit lane
    w0 = _mm256_permute2f128_ps(lo, hi, 0x20);
    w1 = _mm256_permute2f128_ps(lo, hi, 0x31);
}
#else  // ---------------------------------------------------------------------- scalar
constexpr int W = 1;
typedef float F;
typedef int32_t I;
inline F vload(const float* p) { return *p; }
inline void vstore(float* p, F a) { *p = a; }
inline F vset(float a) { return a; }
inline F vzero() { return 0.0f; }
inline F vmul(F a, F b) { return a * b; }
inline F vadd(F a, F b) { return a + b; }
inline F vfma(F a, F b, F c) { return a * b + c; }  // two roundings: -ffp-contract=off
inline float vsum(F a) { return a; }
inline I bytes_u8(const uint8_t* p) { return *p; }
inline I bytes_s8(const uint8_t* p) { return (int8_t)*p; }
inline I hi4(I a) { return a >> 4; }
inline I lo4(I a) { return a & 15; }
struct Table16 { const float* t; explicit Table16(const float* p) : t(p) {} };
inline F look16(const Table16& tb, I i) { return tb.t[i]; }
inline F gather(const float* t, I i) { return t[i]; }
inline F tofloat(I a) { return (float)a; }
inline void interleave(F e, F o, F& w0, F& w1) { w0 = e; w1 = o; }
#endif

}  // namespace
