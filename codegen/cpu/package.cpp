// qc_register_package: registers the formats that a package made by qcompile.export names, in a
// process with no Python (docs/export.md, examples/cpp/). Part of the operator library.
//
// The package carries what the registration needs (codegen/cpu/package.py writes it): the
// kernel library it was exported with (extra/qcompile/kernels_<isa>.so.b64: in base64, as torch
// reads every file under extra/ as text) and a plain-text
// manifest (extra/qcompile/native.txt) naming the operators' schemas, that library's SHA-256,
// instruction set and source hash, and each format's entry points and tables. The manifest is
// checked (its own SHA-256, its version, the schemas of the operators in this process), then the
// library (the CPU has its instruction set, its bytes match, before they reach dlopen; once
// loaded it reports the recorded source hash and instruction set), then each format is
// registered with qc_register / qc_register_act, the entry points Python calls
// (codegen/cpu/plans.py), and must come out with the manifest's tables (qc_format_matches: an
// id registered before with other tables is refused). Anything else is refused with a message
// naming the package and the problem.
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <caffe2/serialize/inline_container.h>

extern "C" {  // operator.cpp
void qc_register(int64_t id, void* linear, void* decode, void* values, const float* table,
                 int64_t table_len, const float* mult, float maxv, float step, void* int_linear,
                 float wstep);
void qc_register_act(int64_t id, void* quantize, int64_t block_size, int32_t scale, int32_t rule,
                     int32_t is_signed, int32_t emax, int32_t frac, int32_t qmax, float maxv,
                     float xstep);
int qc_format_matches(int64_t id, const float* table, int64_t table_len, const float* mult,
                      float maxv, float step, int has_int_linear, float wstep);
int qc_act_matches(int64_t id, int64_t block_size, int32_t scale, int32_t rule, int32_t is_signed,
                   int32_t emax, int32_t frac, int32_t qmax, float maxv, float xstep);
}

namespace {
const char* const kManifest = "extra/qcompile/native.txt";
const char* const kVersion = "qcompile-native 1";

struct Refused : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// SHA-256 (FIPS 180-4) of n bytes, as 64 hex digits.
std::string sha256_hex(const void* data, size_t n) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    const uint8_t* bytes = static_cast<const uint8_t*>(data);
    std::vector<uint8_t> msg(bytes, bytes + n);  // padded: 0x80, zeros, the bit length
    msg.push_back(0x80);
    while (msg.size() % 64 != 56) msg.push_back(0);
    for (int i = 7; i >= 0; --i) msg.push_back(uint8_t((uint64_t(n) * 8) >> (8 * i)));
    auto rotr = [](uint32_t x, int r) { return (x >> r) | (x << (32 - r)); };
    for (size_t at = 0; at < msg.size(); at += 64) {
        uint32_t w[64];
        for (int i = 0; i < 16; ++i)
            w[i] = uint32_t(msg[at + 4 * i]) << 24 | uint32_t(msg[at + 4 * i + 1]) << 16 |
                   uint32_t(msg[at + 4 * i + 2]) << 8 | uint32_t(msg[at + 4 * i + 3]);
        for (int i = 16; i < 64; ++i)
            w[i] = w[i - 16] + (rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)) +
                   w[i - 7] + (rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10));
        uint32_t v[8];
        std::memcpy(v, h, sizeof(v));
        for (int i = 0; i < 64; ++i) {  // v: a b c d e f g h
            const uint32_t t1 = v[7] + (rotr(v[4], 6) ^ rotr(v[4], 11) ^ rotr(v[4], 25)) +
                                ((v[4] & v[5]) ^ (~v[4] & v[6])) + k[i] + w[i];
            const uint32_t t2 = (rotr(v[0], 2) ^ rotr(v[0], 13) ^ rotr(v[0], 22)) +
                                ((v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]));
            std::memmove(v + 1, v, 7 * sizeof(uint32_t));
            v[4] += t1;
            v[0] = t1 + t2;
        }
        for (int i = 0; i < 8; ++i) h[i] += v[i];
    }
    static const char* const hex = "0123456789abcdef";
    std::string out;
    for (uint32_t word : h)
        for (int shift = 28; shift >= 0; shift -= 4) out += hex[(word >> shift) & 15];
    return out;
}

struct FormatLine {
    int64_t id;
    std::string key, linear, decode, values, int_linear;  // entry points ("-": no int_linear)
    float maxv, step, wstep;
    std::vector<float> table, mult;  // mult: 256 multipliers, or empty
};
struct ActLine {
    int64_t id;
    std::string key, quantize;
    int64_t block_size;
    int32_t scale, rule, is_signed, emax, frac, qmax;
    float maxv, xstep;
};
struct Manifest {
    std::vector<std::string> schemas;
    std::string isa, library, library_sha256, source_hash;  // library: its archive entry
    std::vector<FormatLine> formats;
    std::vector<ActLine> acts;
};

// One line's space-separated fields, each read with a message naming the line if it is not
// there or not a number.
class Fields {
  public:
    Fields(const std::string& line, std::string where) : in_(line), where_(std::move(where)) {}
    std::string word() {
        std::string w;
        if (!(in_ >> w)) fail("a field is missing");
        return w;
    }
    int64_t integer() {
        const std::string w = word();
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(w.c_str(), &end, 10);
        if (errno != 0 || *end != '\0') fail("'" + w + "' is not an integer");
        return v;
    }
    float bits() {  // a float32 written as the 8 hex digits of its bits
        const std::string w = word();
        char* end = nullptr;
        const unsigned long v = std::strtoul(w.c_str(), &end, 16);
        if (w.size() != 8 || *end != '\0') fail("'" + w + "' is not 8 hex digits");
        const uint32_t u = uint32_t(v);
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    std::vector<float> floats(int64_t n) {
        if (n < 0 || n > 65536) fail("a table of " + std::to_string(n) + " values");
        std::vector<float> out(n);
        for (float& f : out) f = bits();
        return out;
    }
    std::string rest() {
        std::string r;
        std::getline(in_ >> std::ws, r);
        return r;
    }
    void end() {
        std::string extra;
        if (in_ >> extra) fail("unexpected field '" + extra + "'");
    }
    [[noreturn]] void fail(const std::string& why) { throw Refused(where_ + ": " + why); }

  private:
    std::istringstream in_;
    std::string where_;
};

FormatLine format_line(Fields& f) {
    FormatLine l;
    l.id = f.integer();
    l.key = f.word();
    l.linear = f.word();
    l.decode = f.word();
    l.values = f.word();
    l.int_linear = f.word();
    l.maxv = f.bits();
    l.step = f.bits();
    l.wstep = f.bits();
    l.table = f.floats(f.integer());
    const int64_t n_mult = f.integer();
    if (n_mult != 0 && n_mult != 256) f.fail("a multiplier table must have 0 or 256 values");
    l.mult = f.floats(n_mult);
    return l;
}

ActLine act_line(Fields& f) {
    ActLine l;
    l.id = f.integer();
    l.key = f.word();
    l.quantize = f.word();
    l.block_size = f.integer();
    int32_t* ints[] = {&l.scale, &l.rule, &l.is_signed, &l.emax, &l.frac, &l.qmax};
    for (int32_t* v : ints) *v = int32_t(f.integer());
    l.maxv = f.bits();
    l.xstep = f.bits();
    return l;
}

// The manifest's text, checked against the SHA-256 on its last line, then parsed.
Manifest parse_manifest(const std::string& text, const std::string& where) {
    const size_t last = text.rfind("\nsha256 ");
    if (last == std::string::npos)
        throw Refused(where + " has no sha256 line: it was damaged or changed");
    const std::string recorded = text.substr(last + 8, 64);
    if (recorded != sha256_hex(text.data(), last + 1) || text.substr(last + 72) != "\n")
        throw Refused(where + " was damaged or changed: its SHA-256 does not match its last line");
    std::istringstream lines(text.substr(0, last + 1));
    std::string line;
    std::getline(lines, line);
    if (line != kVersion)
        throw Refused(where + " starts with '" + line + "', this operator library reads '" +
                      kVersion + "': export the model again with this qcompile");
    Manifest m;
    for (int number = 2; std::getline(lines, line); ++number) {
        Fields f(line, where + " line " + std::to_string(number));
        const std::string kind = f.word();
        if (kind == "operator") {
            m.schemas.push_back(f.rest());
            continue;
        }
        if (kind == "kernels") {
            m.isa = f.word();
            m.library = f.word();
            m.library_sha256 = f.word();
            m.source_hash = f.word();
        } else if (kind == "format") {
            m.formats.push_back(format_line(f));
        } else if (kind == "act") {
            m.acts.push_back(act_line(f));
        } else {
            f.fail("unknown record '" + kind + "' (operator, kernels, format, act)");
        }
        f.end();
    }
    if (!m.formats.empty() && m.library.empty())
        throw Refused(where + " names formats but no kernels line");
    return m;
}

// The recorded operator schemas must be this process's (the operator library's own).
void check_schemas(const Manifest& m, const std::string& package) {
    for (const std::string& recorded : m.schemas) {
        const std::string name = recorded.substr(0, recorded.find('('));
        auto op = c10::Dispatcher::singleton().findSchema({name, ""});
        if (!op.has_value())
            throw Refused(package + " calls " + name + ", which this process does not define");
        const std::string here = c10::toString(op->schema());
        if (here != recorded)
            throw Refused(package + " calls " + recorded + ", this operator library defines " +
                          here + ": export the model again with this qcompile");
    }
}

// QC_ISA of each instruction set (codegen/cpu/isa.py ISA_NUMBER), and whether this CPU has it
// (the compiler flags of codegen/cpu/isa.py ISA_FLAGS).
int isa_number(const std::string& isa, const std::string& package) {
    const char* names[] = {"scalar", "avx2", "avx512", "avx512_vnni"};
    for (int i = 0; i < 4; ++i)
        if (isa == names[i]) return i;
    throw Refused(package + " names the instruction set '" + isa +
                  "' (known: scalar, avx2, avx512, avx512_vnni)");
}

bool cpu_has(int number) {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl");
    const bool has[] = {true, avx2, avx512, avx512 && __builtin_cpu_supports("avx512vnni")};
    return has[number];
}

// The bytes that ``text`` (base64, RFC 4648, no line breaks) encodes; "" for anything else.
std::string from_base64(const std::string& text) {
    static const std::string digits =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if (text.size() % 4 != 0) return "";
    const size_t pad = text.size() >= 2 && text[text.size() - 2] == '=' ? 2
                       : !text.empty() && text.back() == '=' ? 1 : 0;
    std::string out;
    uint32_t acc = 0;
    for (size_t i = 0; i < text.size() - pad; ++i) {
        const size_t v = digits.find(text[i]);
        if (v == std::string::npos) return "";
        acc = (acc << 6) | uint32_t(v);
        if (i % 4 == 3) {
            for (int shift = 16; shift >= 0; shift -= 8) out += char((acc >> shift) & 255);
            acc = 0;
        }
    }
    if (pad == 1) out += {char((acc >> 10) & 255), char((acc >> 2) & 255)};
    if (pad == 2) out += char((acc >> 4) & 255);
    return out;
}

std::string read_entry(caffe2::serialize::PyTorchStreamReader& zip, const std::string& name,
                       const std::string& package, const std::string& why_missing) {
    if (!zip.hasRecord(name)) throw Refused(package + " has no " + name + ": " + why_missing);
    auto [data, size] = zip.getRecord(name);
    return std::string(static_cast<const char*>(data.get()), size);
}

// dlopen the kernel library's bytes (checked before) from an anonymous in-memory file, once per
// distinct library: the bytes checked are the bytes mapped, and nothing is written to disk.
void* open_kernels(const std::string& bytes, const Manifest& m, const std::string& package) {
    static std::mutex lock;
    static std::unordered_map<std::string, void*> loaded;  // by SHA-256; never closed
    std::lock_guard<std::mutex> guard(lock);
    auto it = loaded.find(m.library_sha256);
    if (it != loaded.end()) return it->second;
    const int fd = memfd_create("qcompile-kernels", MFD_CLOEXEC);
    if (fd < 0)
        throw Refused(package + ": memfd_create failed (" + std::strerror(errno) +
                      "): the kernel library cannot be loaded from memory");
    size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
        if (n <= 0) {
            close(fd);
            throw Refused(package + ": writing the kernel library to memory failed");
        }
        done += size_t(n);
    }
    const std::string fd_path = "/proc/self/fd/" + std::to_string(fd);
    void* lib = dlopen(fd_path.c_str(), RTLD_NOW | RTLD_LOCAL);
    close(fd);  // (the mapping stays)
    if (lib == nullptr)
        throw Refused(package + "'s " + m.library + " does not load: " + dlerror());
    auto source_hash = reinterpret_cast<const char* (*)()>(dlsym(lib, "qc_source_hash"));
    auto isa = reinterpret_cast<int (*)()>(dlsym(lib, "qc_isa"));
    if (source_hash == nullptr || isa == nullptr || m.source_hash != source_hash() ||
        isa() != isa_number(m.isa, package))
        throw Refused(package + "'s " + m.library + " is not the kernel library its manifest "
                      "records (source hash or instruction set differ)");
    loaded.emplace(m.library_sha256, lib);
    return lib;
}

void* symbol(void* lib, const std::string& name, const std::string& package) {
    void* fn = dlsym(lib, name.c_str());
    if (fn == nullptr)
        throw Refused(package + "'s kernel library has no entry point " + name);
    return fn;
}

struct Resolved {  // a format's entry points in the loaded kernel library
    void *linear, *decode, *values, *int_linear;
};

void register_formats(const Manifest& m, void* lib, const std::string& package) {
    std::vector<Resolved> formats;  // every entry point found before anything is registered
    for (const FormatLine& f : m.formats)
        formats.push_back({symbol(lib, f.linear, package), symbol(lib, f.decode, package),
                           symbol(lib, f.values, package),
                           f.int_linear == "-" ? nullptr : symbol(lib, f.int_linear, package)});
    std::vector<void*> quantizers;
    for (const ActLine& a : m.acts) quantizers.push_back(symbol(lib, a.quantize, package));
    for (size_t i = 0; i < m.formats.size(); ++i) {
        const FormatLine& f = m.formats[i];
        const float* mult = f.mult.empty() ? nullptr : f.mult.data();
        qc_register(f.id, formats[i].linear, formats[i].decode, formats[i].values, f.table.data(),
                    int64_t(f.table.size()), mult, f.maxv, f.step, formats[i].int_linear, f.wstep);
        if (!qc_format_matches(f.id, f.table.data(), int64_t(f.table.size()), mult, f.maxv,
                               f.step, formats[i].int_linear != nullptr, f.wstep))
            throw Refused(package + "'s format " + f.key + " (id " + std::to_string(f.id) +
                          ") is registered in this process with other tables (another "
                          "qcompile's package?): export the models with one qcompile");
    }
    for (size_t i = 0; i < m.acts.size(); ++i) {
        const ActLine& a = m.acts[i];
        qc_register_act(a.id, quantizers[i], a.block_size, a.scale, a.rule, a.is_signed, a.emax,
                        a.frac, a.qmax, a.maxv, a.xstep);
        if (!qc_act_matches(a.id, a.block_size, a.scale, a.rule, a.is_signed, a.emax, a.frac,
                            a.qmax, a.maxv, a.xstep))
            throw Refused(package + "'s activation format " + a.key + " (id " +
                          std::to_string(a.id) + ") is registered in this process otherwise");
    }
}

int64_t register_package(const std::string& package) {
    std::unique_ptr<caffe2::serialize::PyTorchStreamReader> zip;
    try {
        zip = std::make_unique<caffe2::serialize::PyTorchStreamReader>(package);
    } catch (const std::exception& err) {
        const std::string what = err.what();
        throw Refused(package + " is not a readable .pt2 archive (" +
                      what.substr(0, what.find('\n')) + ")");
    }
    const Manifest m = parse_manifest(
        read_entry(*zip, kManifest, package,
                   "it was not made by qcompile.export, or by a qcompile without the C++ "
                   "registration: export the model again"),
        package + "'s " + kManifest);
    check_schemas(m, package);
    if (m.formats.empty() && m.acts.empty()) return 0;
    const int number = isa_number(m.isa, package);
    if (!cpu_has(number))
        throw Refused(package + " was exported for the " + m.isa +
                      " CPU kernels, which this CPU cannot run: export it on a CPU of this kind "
                      "(QCOMPILE_CPU_ISA chooses an older instruction set at export)");
    const std::string bytes = from_base64(read_entry(
        *zip, m.library, package, "the kernel library its manifest names is missing"));
    if (sha256_hex(bytes.data(), bytes.size()) != m.library_sha256)
        throw Refused(package + "'s " + m.library + " was damaged or changed: its SHA-256 does "
                      "not match the manifest's");
    register_formats(m, open_kernels(bytes, m, package), package);
    return int64_t(m.formats.size() + m.acts.size());
}
}  // namespace

// Returns the number of formats and activation formats registered (0 for a package that names
// none), or -1 with the reason in ``error`` (``error_len`` bytes, NUL-terminated; cut if longer).
extern "C" int64_t qc_register_package(const char* package, char* error, int64_t error_len) {
    std::string why;
    try {
        return register_package(package ? package : "");
    } catch (const std::exception& err) {
        why = std::string("qcompile: ") + err.what();
    }
    if (error != nullptr && error_len > 0) {
        const size_t n = std::min<size_t>(why.size(), size_t(error_len - 1));
        std::memcpy(error, why.data(), n);
        error[n] = '\0';
    }
    return -1;
}
