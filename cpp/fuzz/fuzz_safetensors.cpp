// libFuzzer target for the safetensors reader and the JSON parser (untrusted input).
//   CC=clang CXX=clang++ cmake -S . -B build/fuzz -DLORART_CUDA=OFF -DLORART_FUZZ=ON && cmake --build build/fuzz
//   ./build/fuzz/fuzz_safetensors -max_total_time=600 -max_len=4096 [CORPUS_DIR]
// Any input must either parse (then every tensor is readable within the buffer) or throw
// lorart::Error; crashes, ASan/UBSan reports, leaks and other exceptions are bugs.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "lorart/json.h"
#include "lorart/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // 1) the bytes as a whole safetensors file
  try {
    lorart::SafetensorsFile f = lorart::SafetensorsFile::from_bytes(data, size, "fuzz");
    uint64_t sum = 0;
    for (const auto& e : f.entries()) {
      const uint8_t* p = f.bytes(e.name);
      for (uint64_t i = e.begin; i < e.end; ++i) sum += p[i - e.begin];  // in bounds (ASan checks)
      try {
        lorart::Tensor t = f.tensor(e.name);
        if (t.nbytes() != e.end - e.begin) __builtin_trap();
        (void)f.view(e.name);
      } catch (const lorart::Error&) {
      }
    }
    for (const auto& m : f.metadata()) sum += m.second.size();
    volatile uint64_t sink = sum;
    (void)sink;
  } catch (const lorart::Error&) {
  }
  // 2) the bytes as a header (a valid length prefix in front), which reaches deeper
  if (size > 0) {
    std::string img(8, '\0');
    uint64_t n = size;
    for (int i = 0; i < 8; ++i) img[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    img.append(reinterpret_cast<const char*>(data), size);
    try {
      lorart::SafetensorsFile::from_bytes(img.data(), img.size(), "fuzz-header");
    } catch (const lorart::Error&) {
    }
  }
  // 3) the bytes as JSON text, and a dump/parse round trip of what parses
  try {
    lorart::json::Value v = lorart::json::parse(std::string_view(reinterpret_cast<const char*>(data), size));
    std::string d = lorart::json::dump(v);
    if (lorart::json::dump(lorart::json::parse(d)) != d) __builtin_trap();
  } catch (const lorart::Error&) {
  }
  return 0;
}
