// Reading one weight: its code (any width), its element value and its block multiplier, the
// reference's values bit for bit (shared by kernels.cpp and int_kernels.cpp).
#pragma once
#include <cstdint>

#include "args.h"
#include "simd.h"

namespace {

template <int SCALE>
inline float multiplier(const Args& a, int64_t n, int64_t b) {
    if (SCALE == 0) return a.mult_table[((const uint8_t*)a.scales)[n * a.n_blocks + b]];
    return ((const float*)a.scales)[n * a.n_blocks + b] / a.maxv;
}

// the code of element k of row n (any width; the big-endian bit stream of packing.py)
template <int BITS>
inline int code_at(const uint8_t* row, int64_t k) {
    if (BITS == 8) return row[k];
    if (BITS == 4) return (k & 1) ? (row[k >> 1] & 15) : (row[k >> 1] >> 4);
    const int64_t bit = k * BITS;
    const int off = bit & 7;
    if (off + BITS <= 8) return (row[bit >> 3] >> (8 - BITS - off)) & ((1 << BITS) - 1);
    const int word = (row[bit >> 3] << 8) | row[(bit >> 3) + 1];  // both bytes in the row
    return (word >> (16 - BITS - off)) & ((1 << BITS) - 1);
}

template <int BITS, int DEC>
inline float element(const Args& a, int c) {
    if (DEC == 2) return (float)(int8_t)c * a.step;
    return a.table[c];
}

template <int BITS, int DEC>
inline F decode_vec(const Args& a, const Table16& t16, I codes) {
    if (DEC == 0) return look16(t16, codes);
    if (DEC == 1) return gather(a.table, codes);
    return vmul(tofloat(codes), vset(a.step));  // exact: |code| <= 128, step a power of two
}

}  // namespace
