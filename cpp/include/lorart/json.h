// A small, strict JSON value, parser and writer (RFC 8259), used for safetensors
// headers, adapter_config.json and the example service's request lines.
//
// Strict: no comments, no trailing commas, no NaN/Infinity, no leading zeros, no
// duplicate object keys, no unpaired UTF-16 surrogates, no raw control characters
// in strings, nesting at most `max_depth` (default 64), nothing but whitespace
// after the value. Parse errors are lorart::Error("json: at byte N: ...").
// Objects keep their keys in document order.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lorart/common.h"

namespace lorart::json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;

  Value() = default;  // null
  Value(std::nullptr_t) {}
  Value(bool b) : type_(Type::Bool), bool_(b) {}
  Value(double d);
  Value(int64_t i);
  Value(int i) : Value(static_cast<int64_t>(i)) {}
  Value(const char* s) : type_(Type::String), str_(s) {}
  Value(std::string s) : type_(Type::String), str_(std::move(s)) {}
  Value(Array a) : type_(Type::Array), arr_(std::move(a)) {}
  Value(Object o) : type_(Type::Object), obj_(std::move(o)) {}

  Type type() const { return type_; }
  const char* type_name() const;
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  // A number written without fraction/exponent that fits in int64.
  bool is_integer() const { return type_ == Type::Number && is_int_; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Typed accessors: throw lorart::Error naming `what` and the actual type on mismatch.
  bool as_bool(const char* what = "value") const;
  double as_double(const char* what = "value") const;
  int64_t as_int(const char* what = "value") const;  // integers only (no 1.0)
  const std::string& as_string(const char* what = "value") const;
  const Array& as_array(const char* what = "value") const;
  const Object& as_object(const char* what = "value") const;
  Array& as_array(const char* what = "value");
  Object& as_object(const char* what = "value");

  // Object lookup: nullptr when absent (or when this is not an object).
  const Value* find(std::string_view key) const;
  // Appends (or replaces) a key of an object; a null value becomes an empty object first.
  Value& set(const std::string& key, Value v);

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  bool is_int_ = false;
  int64_t int_ = 0;
  double num_ = 0.0;
  std::string str_;
  Array arr_;
  Object obj_;
};

struct ParseOptions {
  int max_depth = 64;
  // Most values (scalars, arrays, objects) in the document; 0 = no limit. Bounds the memory
  // an untrusted document can make the parser allocate (~110 bytes per value).
  int64_t max_values = 0;
};

// Parses exactly one JSON value from `text` (surrounding whitespace allowed).
Value parse(std::string_view text, const ParseOptions& opts = {});

// Compact serialization: no spaces; strings escaped as serde_json does
// (`"` `\\` and control characters; other UTF-8 bytes written as is);
// integers exactly, other numbers with the shortest repr that round-trips a double
// ("2.0", not "2", so that a dump parses back to the same value and kind).
// Throws on non-finite numbers.
std::string dump(const Value& v);
// Appends one escaped, quoted JSON string.
void dump_string(std::string& out, std::string_view s);

}  // namespace lorart::json
