// Runs a package made by qcompile.export with no Python: loads the qcompile operator library,
// registers the package's formats from the package itself (qc_register_package), loads it
// with AOTInductor's C++ loader and runs one forward.
//
//   qcompile_run OPERATOR_LIBRARY PACKAGE INPUTS OUTPUTS
//
// OPERATOR_LIBRARY: the path `python -m qcompile op-library` prints. INPUTS: a file that
// torch.save wrote in Python, holding the forward's positional arguments (a tensor, or a list
// or tuple of tensors). OUTPUTS: written with torch::jit::pickle_save, a tuple of the
// forward's output tensors (torch.load reads it in Python). See README.md.
#include <dlfcn.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace {
// The operator library's C entry (codegen/cpu/package.cpp): the number of formats registered,
// or -1 with the reason in error.
using RegisterPackage = int64_t (*)(const char* package, char* error, int64_t error_len);

std::vector<char> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + path);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The forward's arguments from a torch.save file: a tensor, or a list or tuple of tensors.
std::vector<at::Tensor> load_inputs(const std::string& path) {
    const c10::IValue value = torch::jit::pickle_load(read_file(path));
    if (value.isTensor()) return {value.toTensor()};
    std::vector<at::Tensor> inputs;
    if (value.isTuple()) {
        for (const c10::IValue& v : value.toTupleRef().elements()) inputs.push_back(v.toTensor());
    } else if (value.isList()) {
        for (const c10::IValue& v : value.toListRef()) inputs.push_back(v.toTensor());
    } else {
        throw std::runtime_error(path + " holds a " + value.tagKind() +
                                 ", not a tensor or a list or tuple of tensors");
    }
    return inputs;
}

void save_outputs(const std::vector<at::Tensor>& outputs, const std::string& path) {
    // a tuple (a tensor list would pickle as a TorchScript type, which torch.load refuses
    // with weights_only, its default)
    const std::vector<c10::IValue> values(outputs.begin(), outputs.end());
    const std::vector<char> data = torch::jit::pickle_save(c10::ivalue::Tuple::create(values));
    std::ofstream out(path, std::ios::binary);
    out.write(data.data(), std::streamsize(data.size()));
    if (!out) throw std::runtime_error("cannot write " + path);
}
}  // namespace

int main(int argc, char** argv) {
    if (argc != 5) {
        std::cerr << "usage: " << argv[0] << " OPERATOR_LIBRARY PACKAGE INPUTS OUTPUTS\n";
        return 2;
    }
    const std::string op_library = argv[1], package = argv[2], inputs = argv[3],
                      outputs = argv[4];
    // RTLD_GLOBAL: the library defines the operators qcompile_cpu::linear / int_linear that
    // the package's graph calls (its static initialisers register them with torch)
    void* ops = dlopen(op_library.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (ops == nullptr) {
        std::cerr << "cannot load the operator library: " << dlerror() << "\n";
        return 1;
    }
    auto register_package = reinterpret_cast<RegisterPackage>(dlsym(ops, "qc_register_package"));
    if (register_package == nullptr) {
        std::cerr << op_library << " has no qc_register_package: not a qcompile operator "
                  << "library of this version\n";
        return 1;
    }
    char error[4096];
    const int64_t registered = register_package(package.c_str(), error, sizeof(error));
    if (registered < 0) {
        std::cerr << error << "\n";
        return 1;
    }
    try {
        torch::inductor::AOTIModelPackageLoader loader(package);
        c10::InferenceMode no_grad;
        const std::vector<at::Tensor> out = loader.run(load_inputs(inputs));
        save_outputs(out, outputs);
        std::cout << "registered " << registered << " formats; " << out.size() << " output(s):";
        for (const at::Tensor& t : out) std::cout << " " << t.sizes();
        std::cout << "\n";
    } catch (const std::exception& err) {
        std::cerr << err.what() << "\n";
        return 1;
    }
    return 0;
}
