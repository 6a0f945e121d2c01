// Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
//   [8 bytes: little-endian u64 N][N bytes: JSON header][data section]
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]}
// (offsets relative to the data section) plus an optional "__metadata__" object of
// string -> string.
//
// The header is untrusted input. Opening a file validates all of it before any
// tensor is used, as the reference implementation does, and throws lorart::Error
// naming the file (and the tensor): N > file size - 8 or > 100 MB, malformed JSON,
// a header that is not an object, unknown dtype names, negative or overflowing
// shapes, numel * itemsize != end - begin, begin > end, offsets outside the data
// section, overlapping ranges, gaps, duplicate names, a non string->string
// __metadata__. Ranges may appear in any order in the header; sorted by offset they
// must tile the data section exactly (no gap, no overlap, no trailing bytes).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lorart/common.h"
#include "lorart/tensor.h"

namespace lorart {

// One tensor as the header describes it.
struct SafetensorsEntry {
  std::string name;
  std::string dtype_name;        // as in the file: "F32", "BF16", "U8", "I16", "F8_E4M3", ...
  bool has_dtype = false;        // whether dtype_name maps to a lorart::DType
  DType dtype = DType::U8;       // valid when has_dtype
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;   // byte range within the data section
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  struct OpenOptions {
    bool use_mmap = true;  // false (or when mmap fails): read the whole file into memory
  };

  // Opens and validates a file. Throws lorart::Error (Runtime for I/O failures).
  static SafetensorsFile open(const std::string& path, const OpenOptions& opts);
  static SafetensorsFile open(const std::string& path) { return open(path, OpenOptions{}); }
  // Validates an in-memory file image (copied); `label` names it in errors.
  static SafetensorsFile from_bytes(const void* data, size_t size, const std::string& label = "<memory>");

  const std::string& path() const { return path_; }
  bool is_mmapped() const;
  // Entries in header order.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Throws "<file>: no tensor named 'x'" when absent.
  const SafetensorsEntry& entry(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The same, in header order (what save_safetensors takes, to write the header back as it was).
  const std::vector<std::pair<std::string, std::string>>& metadata_items() const { return metadata_items_; }

  // The tensor's raw bytes (read-only; valid while this object lives).
  const uint8_t* bytes(const std::string& name) const;
  // A zero-copy CPU view into the file (treat as read-only). Throws for dtypes lorart
  // cannot represent and when the data is not aligned to the item size (files not
  // written by a reference writer): use `tensor()` then.
  TensorView view(const std::string& name) const;
  // An owning, aligned copy.
  Tensor tensor(const std::string& name) const;

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

 private:
  struct Storage;
  SafetensorsFile();
  void parse_header(uint64_t file_size);
  std::string path_;
  std::unique_ptr<Storage> storage_;
  const uint8_t* data_ = nullptr;  // start of the data section
  uint64_t data_size_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::pair<std::string, std::string>> metadata_items_;
};

// A tensor to write: a name and a contiguous CPU view.
using NamedView = std::pair<std::string, TensorView>;

// The file image the reference implementation writes for these tensors: tensors
// ordered by dtype alignment (largest first) then name, compact JSON header with
// "__metadata__" first (keys in the given order), padded with spaces to a multiple
// of 8 bytes. Throws on duplicate names, non-contiguous or CUDA views.
std::string serialize_safetensors(const std::vector<NamedView>& tensors,
                                  const std::vector<std::pair<std::string, std::string>>& metadata = {});

// Writes serialize_safetensors(...) atomically: to "<path>.tmp.<pid>.<n>" in the same
// folder, fsync, then rename over `path`. On any error the temporary file is removed
// and `path` is untouched.
void save_safetensors(const std::string& path, const std::vector<NamedView>& tensors,
                      const std::vector<std::pair<std::string, std::string>>& metadata = {});

// safetensors dtype name <-> lorart::DType ("F32" <-> F32, "BOOL" <-> Bool, ...).
const char* safetensors_dtype_name(DType d);

}  // namespace lorart
