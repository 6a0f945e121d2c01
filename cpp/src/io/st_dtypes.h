// Internal: the safetensors dtype table (names, bit widths, mapping to lorart::DType,
// and the alignment rank the reference writer sorts by).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lorart/common.h"

namespace lorart::detail {

struct StDtype {
  const char* name;
  int bits;         // per element (F4 = 4, F6_* = 6)
  int rank;         // position in the reference's Dtype enum (the writer sorts by it, descending)
  bool has_lorart;
  DType lorart;
};

const StDtype* st_dtype_by_name(const std::string& name);  // nullptr when unknown
const StDtype& st_dtype_of(DType d);
std::string shape_str(const std::vector<int64_t>& shape);  // "[4, 8]"

}  // namespace lorart::detail
