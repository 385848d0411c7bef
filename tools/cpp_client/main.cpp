// nchains_client: what a libtorch inference server does with an exported chain.
//
// Usage: nchains_client MODEL INPUT [--threads N] | nchains_client MODEL --metadata
//
// Loads an artifact written by `nchains export` (no Python, no nchains), chosen by its suffix:
//   chain.ts        TorchScript, with torch::jit::load;
//   chain.aoti.pt2  AOTInductor package (`--formats ...,aoti`), with
//                   torch::inductor::AOTIModelPackageLoader (compiled code, frozen weights);
// reads one input batch and prints the logits: one line per sample, values separated by
// spaces, printed with 9 significant digits (enough to round-trip float32). --metadata prints
// the JSON metadata embedded in the artifact (extra file "nchains.json") instead.
//
// INPUT is either
//   - a tensor saved from Python with torch.save(x, path) (read with torch::pickle_load), or
//   - a raw file: the 4 bytes "NCT1", uint32 ndim, ndim x int64 sizes, then the float32
//     values in row-major order, all little-endian.
// The tensor must be float32 [N, C, H, W] preprocessed as the manifest's "input" says.
#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <caffe2/serialize/inline_container.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

template <typename T>
T read_le(const std::vector<char>& buf, size_t& pos) {
  if (pos + sizeof(T) > buf.size()) throw std::runtime_error("input file is truncated (header)");
  T value = 0;
  for (size_t i = 0; i < sizeof(T); ++i)
    value |= static_cast<T>(static_cast<unsigned char>(buf[pos + i])) << (8 * i);
  pos += sizeof(T);
  return value;
}

torch::Tensor read_raw(const std::vector<char>& buf) {
  size_t pos = 4;
  const uint32_t ndim = read_le<uint32_t>(buf, pos);
  if (ndim == 0 || ndim > 8) throw std::runtime_error("input file: bad ndim " + std::to_string(ndim));
  std::vector<int64_t> sizes;
  int64_t count = 1;
  for (uint32_t i = 0; i < ndim; ++i) {
    const auto d = static_cast<int64_t>(read_le<uint64_t>(buf, pos));
    if (d < 0) throw std::runtime_error("input file: negative size");
    sizes.push_back(d);
    count *= d;
  }
  if (buf.size() - pos != static_cast<size_t>(count) * sizeof(float))
    throw std::runtime_error("input file: expected " + std::to_string(count) + " float32 values after the header");
  std::vector<float> values(count);
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits = 0;
    for (size_t b = 0; b < 4; ++b) bits |= static_cast<uint32_t>(static_cast<unsigned char>(buf[pos + 4 * i + b])) << (8 * b);
    std::memcpy(&values[i], &bits, sizeof(float));
  }
  return torch::from_blob(values.data(), sizes, torch::kFloat32).clone();
}

torch::Tensor read_input(const std::string& path) {
  const std::vector<char> buf = read_file(path);
  if (buf.size() >= 4 && std::memcmp(buf.data(), "NCT1", 4) == 0) return read_raw(buf);
  if (buf.size() >= 2 && buf[0] == 'P' && buf[1] == 'K') {  // torch.save zip archive
    torch::IValue value = torch::pickle_load(buf);
    if (!value.isTensor()) throw std::runtime_error("input file holds a " + value.tagKind() + ", not a tensor");
    return value.toTensor().to(torch::kFloat32).contiguous();
  }
  throw std::runtime_error("input file is neither an NCT1 raw tensor nor a torch.save'd tensor");
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The nchains metadata of an AOTInductor package: its zip record extra/nchains.json.
std::string package_metadata(const std::string& path) {
  caffe2::serialize::PyTorchStreamReader reader(path);
  if (!reader.hasRecord("extra/nchains.json")) throw std::runtime_error(path + " has no extra/nchains.json");
  auto [data, size] = reader.getRecord("extra/nchains.json");
  return std::string(static_cast<const char*>(data.get()), size);
}

// Logits [N, classes] of the artifact at `model_path` on `x`, or its metadata when x is undefined.
torch::Tensor run_artifact(const std::string& model_path, const torch::Tensor& x, std::string* metadata) {
  if (ends_with(model_path, ".pt2")) {  // AOTInductor package (a torch.export .pt2 holds no compiled code)
    if (metadata) {
      *metadata = package_metadata(model_path);
      return {};
    }
    torch::inductor::AOTIModelPackageLoader loader(model_path);
    std::vector<torch::Tensor> out = loader.run({x});
    if (out.size() != 1) throw std::runtime_error("package returned " + std::to_string(out.size()) + " outputs");
    return out[0];
  }
  torch::jit::ExtraFilesMap extra{{"nchains.json", ""}};
  torch::jit::Module module = torch::jit::load(model_path, torch::kCPU, extra);
  module.eval();
  if (metadata) {
    *metadata = extra["nchains.json"];
    return {};
  }
  return module.forward({x}).toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, input_path;
  bool metadata = false;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--metadata") {
      metadata = true;
    } else if (arg == "--threads" && i + 1 < argc) {
      threads = std::stoi(argv[++i]);
    } else if (model_path.empty()) {
      model_path = arg;
    } else if (input_path.empty()) {
      input_path = arg;
    } else {
      std::cerr << "nchains_client: unexpected argument " << arg << "\n";
      return 2;
    }
  }
  if (model_path.empty() || (input_path.empty() && !metadata)) {
    std::cerr << "usage: nchains_client MODEL.ts|MODEL.aoti.pt2 INPUT [--threads N] | nchains_client MODEL --metadata\n";
    return 2;
  }
  try {
    if (threads > 0) at::set_num_threads(threads);
    if (metadata) {
      std::string text;
      run_artifact(model_path, {}, &text);
      std::cout << text << std::endl;
      return 0;
    }
    torch::Tensor x = read_input(input_path);
    torch::NoGradGuard no_grad;
    torch::Tensor logits = run_artifact(model_path, x, nullptr).to(torch::kFloat32).contiguous();
    if (logits.dim() != 2) throw std::runtime_error("model output is not [N, classes]");
    const float* data = logits.data_ptr<float>();
    const int64_t rows = logits.size(0), cols = logits.size(1);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) std::printf(c ? " %.9g" : "%.9g", data[r * cols + c]);
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::cerr << "nchains_client: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
