// lorart_st_copy IN OUT [--no-mmap]: reads IN with lorart::SafetensorsFile (validating the
// header), writes every tensor and the metadata to OUT with lorart::save_safetensors, and
// prints the header as lorart sees it (one JSON line). Exit 1 with the error on stderr.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "lorart/lorart.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s IN OUT [--no-mmap]\n", argv[0]);
    return 2;
  }
  try {
    lorart::SafetensorsFile::OpenOptions opts;
    opts.use_mmap = !(argc > 3 && std::strcmp(argv[3], "--no-mmap") == 0);
    lorart::SafetensorsFile in = lorart::SafetensorsFile::open(argv[1], opts);
    std::vector<lorart::Tensor> keep;
    std::vector<lorart::NamedView> tensors;
    lorart::json::Value summary, entries = lorart::json::Value(lorart::json::Value::Object{});
    for (const auto& e : in.entries()) {
      keep.push_back(in.tensor(e.name));  // aligned copies: a reader test of tensor()
      tensors.emplace_back(e.name, keep.back().view());
      lorart::json::Value::Array shape;
      for (int64_t d : e.shape) shape.emplace_back(d);
      lorart::json::Value info;
      info.set("dtype", e.dtype_name);
      info.set("shape", lorart::json::Value(shape));
      entries.set(e.name, info);
    }
    lorart::save_safetensors(argv[2], tensors, in.metadata_items());
    summary.set("mmap", in.is_mmapped());
    summary.set("tensors", entries);
    std::printf("%s\n", lorart::json::dump(summary).c_str());
  } catch (const lorart::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
