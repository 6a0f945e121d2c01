// safetensors reader: mmap (or read) a file, validate the untrusted header.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>

#include "common/check.h"
#include "io/st_dtypes.h"
#include "lorart/json.h"
#include "lorart/safetensors.h"

namespace lorart {

namespace {
constexpr uint64_t kMaxHeader = 100'000'000;  // as the reference implementation
// Values in the header JSON (~10 per tensor): bounds the parser's memory (~220 MB) for a
// hostile 100 MB header of tiny values; real checkpoints hold far fewer than 200k tensors.
constexpr int64_t kMaxHeaderValues = 2'000'000;

[[noreturn]] void io_fail(const std::string& path, const std::string& what) {
  detail::fail(ErrorKind::Runtime, detail::cat("safetensors file '", path, "': ", what, ": ", std::strerror(errno)));
}
}  // namespace

struct SafetensorsFile::Storage {
  void* map = nullptr;
  size_t map_len = 0;
  void* buf = nullptr;  // read fallback (64-byte aligned)
  ~Storage() {
    if (map) munmap(map, map_len);
    std::free(buf);
  }
  const uint8_t* data() const { return static_cast<const uint8_t*>(map ? map : buf); }
};

int64_t SafetensorsEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated at open: no overflow
  return n;
}

SafetensorsFile::SafetensorsFile() = default;
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

bool SafetensorsFile::is_mmapped() const { return storage_ && storage_->map; }

SafetensorsFile SafetensorsFile::open(const std::string& path, const OpenOptions& opts) {
  SafetensorsFile f;
  f.path_ = path;
  f.storage_ = std::make_unique<Storage>();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) io_fail(path, "cannot open");
  struct Closer { int fd; ~Closer() { ::close(fd); } } closer{fd};
  struct stat st;
  if (fstat(fd, &st) != 0) io_fail(path, "cannot stat");
  LORART_CHECK(S_ISREG(st.st_mode), "safetensors file '", path, "': not a regular file");
  uint64_t size = static_cast<uint64_t>(st.st_size);
  LORART_CHECK(size >= 8, "safetensors file '", path, "': ", size,
               " bytes, too small to hold the 8-byte header length");
  LORART_CHECK(size <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "safetensors file '", path,
               "': too large");
  if (opts.use_mmap) {
    void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m != MAP_FAILED) {
      f.storage_->map = m;
      f.storage_->map_len = size;
    }
  }
  if (!f.storage_->map) {  // read fallback
    size_t alloc = (size + 63) / 64 * 64;
    f.storage_->buf = std::aligned_alloc(64, alloc);
    if (!f.storage_->buf)
      detail::fail(ErrorKind::Runtime, detail::cat("safetensors file '", path, "': out of memory reading ", size,
                                                   " bytes"));
    uint8_t* p = static_cast<uint8_t*>(f.storage_->buf);
    uint64_t got = 0;
    while (got < size) {
      ssize_t r = ::pread(fd, p + got, static_cast<size_t>(std::min<uint64_t>(size - got, 1u << 30)),
                          static_cast<off_t>(got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) io_fail(path, "read failed");
      if (r == 0)
        detail::fail(ErrorKind::Runtime,
                     detail::cat("safetensors file '", path, "': file shrank while reading (", got, " of ", size, ")"));
      got += static_cast<uint64_t>(r);
    }
  }
  f.parse_header(size);
  return f;
}

SafetensorsFile SafetensorsFile::from_bytes(const void* data, size_t size, const std::string& label) {
  SafetensorsFile f;
  f.path_ = label;
  f.storage_ = std::make_unique<Storage>();
  LORART_CHECK(size >= 8, "safetensors file '", label, "': ", size,
               " bytes, too small to hold the 8-byte header length");
  f.storage_->buf = std::aligned_alloc(64, (size + 63) / 64 * 64);
  if (!f.storage_->buf) detail::fail(ErrorKind::Runtime, "safetensors: out of memory");
  std::memcpy(f.storage_->buf, data, size);
  f.parse_header(size);
  return f;
}

void SafetensorsFile::parse_header(uint64_t file_size) {
  const std::string& p = path_;
  const uint8_t* base = storage_->data();
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | base[i];
  LORART_CHECK(n <= kMaxHeader, "safetensors file '", p, "': header length ", n, " exceeds the limit of ",
               kMaxHeader, " bytes");
  LORART_CHECK(n <= file_size - 8, "safetensors file '", p, "': header length ", n, " exceeds the file (",
               file_size, " bytes); the file is truncated or not safetensors");
  LORART_CHECK(n >= 2 && base[8] == '{', "safetensors file '", p,
               "': the header must be a JSON object starting with '{'");
  json::Value header;
  try {
    json::ParseOptions po;
    po.max_values = kMaxHeaderValues;
    header = json::parse(std::string_view(reinterpret_cast<const char*>(base + 8), n), po);
  } catch (const Error& e) {
    LORART_CHECK(false, "safetensors file '", p, "': bad header JSON (byte offsets from file byte 8): ", e.what());
  }
  LORART_CHECK(header.is_object(), "safetensors file '", p, "': the header must be a JSON object, got ",
               header.type_name());
  data_ = base + 8 + n;
  data_size_ = file_size - 8 - n;

  for (const auto& kv : header.as_object()) {
    const std::string& name = kv.first;
    const json::Value& v = kv.second;
    if (name == "__metadata__") {
      LORART_CHECK(v.is_object(), "safetensors file '", p, "': __metadata__ must be an object of strings, got ",
                   v.type_name());
      for (const auto& m : v.as_object()) {
        LORART_CHECK(m.second.is_string(), "safetensors file '", p, "': __metadata__ value for '", m.first,
                     "' must be a string, got ", m.second.type_name());
        metadata_[m.first] = m.second.as_string();
        metadata_items_.emplace_back(m.first, m.second.as_string());
      }
      continue;
    }
    auto bad = [&](const std::string& msg) {
      LORART_CHECK(false, "safetensors file '", p, "', tensor '", name, "': ", msg);
    };
    if (!v.is_object()) bad(detail::cat("expected an object {dtype, shape, data_offsets}, got ", v.type_name()));
    const json::Value* dt = v.find("dtype");
    const json::Value* shape = v.find("shape");
    const json::Value* offs = v.find("data_offsets");
    if (!dt || !dt->is_string()) bad("missing or non-string \"dtype\"");
    if (!shape || !shape->is_array()) bad("missing or non-array \"shape\"");
    if (!offs || !offs->is_array() || offs->as_array().size() != 2)
      bad("\"data_offsets\" must be an array [begin, end]");
    SafetensorsEntry e;
    e.name = name;
    e.dtype_name = dt->as_string();
    const detail::StDtype* info = detail::st_dtype_by_name(e.dtype_name);
    if (!info) bad(detail::cat("unknown dtype \"", e.dtype_name, "\""));
    e.has_dtype = info->has_lorart;
    e.dtype = info->lorart;
    const int64_t max = std::numeric_limits<int64_t>::max();
    int64_t numel = 1;
    for (const auto& d : shape->as_array()) {
      if (!d.is_integer() || d.as_int() < 0) bad("shape entries must be non-negative integers");
      int64_t x = d.as_int();
      if (x != 0 && numel > max / x) bad("shape element count overflows int64");
      numel *= x;
      e.shape.push_back(x);
    }
    for (const auto& o : offs->as_array())
      if (!o.is_integer() || o.as_int() < 0) bad("data_offsets must be non-negative integers");
    e.begin = static_cast<uint64_t>(offs->as_array()[0].as_int());
    e.end = static_cast<uint64_t>(offs->as_array()[1].as_int());
    if (numel > max / 64) bad("shape byte count overflows int64");
    uint64_t bits = static_cast<uint64_t>(numel) * info->bits;
    if (bits % 8 != 0) bad(detail::cat(numel, " elements of ", e.dtype_name, " are not a whole number of bytes"));
    if (e.end < e.begin) bad(detail::cat("data_offsets [", e.begin, ", ", e.end, "] end before begin"));
    if (bits / 8 != e.end - e.begin)
      bad(detail::cat("shape ", detail::shape_str(e.shape), " of ", e.dtype_name, " needs ", bits / 8,
                      " bytes but data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin));
    if (e.end > data_size_)
      bad(detail::cat("data_offsets [", e.begin, ", ", e.end, "] go past the data section (", data_size_,
                      " bytes); the file is truncated or corrupt"));
    index_[name] = entries_.size();  // JSON parser already rejects duplicate keys
    entries_.push_back(std::move(e));
  }

  // Sorted by offset, the ranges must tile the data section.
  std::vector<size_t> order(entries_.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return entries_[a].begin != entries_[b].begin ? entries_[a].begin < entries_[b].begin
                                                  : entries_[a].end < entries_[b].end;
  });
  uint64_t at = 0;
  const SafetensorsEntry* prev = nullptr;
  for (size_t i : order) {
    const SafetensorsEntry& e = entries_[i];
    LORART_CHECK(e.begin >= at, "safetensors file '", p, "', tensor '", e.name, "': data_offsets [", e.begin, ", ",
                 e.end, "] overlap tensor '", prev ? prev->name : "", "' (which ends at ", at, ")");
    LORART_CHECK(e.begin == at, "safetensors file '", p, "', tensor '", e.name, "': data_offsets [", e.begin, ", ",
                 e.end, "] leave a gap after byte ", at, " of the data section");
    at = e.end;
    prev = &e;
  }
  LORART_CHECK(at == data_size_, "safetensors file '", p, "': the data section is ", data_size_,
               " bytes but the tensors cover ", at, " (trailing bytes or truncated header)");
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& e : entries_) out.push_back(e.name);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  LORART_CHECK(it != index_.end(), "safetensors file '", path_, "': no tensor named '", name, "'");
  return entries_[it->second];
}

const uint8_t* SafetensorsFile::bytes(const std::string& name) const { return data_ + entry(name).begin; }

TensorView SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  LORART_CHECK_TYPE(e.has_dtype, "safetensors file '", path_, "', tensor '", name, "': dtype ", e.dtype_name,
                    " has no lorart::DType");
  LORART_CHECK(e.shape.size() <= static_cast<size_t>(kMaxDims), "safetensors file '", path_, "', tensor '", name,
               "': ", e.shape.size(), " dimensions, lorart views hold at most ", kMaxDims);
  const uint8_t* ptr = data_ + e.begin;
  LORART_CHECK(reinterpret_cast<uintptr_t>(ptr) % dtype_size(e.dtype) == 0, "safetensors file '", path_,
               "', tensor '", name, "': data is not aligned to ", dtype_size(e.dtype),
               " bytes in the file; use tensor() for an aligned copy");
  return TensorView(const_cast<uint8_t*>(ptr), e.dtype, static_cast<int>(e.shape.size()), e.shape.data());
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  LORART_CHECK_TYPE(e.has_dtype, "safetensors file '", path_, "', tensor '", name, "': dtype ", e.dtype_name,
                    " has no lorart::DType");
  LORART_CHECK(e.shape.size() <= static_cast<size_t>(kMaxDims), "safetensors file '", path_, "', tensor '", name,
               "': ", e.shape.size(), " dimensions, lorart tensors hold at most ", kMaxDims);
  Tensor t(e.dtype, e.shape);
  if (t.nbytes()) std::memcpy(t.data(), data_ + e.begin, t.nbytes());
  return t;
}

}  // namespace lorart
