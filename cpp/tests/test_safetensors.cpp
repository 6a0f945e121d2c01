// safetensors reader/writer: layout, round trips, and the untrusted-header checks
// (this binary is the corruption test run under ASan+UBSan in CI).
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#include "lorart/safetensors.h"
#include "testing.h"

using namespace lorart;

namespace {
std::string tmpdir() {
  static std::string d = [] {
    char tmpl[] = "/tmp/lorart_st_XXXXXX";
    char* p = mkdtemp(tmpl);
    return std::string(p ? p : "/tmp");
  }();
  return d;
}

// A file image from a header string and a data section.
std::string image(const std::string& header, const std::string& data, int64_t len_override = -1) {
  uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

SafetensorsFile from(const std::string& img) { return SafetensorsFile::from_bytes(img.data(), img.size(), "t.st"); }

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}
}  // namespace

TEST(serialize_matches_reference_layout) {
  // Bytes written by the Python safetensors package 0.8 for
  // save({"b": f16 zeros(3), "a": f32 ones(2), "z": f32 zeros(0), "c": u8 zeros(1)}, {"k": "v"}).
  uint16_t b[3] = {0, 0, 0};
  float a[2] = {1.f, 1.f};
  uint8_t c[1] = {0};
  std::vector<NamedView> t = {{"b", TensorView(b, DType::F16, {3})},
                              {"a", TensorView(a, DType::F32, {2})},
                              {"z", TensorView(nullptr, DType::F32, {0})},
                              {"c", TensorView(c, DType::U8, {1})}};
  std::string img = serialize_safetensors(t, {{"k", "v"}});
  const std::string header =
      R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("z":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},"b":{"dtype":"F16","shape":[3],"data_offsets":[8,14]},)"
      R"("c":{"dtype":"U8","shape":[1],"data_offsets":[14,15]}})";
  std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  CHECK(img.size() == 8 + padded.size() + 15);
  CHECK(img.substr(8, padded.size()) == padded);
  CHECK((8 + padded.size()) % 8 == 0);
  float a0;
  std::memcpy(&a0, img.data() + 8 + padded.size(), 4);
  CHECK(a0 == 1.f);
}

TEST(roundtrip_file_mmap_and_read) {
  float w[6] = {1, 2, 3, 4, 5, -6.5f};
  int64_t idx[2] = {7, -9};
  std::string path = tmpdir() + "/rt.safetensors";
  save_safetensors(path, {{"w", TensorView(w, DType::F32, {2, 3})}, {"i", TensorView(idx, DType::I64, {2})}},
                   {{"format", "pt"}, {"note", "é\"\n"}});
  for (bool mm : {true, false}) {
    SafetensorsFile::OpenOptions o;
    o.use_mmap = mm;
    SafetensorsFile f = SafetensorsFile::open(path, o);
    CHECK(f.is_mmapped() == mm);
    CHECK(f.names().size() == 2);
    CHECK(f.metadata().at("note") == "é\"\n");
    CHECK(f.entry("w").shape == (std::vector<int64_t>{2, 3}));
    TensorView v = f.view("w");
    CHECK(v.dtype == DType::F32 && v.ndim == 2 && v.shape[1] == 3);
    CHECK(v.ptr<float>()[5] == -6.5f);
    Tensor t = f.tensor("i");
    CHECK(t.ptr<int64_t>()[1] == -9);
    CHECK_THROWS(f.entry("nope"), "no tensor named 'nope'");
  }
  // no temporary file left behind
  CHECK(!exists(path + ".tmp." + std::to_string(getpid()) + ".0"));
}

TEST(atomic_save_leaves_nothing_on_error) {
  float w[2] = {1, 2};
  std::string path = tmpdir() + "/atomic.safetensors";
  save_safetensors(path, {{"w", TensorView(w, DType::F32, {2})}});
  auto size_before = SafetensorsFile::open(path).entries().size();
  // duplicate names: refused before anything is written; the old file is untouched
  CHECK_THROWS(save_safetensors(path, {{"x", TensorView(w, DType::F32, {1})}, {"x", TensorView(w, DType::F32, {1})}}),
               "duplicate tensor name 'x'");
  CHECK(SafetensorsFile::open(path).entries().size() == size_before);
  CHECK(SafetensorsFile::open(path).contains("w"));
  // a folder that does not exist: error, no file anywhere
  std::string bad = tmpdir() + "/no/such/dir/f.safetensors";
  CHECK_THROWS(save_safetensors(bad, {{"w", TensorView(w, DType::F32, {2})}}), "cannot create the temporary file");
  CHECK(!exists(bad));
  // non-contiguous and reserved names
  float w4[4] = {1, 2, 3, 4};
  int64_t sh[2] = {2, 2}, st[2] = {1, 2};  // a transposed view
  CHECK_THROWS(serialize_safetensors({{"nc", TensorView(w4, DType::F32, 2, sh, st)}}), "must be contiguous");
  CHECK_THROWS(serialize_safetensors({{"__metadata__", TensorView(w, DType::F32, {1})}}), "reserved");
}

TEST(open_errors_name_the_file) {
  CHECK_THROWS(SafetensorsFile::open(tmpdir() + "/missing.safetensors"), "missing.safetensors': cannot open");
  std::string small = tmpdir() + "/small.safetensors";
  std::ofstream(small) << "abc";
  CHECK_THROWS(SafetensorsFile::open(small), "small.safetensors': 3 bytes, too small");
}

TEST(corrupt_headers_are_rejected) {
  const std::string ok_h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string d8(8, '\0');
  CHECK(from(image(ok_h, d8)).contains("a"));
  // truncated file / lengths
  CHECK_THROWS(SafetensorsFile::from_bytes("\x01\x02", 2, "t.st"), "too small");
  CHECK_THROWS(from(image(ok_h, d8).substr(0, 20)), "exceeds the file");
  CHECK_THROWS(from(image(ok_h, d8, 1LL << 40)), "exceeds the limit of 100000000");
  CHECK_THROWS(from(image(ok_h, d8, 200)), "exceeds the file");
  CHECK_THROWS(from(image(ok_h, d8, -1) .replace(0, 8, std::string("\xff\xff\xff\xff\xff\xff\xff\xff", 8))), "exceeds the limit");
  CHECK_THROWS(from(image(ok_h, d8.substr(0, 4))), "go past the data section");
  CHECK_THROWS(from(image(ok_h, d8 + "xx")), "trailing bytes");
  // JSON problems
  CHECK_THROWS(from(image("[1]", "")), "must be a JSON object starting with '{'");
  CHECK_THROWS(from(image("{\"a\":", "")), "bad header JSON");
  CHECK_THROWS(from(image("{\"a\":1} x", "")), "unexpected data after");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{}})", "")), "duplicate key \"a\"");
  CHECK_THROWS(from(image(R"({"a":[]})", "")), "tensor 'a': expected an object");
  // dtypes, shapes, offsets
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", d8)), "tensor 'a': unknown dtype \"F33\"");
  CHECK_THROWS(from(image(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d8)), "missing or non-string \"dtype\"");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8)), "non-negative integers");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", d8)), "non-negative integers");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8)), "needs 12 bytes but data_offsets [0, 8] hold 8");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", d8)), "overflows int64");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F64","shape":[9223372036854775807],"data_offsets":[0,8]}})", d8)), "overflows int64");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[1152921504606846976],"data_offsets":[0,8]}})", d8)), "overflows");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8)), "end before begin");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", d8)), "[begin, end]");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", d8)), "non-negative");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[9223372036854775800,9223372036854775807]}})", d8)), "hold");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}})", std::string(1, '\0'))), "whole number of bytes");
  // overlapping, gaps, out of order
  const std::string d16(16, '\0');
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0'))), "overlap tensor 'a'");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d8)), "overlap");
  CHECK_THROWS(from(image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", d16)), "leave a gap after byte 4");
  SafetensorsFile ooo = from(image(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d16));
  CHECK(ooo.names() == (std::vector<std::string>{"b", "a"}));  // header order kept, ranges may be listed in any order
  // a header of millions of tiny values is refused before it costs gigabytes
  std::string many = "{\"__metadata__\":{},\"a\":{\"dtype\":\"U8\",\"shape\":[";
  for (int i = 0; i < 2100000; ++i) many += "0,";
  many += "0],\"data_offsets\":[0,0]}}";
  CHECK_THROWS(from(image(many, "")), "more than 2000000 values");
  // metadata
  CHECK_THROWS(from(image(R"({"__metadata__":{"k":1}})", "")), "__metadata__ value for 'k' must be a string");
  CHECK_THROWS(from(image(R"({"__metadata__":[]})", "")), "__metadata__ must be an object");
  SafetensorsFile md = from(image(R"({"__metadata__":{"k":"v"}})", ""));
  CHECK(md.metadata().at("k") == "v" && md.entries().empty());
}

TEST(views_of_unsupported_or_unaligned_data) {
  // I16 is a valid safetensors dtype without a lorart::DType: listed, not viewable.
  SafetensorsFile f = from(image(R"({"s":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}})", std::string(4, '\0')));
  CHECK(f.entry("s").dtype_name == "I16" && !f.entry("s").has_dtype);
  CHECK_THROWS(f.view("s"), "dtype I16 has no lorart::DType");
  // header length 1 mod 4: the F32 data is misaligned; view refuses, tensor() copies
  std::string h = R"({"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}})";
  while ((h.size()) % 8 != 0) h += ' ';
  float one = 1.f;
  std::string data(1, '\x07');
  data.append(reinterpret_cast<const char*>(&one), 4);
  SafetensorsFile g = from(image(h, data));
  CHECK_THROWS(g.view("f"), "not aligned");
  CHECK(g.tensor("f").ptr<float>()[0] == 1.f);
  CHECK(g.view("u").ptr<uint8_t>()[0] == 7);
}

TEST_MAIN()
