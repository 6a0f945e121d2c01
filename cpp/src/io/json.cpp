// Strict JSON parser and writer (see lorart/json.h).
#include "lorart/json.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "common/check.h"

namespace lorart::json {

Value::Value(double d) : type_(Type::Number), num_(d) {}
Value::Value(int64_t i) : type_(Type::Number), is_int_(true), int_(i), num_(static_cast<double>(i)) {}

const char* Value::type_name() const {
  switch (type_) {
    case Type::Null: return "null";
    case Type::Bool: return "boolean";
    case Type::Number: return is_int_ ? "integer" : "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "?";
}

#define LORART_JSON_EXPECT(cond, kind)                                                          \
  LORART_CHECK_TYPE(cond, what, ": expected a JSON " kind ", got ", type_name())

bool Value::as_bool(const char* what) const { LORART_JSON_EXPECT(is_bool(), "boolean"); return bool_; }
double Value::as_double(const char* what) const { LORART_JSON_EXPECT(is_number(), "number"); return num_; }
int64_t Value::as_int(const char* what) const { LORART_JSON_EXPECT(is_integer(), "integer"); return int_; }
const std::string& Value::as_string(const char* what) const { LORART_JSON_EXPECT(is_string(), "string"); return str_; }
const Value::Array& Value::as_array(const char* what) const { LORART_JSON_EXPECT(is_array(), "array"); return arr_; }
const Value::Object& Value::as_object(const char* what) const { LORART_JSON_EXPECT(is_object(), "object"); return obj_; }
Value::Array& Value::as_array(const char* what) { LORART_JSON_EXPECT(is_array(), "array"); return arr_; }
Value::Object& Value::as_object(const char* what) { LORART_JSON_EXPECT(is_object(), "object"); return obj_; }

const Value* Value::find(std::string_view key) const {
  if (!is_object()) return nullptr;
  for (const auto& kv : obj_)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

Value& Value::set(const std::string& key, Value v) {
  if (is_null()) type_ = Type::Object;
  auto& o = as_object("Value::set");
  for (auto& kv : o)
    if (kv.first == key) return kv.second = std::move(v);
  o.emplace_back(key, std::move(v));
  return o.back().second;
}

// ---- parser -------------------------------------------------------------------

namespace {

class Parser {
 public:
  Parser(std::string_view s, const ParseOptions& o) : s_(s), opts_(o) {}

  Value run() {
    ws();
    Value v = value(0);
    ws();
    if (i_ != s_.size()) err("unexpected data after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void err(const std::string& msg) const {
    detail::fail(ErrorKind::Value, detail::cat("json: at byte ", i_, ": ", msg));
  }
  bool eof() const { return i_ >= s_.size(); }
  char peek() const { return eof() ? '\0' : s_[i_]; }
  void ws() {
    while (!eof() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  std::string found() const {
    if (eof()) return "end of input";
    unsigned char c = static_cast<unsigned char>(s_[i_]);
    if (c >= 0x20 && c < 0x7f) return detail::cat("'", static_cast<char>(c), "'");
    char buf[8];
    std::snprintf(buf, sizeof buf, "0x%02x", c);
    return detail::cat("byte ", buf);
  }
  void literal(const char* word) {
    size_t n = std::strlen(word);
    if (s_.substr(i_, n) != word) err(detail::cat("invalid literal (expected '", word, "'), got ", found()));
    i_ += n;
  }

  Value value(int depth) {
    if (depth >= opts_.max_depth) err(detail::cat("nesting deeper than ", opts_.max_depth, " levels"));
    if (opts_.max_values > 0 && ++values_ > opts_.max_values)
      err(detail::cat("more than ", opts_.max_values, " values in the document"));
    switch (peek()) {
      case '{': return object(depth);
      case '[': return array(depth);
      case '"': return Value(string());
      case 't': literal("true"); return Value(true);
      case 'f': literal("false"); return Value(false);
      case 'n': literal("null"); return Value();
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return number();
        err(detail::cat("expected a JSON value, got ", found()));
    }
  }

  Value object(int depth) {
    ++i_;  // {
    Value::Object o;
    std::unordered_set<std::string> seen;
    ws();
    if (peek() == '}') { ++i_; return Value(std::move(o)); }
    for (;;) {
      ws();
      if (peek() != '"') err(detail::cat("expected a string key, got ", found()));
      size_t key_at = i_;
      std::string key = string();
      // Duplicate keys: a linear scan for small objects, a hash set beyond (an untrusted
      // header may hold millions of keys).
      bool dup = false;
      if (o.size() < 16) {
        for (const auto& kv : o) dup = dup || kv.first == key;
        if (o.size() == 15)
          for (const auto& kv : o) seen.insert(kv.first);
      } else {
        dup = seen.count(key) != 0;
      }
      if (dup) {
        i_ = key_at;
        err(detail::cat("duplicate key \"", key, "\""));
      }
      if (o.size() >= 15) seen.insert(key);
      ws();
      if (peek() != ':') err(detail::cat("expected ':' after a key, got ", found()));
      ++i_;
      ws();
      Value v = value(depth + 1);
      o.emplace_back(std::move(key), std::move(v));
      ws();
      if (peek() == ',') { ++i_; continue; }
      if (peek() == '}') { ++i_; return Value(std::move(o)); }
      err(detail::cat("expected ',' or '}' in an object, got ", found()));
    }
  }

  Value array(int depth) {
    ++i_;  // [
    Value::Array a;
    ws();
    if (peek() == ']') { ++i_; return Value(std::move(a)); }
    for (;;) {
      ws();
      a.push_back(value(depth + 1));
      ws();
      if (peek() == ',') { ++i_; continue; }
      if (peek() == ']') { ++i_; return Value(std::move(a)); }
      err(detail::cat("expected ',' or ']' in an array, got ", found()));
    }
  }

  unsigned hex4() {
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = peek();
      unsigned d;
      if (c >= '0' && c <= '9') d = c - '0';
      else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
      else err(detail::cat("expected 4 hex digits after \\u, got ", found()));
      v = v * 16 + d;
      ++i_;
    }
    return v;
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  // Validates one UTF-8 sequence starting at i_ (a byte >= 0x80) and copies it.
  void utf8(std::string& out) {
    unsigned char c = static_cast<unsigned char>(s_[i_]);
    int n;
    uint32_t cp, min;
    if (c >= 0xc2 && c <= 0xdf) { n = 1; cp = c & 0x1f; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { n = 2; cp = c & 0x0f; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { n = 3; cp = c & 0x07; min = 0x10000; }
    else err(detail::cat("invalid UTF-8 in a string: ", found()));
    if (i_ + n >= s_.size()) err("truncated UTF-8 sequence in a string");
    for (int k = 1; k <= n; ++k) {
      unsigned char d = static_cast<unsigned char>(s_[i_ + k]);
      if ((d & 0xc0) != 0x80) { i_ += k; err(detail::cat("invalid UTF-8 continuation byte: ", found())); }
      cp = (cp << 6) | (d & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) err("invalid UTF-8 code point in a string");
    out.append(s_.data() + i_, n + 1);
    i_ += n + 1;
  }

  std::string string() {
    ++i_;  // "
    std::string out;
    for (;;) {
      if (eof()) err("unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[i_]);
      if (c == '"') { ++i_; return out; }
      if (c < 0x20) err(detail::cat("raw control character in a string: ", found(), " (escape it)"));
      if (c >= 0x80) { utf8(out); continue; }
      if (c != '\\') { out += static_cast<char>(c); ++i_; continue; }
      ++i_;
      char e = peek();
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          size_t at = i_ - 1;
          ++i_;
          uint32_t cp = hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) { i_ = at; err("unpaired low surrogate \\u escape"); }
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (s_.substr(i_, 2) != "\\u") { i_ = at; err("high surrogate \\u escape not followed by a low one"); }
            i_ += 2;
            uint32_t lo = hex4();
            if (lo < 0xdc00 || lo > 0xdfff) { i_ = at; err("high surrogate \\u escape not followed by a low one"); }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          put_utf8(out, cp);
          continue;
        }
        default: err(detail::cat("invalid escape \\", found()));
      }
      ++i_;
    }
  }

  Value number() {
    size_t start = i_;
    bool integral = true;
    if (peek() == '-') ++i_;
    if (peek() == '0') {
      ++i_;
      if (peek() >= '0' && peek() <= '9') err("leading zeros are not allowed in a number");
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++i_;
    } else {
      err(detail::cat("expected a digit, got ", found()));
    }
    if (peek() == '.') {
      integral = false;
      ++i_;
      if (!(peek() >= '0' && peek() <= '9')) err(detail::cat("expected a digit after '.', got ", found()));
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (!(peek() >= '0' && peek() <= '9')) err(detail::cat("expected a digit in the exponent, got ", found()));
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    std::string text(s_.substr(start, i_ - start));
    if (integral) {
      errno = 0;
      char* end = nullptr;
      long long v = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end == text.c_str() + text.size()) return Value(static_cast<int64_t>(v));
      // out of int64 range: keep it as a (rounded) double
    }
    errno = 0;
    double d = std::strtod(text.c_str(), nullptr);
    if (!std::isfinite(d)) { i_ = start; err(detail::cat("number out of range: ", text)); }
    return Value(d);
  }

  std::string_view s_;
  ParseOptions opts_;
  size_t i_ = 0;
  int64_t values_ = 0;
};

void dump_to(std::string& out, const Value& v) {
  switch (v.type()) {
    case Value::Type::Null: out += "null"; return;
    case Value::Type::Bool: out += v.as_bool() ? "true" : "false"; return;
    case Value::Type::Number: {
      if (v.is_integer()) { out += std::to_string(v.as_int()); return; }
      double d = v.as_double();
      LORART_CHECK(std::isfinite(d), "json::dump: cannot write the non-finite number ", d);
      char buf[32];
      for (int prec = 1; prec <= 17; ++prec) {
        std::snprintf(buf, sizeof buf, "%.*g", prec, d);
        if (std::strtod(buf, nullptr) == d) break;
      }
      out += buf;
      if (!std::strpbrk(buf, ".eE")) out += ".0";  // stays a non-integer number when parsed back
      return;
    }
    case Value::Type::String: dump_string(out, v.as_string()); return;
    case Value::Type::Array: {
      out += '[';
      bool first = true;
      for (const auto& e : v.as_array()) {
        if (!first) out += ',';
        first = false;
        dump_to(out, e);
      }
      out += ']';
      return;
    }
    case Value::Type::Object: {
      out += '{';
      bool first = true;
      for (const auto& kv : v.as_object()) {
        if (!first) out += ',';
        first = false;
        dump_string(out, kv.first);
        out += ':';
        dump_to(out, kv.second);
      }
      out += '}';
      return;
    }
  }
}

}  // namespace

Value parse(std::string_view text, const ParseOptions& opts) { return Parser(text, opts).run(); }

void dump_string(std::string& out, std::string_view s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

std::string dump(const Value& v) {
  std::string out;
  dump_to(out, v);
  return out;
}

}  // namespace lorart::json
