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
inline F vdiv(F a, F b) { return _mm512_div_ps(a, b); }
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
// a to bfloat16's precision (round to nearest even; NaN: the quiet NaN 0x7FC0 that c10 gives)
inline F vround_bf16(F a) {
    const I b = _mm512_castps_si512(a);
    const I lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const I r = _mm512_and_si512(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                                 _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), vset(__builtin_nanf("")));
}
// a to float16's precision (the conversion instruction: round to nearest even, subnormals,
// overflow to infinity)
inline F vround_f16(F a) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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
inline F vdiv(F a, F b) { return _mm256_div_ps(a, b); }
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
inline F vround_bf16(F a) {  // as the AVX-512 one
    const I b = _mm256_castps_si256(a);
    const I lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const I r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                                 _mm256_set1_epi32((int)0xFFFF0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), vset(__builtin_nanf("")),
                            _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
inline F vround_f16(F a) {  // F16C
    return _mm256_cvtph_ps(_mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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
inline F vdiv(F a, F b) { return a / b; }
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

// One float rounded to bfloat16's / float16's precision, as the vector forms (every ISA: the
// scalar tails of the kernels, and the scalar build's vectors of one)
inline float round_bf16(float a) {
    if (a != a) return __builtin_nanf("");
    uint32_t b;
    __builtin_memcpy(&b, &a, 4);
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    __builtin_memcpy(&a, &b, 4);
    return a;
}
inline float round_f16(float a) {
    if (a != a) return __builtin_nanf("");
    const float mag = a < 0 ? -a : a;
    if (mag >= 65520.0f) return a < 0 ? -__builtin_inff() : __builtin_inff();  // past the max
    if (mag < 6.103515625e-05f) {  // below 2^-14: float16's subnormals, multiples of 2^-24
        const float q = mag * 16777216.0f;  // exact: a power of two
        float r = (float)(int32_t)q;
        const float frac = q - r;  // round half to even
        if (frac > 0.5f || (frac == 0.5f && ((int32_t)r & 1))) r += 1.0f;
        r *= 5.9604644775390625e-08f;
        return a < 0 ? -r : r;
    }
    uint32_t b;  // a normal float16: 10 of float's 23 mantissa bits, round to nearest even
    __builtin_memcpy(&b, &a, 4);
    b = (b + 0xFFFu + ((b >> 13) & 1u)) & 0xFFFFE000u;
    __builtin_memcpy(&a, &b, 4);
    return a;
}
#if QC_ISA == 0
inline F vround_bf16(F a) { return round_bf16(a); }
inline F vround_f16(F a) { return round_f16(a); }
#endif
// w rounded to the model's dtype R (args.h's round_to: 0 float32, 1 bfloat16, 2 float16)
template <int R>
inline F vround(F w) { return R == 1 ? vround_bf16(w) : R == 2 ? vround_f16(w) : w; }
template <int R>
inline float sround(float w) { return R == 1 ? round_bf16(w) : R == 2 ? round_f16(w) : w; }

}  // namespace
