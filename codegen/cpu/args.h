// The argument blocks of the CPU kernels, shared by every translation unit (kernels.cpp,
// int_kernels.cpp, operator.cpp). Python builds the same blocks with ctypes structures read
// from this very file (codegen/cpu/structs.py): one field per declaration below, in order.
// Field types: pointers, int64_t, int32_t, float.
#pragma once
#include <cstdint>

// How a format's codes and scales are read by the weight-only kernels. Their compile-time
// parameters (the template arguments of kernels.cpp):
//   BITS   code width (2..8)
//   SCALE  0: byte scale codes, multiplier = mult_table[code]; 1: float32 absmax, s / maxv
//   DEC    0: element = table16[code] (widths <= 4); 1: table[code] by gather;
//          2: element = int8(code) * step (the table is exactly that)
struct Args {
    const float* x;        // activations [M, Kp], Kp = n_blocks * block (zero padded)
    int64_t M, ldx;        // rows of x; row stride of x
    const uint8_t* codes;  // [N, row_bytes] packed codes
    int64_t row_bytes;
    const void* scales;    // [N, n_blocks]: uint8 codes or float32 absmax values
    int64_t n_blocks, block;
    const float* table;    // 2^BITS element values (at least 16)
    const float* mult_table;  // 256 multipliers (SCALE 0)
    float maxv, step;      // SCALE 1 divisor; DEC 2 element step
    const float* bias;     // [N] or null
    float* y;              // [M, N]
    int64_t N;
    int32_t round_to;      // the model's dtype: 0 float32; 1 bfloat16, 2 float16: each decoded
                           // weight rounded to it (round to nearest even, NaN kept), as the
                           // reference's weight is
};

// The integer path (int_kernels.cpp): activations -> int8 codes per block, as the reference
// quantises them.
struct ActArgs {
    const float* x;        // [M, K], row stride ldx
    int64_t M, ldx, K;
    int64_t tile, n_tiles; // the activation block (clamped to K) and the blocks per row
    int32_t clamped;       // block_size > K: the statistics see the padding's +0
    int32_t scale;         // 0: E8M0 power of two; 1: float32 absmax
    int32_t rule;          // power of two: 0 floor, 1 ceil, 2 rceil, 3 even
    int32_t is_signed;     // absmax: signed
    int32_t emax, frac, qmax;
    float maxv, xstep;     // the element's max value; 2^-frac
    int8_t* xq;            // [M, n_tiles * tile] codes, zero padded
    float* ax;             // [M, n_tiles] multiplier * 2^-frac (NaN: a block holding NaN/Inf)
    int32_t* xsum;         // [M, n_tiles] the sum of each block's codes
};

// Integer weights times the codes of ActArgs: exact integer block dot products.
struct IntArgs {
    const int8_t* xq; const float* ax; const int32_t* xsum;
    int64_t M, n_tiles, tile;
    const uint8_t* codes;  // [N, row_bytes] packed weight codes
    int64_t row_bytes;
    const void* scales;    // [N, n_blocks]: byte codes (mult_table) or float32 absmax values
    int64_t n_blocks, block;
    const float* mult_table;
    float maxv, wstep;     // absmax divisor; 2^-s of the weight element (int: 2^-frac)
    const float* table;    // the element's value of every code (table entry points: code c
                           // is the integer table[c] / wstep)
    const float* bias;     // [N] or null
    float* y;              // [M, N]
    int64_t N;
};

// The exported entry points' signatures (the operator calls them through these).
typedef void (*LinearFn)(const Args*, int);
typedef void (*DecodeFn)(const Args*, int64_t, int64_t, float*, int);
typedef void (*ValuesFn)(const Args*, const int64_t*, int64_t, float*);
typedef void (*IntFn)(const IntArgs*, int);
typedef void (*ActFn)(const ActArgs*, int);
