// The torch operators qcompile_cpu::linear and qcompile_cpu::int_linear: the one CPU linear
// driver (qcompile_cpu::experts_linear: the same driver over a mixture's grouped experts).
// Compiled graphs call them without a Python frame per call (a decoding model calls a
// linear per layer and token), and codegen/cpu/entry.py's ``linear`` calls them too, so the
// choice between the GEMV kernel, one decoded panel and cache-sized panels is made here alone.
//
// The kernel libraries (kernels.cpp, int_kernels.cpp) stay plain C, built per instruction set
// and loaded with ctypes; Python registers each format once per process (``qc_register``: its
// kernels' entry points and a copy of its tables) under an id: for tables that depend on the
// format alone, one derived from the format key and the instruction set, so that a graph that
// Inductor cached on disk names the same format in every process, and a graph run before its
// format was registered fails loudly instead of using another format's tables; for tables from
// a tensor's side data, a negative id of that tensor's plan, dropped with it (qc_unregister).
//
// Compile-time values (-D flags from codegen/cpu/build.py): QC_GEMV_MAX_M (rows up to which the
// GEMV kernel runs), QC_PANEL_BYTES (decoded weight rows per GEMM call: about L2-sized),
// QC_WHOLE_BYTES (a weight up to this size decoded is one panel), QC_SOURCE_HASH.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "args.h"

#if !defined(QC_GEMV_MAX_M) || !defined(QC_PANEL_BYTES) || !defined(QC_WHOLE_BYTES) || \
    !defined(QC_SOURCE_HASH)
#error "built by codegen/cpu/build.py, which defines the QC_ values of the driver"
#endif

namespace {
struct Format {
    LinearFn linear; DecodeFn decode; ValuesFn values;
    std::vector<float> table, mult;  // element values; multipliers of byte scales (or empty)
    float maxv, step;
    IntFn int_linear;  // elements of integers times 2^-s: the integer path (else null)
    float wstep;       // their 2^-s (int elements: 2^-frac)
};
struct Act {  // an activation format of the integer path: ActArgs' format fields
    ActFn quantize;
    int64_t block_size;
    int32_t scale, rule, is_signed, emax, frac, qmax;
    float maxv, xstep;
};
std::unordered_map<int64_t, Format> g_formats;
std::unordered_map<int64_t, Act> g_acts;
std::mutex g_lock;
constexpr int64_t kGemvMaxM = QC_GEMV_MAX_M;
constexpr int64_t kPanelBytes = QC_PANEL_BYTES;
constexpr int64_t kWholeBytes = QC_WHOLE_BYTES;

template <class T>
const T& lookup(const std::unordered_map<int64_t, T>& table, int64_t id) {
    std::lock_guard<std::mutex> guard(g_lock);
    auto it = table.find(id);
    TORCH_CHECK(it != table.end(), "qcompile_cpu: format ", id,
                " is not registered in this process (compile the model with the blockquant "
                "backend in this process)");
    return it->second;  // a reference into a node-based map: stays valid while others insert
}

// A decoded panel rounded in place to the model's dtype (bfloat16 / float16: ATen's vectorised
// conversion, round to nearest even, NaN kept NaN, as torch's .to() rounds the reference's
// weight), back as float32.
void round_to(at::Tensor& w, at::ScalarType dtype) {
    if (dtype != at::kFloat) w.copy_(w.to(dtype));
}

// y = x2 @ W^T (+ b) for the weight that ``a`` describes, in float32: the GEMV kernel for a few
// rows of x; else the weight decoded, whole if small (one GEMM), else in cache-sized panels of
// rows and torch's GEMM, so that the decode cost is spread over the rows of x. A bfloat16 /
// float16 model (``dtype``): the GEMV kernel rounds each decoded weight to it in registers, a
// decoded panel is rounded to it in place.
void blocks_linear(const Format& f, Args& a, const at::Tensor& x2, const at::Tensor& b,
                   at::Tensor& y, at::ScalarType dtype) {
    const int64_t m = a.M, n = a.N, padded = a.ldx;
    const int threads = at::get_num_threads();
    if (m == 0) return;
    if (m <= kGemvMaxM) {
        a.round_to = dtype == at::kBFloat16 ? 1 : dtype == at::kHalf ? 2 : 0;
        a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
        a.y = y.data_ptr<float>();
        f.linear(&a, threads);
        return;
    }
    if (4 * n * padded <= kWholeBytes) {
        at::Tensor w = at::empty({n, padded}, x2.options());
        f.decode(&a, 0, n, w.data_ptr<float>(), threads);
        round_to(w, dtype);
        y = b.defined() ? at::addmm(b, x2, w.t()) : at::mm(x2, w.t());
        return;
    }
    const int64_t rows = std::max<int64_t>(16, kPanelBytes / (4 * padded));
    at::Tensor panel = at::empty({rows, padded}, x2.options());
    for (int64_t n0 = 0; n0 < n; n0 += rows) {
        const int64_t n1 = std::min(n, n0 + rows);
        at::Tensor w = panel.narrow(0, 0, n1 - n0);
        f.decode(&a, n0, n1, w.data_ptr<float>(), threads);
        round_to(w, dtype);
        at::Tensor out = y.narrow(1, n0, n1 - n0);
        if (b.defined()) out.copy_(at::addmm(b.narrow(0, n0, n1 - n0), x2, w.t()));
        else out.copy_(at::mm(x2, w.t()));
    }
}

// y += x2[:, c] * (value - decoded value) for the weights kept apart from the blocks (OPQ
// outliers, proxy columns) at flat positions r * padded + c.
// (A bfloat16 / float16 model: both values rounded to its dtype, as the reference's weight is.)
void add_kept_apart(const Format& f, const Args& a, const at::Tensor& x2, const at::Tensor& index,
                    const at::Tensor& value, at::Tensor& y, at::ScalarType dtype) {
    const int64_t padded = a.ldx;
    at::Tensor flat = index.to(at::kLong).contiguous();
    at::Tensor decoded = at::empty({flat.numel()}, x2.options());
    f.values(&a, flat.data_ptr<int64_t>(), flat.numel(), decoded.data_ptr<float>());
    at::Tensor kept = value.to(at::kFloat);
    if (dtype != at::kFloat) {
        kept = kept.to(dtype).to(at::kFloat);
        decoded = decoded.to(dtype).to(at::kFloat);
    }
    at::Tensor delta = kept - decoded;
    y.index_add_(1, at::floor_divide(flat, padded),
                 x2.index_select(1, flat.remainder(padded)) * delta);
}

at::Tensor shaped(const at::Tensor& y, const at::Tensor& x, int64_t n) {
    if (x.dim() == 2) return y;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(n);
    return y.view(shape);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& outlier_index,
                  const std::optional<at::Tensor>& outlier_value,
                  int64_t format, int64_t n, int64_t k, int64_t block) {
    const Format& f = lookup(g_formats, format);
    const at::ScalarType dtype = x.scalar_type();
    TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                    x.size(-1) == k,
                "qcompile_cpu::linear: x must be float32, bfloat16 or float16 [..., ", k,
                "], not ", dtype, " ", x.sizes());
    TORCH_CHECK(!bias.has_value() || bias->scalar_type() == dtype,
                "qcompile_cpu::linear: the bias must be x's dtype ", dtype, ", not ",
                bias.has_value() ? bias->scalar_type() : dtype);
    TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous(),
                "qcompile_cpu::linear: codes and scales must be contiguous");
    TORCH_CHECK(scales.size(0) == n, "qcompile_cpu::linear: the weight has ", scales.size(0),
                " rows, not ", n);
    const int64_t n_blocks = scales.size(1), padded = n_blocks * block;
    // a bfloat16 / float16 model: x and the bias in float32 (exact), the products and sums
    // in float32, the output rounded to the dtype once
    at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat);
    if (padded != k) x2 = at::constant_pad_nd(x2, {0, padded - k});
    if (!x2.is_contiguous()) x2 = x2.contiguous();
    const int64_t m = x2.size(0);
    at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    Args a{};
    a.x = x2.data_ptr<float>(); a.M = m; a.ldx = padded;
    a.codes = codes.data_ptr<uint8_t>(); a.row_bytes = codes.size(-1);
    a.scales = scales.data_ptr(); a.n_blocks = n_blocks; a.block = block;
    a.table = f.table.data(); a.mult_table = f.mult.empty() ? nullptr : f.mult.data();
    a.maxv = f.maxv; a.step = f.step; a.N = n;
    at::Tensor y = at::empty({m, n}, x2.options());
    blocks_linear(f, a, x2, b, y, dtype);
    if (outlier_index.has_value() && m > 0 && outlier_index->numel() > 0)
        add_kept_apart(f, a, x2, *outlier_index, *outlier_value, y, dtype);
    return shaped(dtype == at::kFloat ? y : y.to(dtype), x, n);
}

// The integer path: activations quantised by the C++ quantiser, integer block dot products.
// A bfloat16 / float16 model: x and the bias widened to float32 here (exact: the reference
// quantises the same float32 values), the formula in float32, the output rounded to the dtype
// once (as the Triton integer path does).
at::Tensor int_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const std::optional<at::Tensor>& bias, int64_t format, int64_t act,
                      int64_t n, int64_t k, int64_t block) {
    const Format& f = lookup(g_formats, format);
    const Act& q = lookup(g_acts, act);
    TORCH_CHECK(f.int_linear != nullptr, "qcompile_cpu::int_linear: format ", format,
                " has no elements of integers times a power of two");
    const at::ScalarType dtype = x.scalar_type();
    TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                    x.size(-1) == k,
                "qcompile_cpu::int_linear: x must be float32, bfloat16 or float16 [..., ", k,
                "], not ", dtype, " ", x.sizes());
    TORCH_CHECK(!bias.has_value() || bias->scalar_type() == dtype,
                "qcompile_cpu::int_linear: the bias must be x's dtype ", dtype, ", not ",
                bias.has_value() ? bias->scalar_type() : dtype);
    TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous() && scales.size(0) == n,
                "qcompile_cpu::int_linear: codes and scales must be contiguous, with ", n, " rows");
    const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
    const int64_t m = x2.size(0), tile = std::min(q.block_size, std::max<int64_t>(k, 1));
    const int64_t n_tiles = (k + tile - 1) / tile;
    TORCH_CHECK(block % tile == 0, "qcompile_cpu::int_linear: activation blocks of ", tile,
                " across weight blocks of ", block);
    at::Tensor xq = at::empty({m, n_tiles * tile}, x2.options().dtype(at::kChar));
    at::Tensor ax = at::empty({m, n_tiles}, x2.options());
    at::Tensor xsum = at::empty({m, n_tiles}, x2.options().dtype(at::kInt));
    const int threads = at::get_num_threads();
    ActArgs aa{};
    aa.x = x2.data_ptr<float>(); aa.M = m; aa.ldx = k; aa.K = k;
    aa.tile = tile; aa.n_tiles = n_tiles; aa.clamped = q.block_size > k;
    aa.scale = q.scale; aa.rule = q.rule; aa.is_signed = q.is_signed;
    aa.emax = q.emax; aa.frac = q.frac; aa.qmax = q.qmax; aa.maxv = q.maxv; aa.xstep = q.xstep;
    aa.xq = xq.data_ptr<int8_t>(); aa.ax = ax.data_ptr<float>(); aa.xsum = xsum.data_ptr<int32_t>();
    q.quantize(&aa, threads);
    at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor y = at::empty({m, n}, x2.options());
    IntArgs ia{};
    ia.xq = xq.data_ptr<int8_t>(); ia.ax = ax.data_ptr<float>(); ia.xsum = xsum.data_ptr<int32_t>();
    ia.M = m; ia.n_tiles = n_tiles; ia.tile = tile;
    ia.codes = codes.data_ptr<uint8_t>(); ia.row_bytes = codes.size(-1);
    ia.scales = scales.data_ptr(); ia.n_blocks = scales.size(1); ia.block = block;
    ia.mult_table = f.mult.empty() ? nullptr : f.mult.data(); ia.maxv = f.maxv; ia.wstep = f.wstep;
    ia.table = f.table.data();
    ia.bias = b.defined() ? b.data_ptr<float>() : nullptr; ia.y = y.data_ptr<float>(); ia.N = n;
    if (m > 0) f.int_linear(&ia, threads);
    return shaped(dtype == at::kFloat ? y : y.to(dtype), x, n);
}

// The rows of x that a grouped matmul gives group g: offsets[g]..offsets[g + 1] of x in group
// order. Checked here once, so that no kernel reads past x or past the stack.
void check_groups(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& experts,
                  const at::Tensor& offsets, int64_t rows, int64_t n) {
    TORCH_CHECK(codes.dim() == 3 && scales.dim() == 3 && codes.size(0) == scales.size(0) &&
                    scales.size(1) == n && codes.is_contiguous() && scales.is_contiguous(),
                "qcompile_cpu::experts_linear: codes and scales must be contiguous stacks [E, ",
                n, ", ...] of one size E, not ", codes.sizes(), " and ", scales.sizes());
    TORCH_CHECK(experts.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong &&
                    experts.dim() == 1 && offsets.dim() == 1 &&
                    offsets.size(0) == experts.size(0) + 1,
                "qcompile_cpu::experts_linear: group_experts must be int64 [G] and "
                "group_offsets int64 [G + 1]");
    const int64_t* e = experts.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    TORCH_CHECK(off[0] >= 0 && off[experts.size(0)] <= rows,
                "qcompile_cpu::experts_linear: the groups' rows ", off[0], "..",
                off[experts.size(0)], " are outside x's ", rows, " rows");
    for (int64_t g = 0; g < experts.size(0); ++g)
        TORCH_CHECK(e[g] >= 0 && e[g] < codes.size(0) && off[g] <= off[g + 1],
                    "qcompile_cpu::experts_linear: group ", g, " names expert ", e[g], " of ",
                    codes.size(0), " with rows ", off[g], "..", off[g + 1]);
}

// ``rows``: row indices of x, each at most once (a row in two groups would get one of its
// results, silently).
void check_rows(const at::Tensor& rows, int64_t count) {
    TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1,
                "qcompile_cpu::experts_linear: rows must be int64 [T] row indices of x");
    const at::Tensor flat = rows.contiguous();
    const int64_t* r = flat.data_ptr<int64_t>();
    std::vector<char> seen(count, 0);
    for (int64_t i = 0; i < flat.numel(); ++i) {
        TORCH_CHECK(r[i] >= 0 && r[i] < count && !seen[r[i]],
                    "qcompile_cpu::experts_linear: row ", r[i], " is outside x's ", count,
                    " rows or in two groups");
        seen[r[i]] = 1;
    }
}

// One grouped matmul of a mixture's experts: for each group g, y[rows of g] = x[rows of g] @
// W_e^T, e = group_experts[g], the rows of g being offsets[g]..offsets[g + 1] of x in group
// order (x's rows themselves, or x.index_select(0, rows) where ``rows`` is given: each group's
// row indices, concatenated, each row at most once). Each group runs ``blocks_linear`` on expert e's slice of the
// stacked codes and scales [E, ...] (pointer offsets: no other expert is touched), as
// ``linear`` runs one expert, so each row's result is that of ``linear`` bit for bit; rows in
// no group are zero. One operator call per grouped matmul instead of one per active expert.
at::Tensor experts_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                          const at::Tensor& group_experts, const at::Tensor& group_offsets,
                          const std::optional<at::Tensor>& rows, int64_t format, int64_t n,
                          int64_t k, int64_t block) {
    const Format& f = lookup(g_formats, format);
    const at::ScalarType dtype = x.scalar_type();
    TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                    x.dim() == 2 && x.size(1) == k,
                "qcompile_cpu::experts_linear: x must be float32, bfloat16 or float16 [S, ", k,
                "], not ", dtype, " ", x.sizes());
    const at::Tensor experts = group_experts.contiguous(), offsets = group_offsets.contiguous();
    at::Tensor x2 = x.to(at::kFloat);
    if (rows.has_value()) {
        check_rows(*rows, x.size(0));
        x2 = x2.index_select(0, *rows);
    }
    check_groups(codes, scales, experts, offsets, x2.size(0), n);
    const int64_t n_blocks = scales.size(2), padded = n_blocks * block;
    if (padded != k) x2 = at::constant_pad_nd(x2, {0, padded - k});
    if (!x2.is_contiguous()) x2 = x2.contiguous();
    const int64_t code_stride = codes.stride(0);
    const int64_t scale_stride = scales.stride(0) * scales.element_size();
    const int64_t* e = experts.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    at::Tensor y = at::zeros({x2.size(0), n}, x2.options());
    for (int64_t g = 0; g < experts.size(0); ++g) {
        const int64_t m = off[g + 1] - off[g];
        if (m == 0) continue;
        const at::Tensor xg = x2.narrow(0, off[g], m);
        Args a{};
        a.x = xg.data_ptr<float>(); a.M = m; a.ldx = padded;
        a.codes = codes.data_ptr<uint8_t>() + e[g] * code_stride; a.row_bytes = codes.size(-1);
        a.scales = static_cast<const char*>(scales.data_ptr()) + e[g] * scale_stride;
        a.n_blocks = n_blocks; a.block = block;
        a.table = f.table.data(); a.mult_table = f.mult.empty() ? nullptr : f.mult.data();
        a.maxv = f.maxv; a.step = f.step; a.N = n;
        const at::Tensor slot = y.narrow(0, off[g], m);
        at::Tensor yg = slot;  // blocks_linear may return a new tensor (one GEMM): copied in
        blocks_linear(f, a, xg, at::Tensor(), yg, dtype);
        if (!yg.is_same(slot)) slot.copy_(yg);
    }
    if (rows.has_value()) y = at::zeros({x.size(0), n}, y.options()).index_copy_(0, *rows, y);
    return dtype == at::kFloat ? y : y.to(dtype);
}
}  // namespace

TORCH_LIBRARY(qcompile_cpu, m) {
    m.def("linear(Tensor x, Tensor codes, Tensor scales, Tensor? bias, Tensor? outlier_index, "
          "Tensor? outlier_value, int format, int n, int k, int block) -> Tensor");
    m.def("int_linear(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int format, int act, "
          "int n, int k, int block) -> Tensor");
    m.def("experts_linear(Tensor x, Tensor codes, Tensor scales, Tensor group_experts, "
          "Tensor group_offsets, Tensor? rows, int format, int n, int k, int block) -> Tensor");
}
TORCH_LIBRARY_IMPL(qcompile_cpu, CPU, m) {
    m.impl("linear", &linear);
    m.impl("int_linear", &int_linear);
    m.impl("experts_linear", &experts_linear);
}

// Registration: an id registered once keeps its first entry (the same id always names the same
// tables), so that a graph running on another thread never sees its format change.
extern "C" {
const char* qc_source_hash() { return QC_SOURCE_HASH; }
void qc_register(int64_t id, void* linear, void* decode, void* values, const float* table,
                 int64_t table_len, const float* mult, float maxv, float step, void* int_linear,
                 float wstep) {
    Format f{(LinearFn)linear, (DecodeFn)decode, (ValuesFn)values,
             std::vector<float>(table, table + table_len),
             mult ? std::vector<float>(mult, mult + 256) : std::vector<float>(), maxv, step,
             (IntFn)int_linear, wstep};
    std::lock_guard<std::mutex> guard(g_lock);
    g_formats.emplace(id, std::move(f));
}
void qc_unregister(int64_t id) {
    std::lock_guard<std::mutex> guard(g_lock);
    g_formats.erase(id);
}
void qc_register_act(int64_t id, void* quantize, int64_t block_size, int32_t scale, int32_t rule,
                     int32_t is_signed, int32_t emax, int32_t frac, int32_t qmax, float maxv,
                     float xstep) {
    Act a{(ActFn)quantize, block_size, scale, rule, is_signed, emax, frac, qmax, maxv, xstep};
    std::lock_guard<std::mutex> guard(g_lock);
    g_acts.emplace(id, a);
}
}

// Whether ``id`` is registered with exactly these tables, bit for bit (package.cpp registers a
// package's formats with qc_register / qc_register_act, then asks: the first registration of an
// id wins, so a package whose tables differ from those already registered under its ids is
// refused instead of running on the others' tables).
#include <cstring>
namespace {
bool same_bits(const float* a, const float* b, int64_t n) {
    return n == 0 || std::memcmp(a, b, sizeof(float) * n) == 0;
}
}  // namespace
extern "C" {
int qc_format_matches(int64_t id, const float* table, int64_t table_len, const float* mult,
                      float maxv, float step, int has_int_linear, float wstep) {
    std::lock_guard<std::mutex> guard(g_lock);
    auto it = g_formats.find(id);
    if (it == g_formats.end()) return 0;
    const Format& f = it->second;
    const float got[3] = {f.maxv, f.step, f.wstep}, want[3] = {maxv, step, wstep};
    return int64_t(f.table.size()) == table_len && same_bits(f.table.data(), table, table_len) &&
           f.mult.size() == (mult ? 256u : 0u) && same_bits(f.mult.data(), mult, f.mult.size()) &&
           same_bits(got, want, 3) && (f.int_linear != nullptr) == (has_int_linear != 0);
}
int qc_act_matches(int64_t id, int64_t block_size, int32_t scale, int32_t rule, int32_t is_signed,
                   int32_t emax, int32_t frac, int32_t qmax, float maxv, float xstep) {
    std::lock_guard<std::mutex> guard(g_lock);
    auto it = g_acts.find(id);
    if (it == g_acts.end()) return 0;
    const Act& a = it->second;
    const float got[2] = {a.maxv, a.xstep}, want[2] = {maxv, xstep};
    return a.block_size == block_size && a.scale == scale && a.rule == rule &&
           a.is_signed == is_signed && a.emax == emax && a.frac == frac && a.qmax == qmax &&
           same_bits(got, want, 2);
}
}
