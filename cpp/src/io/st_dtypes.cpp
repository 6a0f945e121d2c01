#include "io/st_dtypes.h"

#include <sstream>

#include "common/check.h"

namespace lorart::detail {

namespace {
// Order = the reference implementation's `Dtype` enum (safetensors 0.8).
const StDtype kTable[] = {
    {"BOOL", 8, 0, true, DType::Bool},     {"F4", 4, 1, false, DType::U8},
    {"F6_E2M3", 6, 2, false, DType::U8},   {"F6_E3M2", 6, 3, false, DType::U8},
    {"U8", 8, 4, true, DType::U8},         {"I8", 8, 5, true, DType::I8},
    {"F8_E5M2", 8, 6, false, DType::U8},   {"F8_E4M3", 8, 7, false, DType::U8},
    {"F8_E8M0", 8, 8, false, DType::U8},   {"I16", 16, 9, false, DType::U8},
    {"U16", 16, 10, false, DType::U8},     {"F16", 16, 11, true, DType::F16},
    {"BF16", 16, 12, true, DType::BF16},   {"I32", 32, 13, true, DType::I32},
    {"U32", 32, 14, false, DType::U8},     {"F32", 32, 15, true, DType::F32},
    {"C64", 64, 16, false, DType::U8},     {"F64", 64, 17, true, DType::F64},
    {"I64", 64, 18, true, DType::I64},     {"U64", 64, 19, false, DType::U8},
};
}  // namespace

const StDtype* st_dtype_by_name(const std::string& name) {
  for (const auto& d : kTable)
    if (name == d.name) return &d;
  return nullptr;
}

const StDtype& st_dtype_of(DType dt) {
  for (const auto& d : kTable)
    if (d.has_lorart && d.lorart == dt) return d;
  fail(ErrorKind::Type, cat("safetensors: no dtype for ", dtype_name(dt)));
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

}  // namespace lorart::detail
