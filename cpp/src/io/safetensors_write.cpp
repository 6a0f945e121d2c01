// safetensors writer: the reference implementation's byte layout, written atomically.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <set>

#include "common/check.h"
#include "io/st_dtypes.h"
#include "lorart/json.h"
#include "lorart/safetensors.h"

namespace lorart {

const char* safetensors_dtype_name(DType d) { return detail::st_dtype_of(d).name; }

std::string serialize_safetensors(const std::vector<NamedView>& tensors,
                                  const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    LORART_CHECK(!t.first.empty(), "serialize_safetensors: empty tensor name");
    LORART_CHECK(t.first != "__metadata__", "serialize_safetensors: '__metadata__' is reserved");
    LORART_CHECK(seen.insert(t.first).second, "serialize_safetensors: duplicate tensor name '", t.first, "'");
    LORART_CHECK(!t.second.is_cuda(), "serialize_safetensors: tensor '", t.first, "' is on ",
                 device_name(t.second.device), "; copy it to the CPU first");
    LORART_CHECK(t.second.is_contiguous(), "serialize_safetensors: tensor '", t.first,
                 "' must be contiguous (shape ", t.second.shape_str(), ")");
    LORART_CHECK(t.second.data != nullptr || t.second.numel() == 0, "serialize_safetensors: tensor '", t.first,
                 "' has a null data pointer");
  }
  std::set<std::string> mkeys;
  for (const auto& m : metadata)
    LORART_CHECK(mkeys.insert(m.first).second, "serialize_safetensors: duplicate metadata key '", m.first, "'");

  std::vector<const NamedView*> order;
  for (const auto& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const NamedView* a, const NamedView* b) {
    int ra = detail::st_dtype_of(a->second.dtype).rank, rb = detail::st_dtype_of(b->second.dtype).rank;
    return ra != rb ? ra > rb : a->first < b->first;
  });

  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (size_t i = 0; i < metadata.size(); ++i) {
      if (i) header += ',';
      json::dump_string(header, metadata[i].first);
      header += ':';
      json::dump_string(header, metadata[i].second);
    }
    header += '}';
    first = false;
  }
  uint64_t offset = 0;
  for (const NamedView* t : order) {
    if (!first) header += ',';
    first = false;
    json::dump_string(header, t->first);
    header += ":{\"dtype\":\"";
    header += safetensors_dtype_name(t->second.dtype);
    header += "\",\"shape\":[";
    for (int d = 0; d < t->second.ndim; ++d) {
      if (d) header += ',';
      header += std::to_string(t->second.shape[d]);
    }
    uint64_t nb = t->second.nbytes();
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nb) + "]}";
    offset += nb;
  }
  header += '}';
  header.append((8 - header.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(8 + header.size() + offset);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out += static_cast<char>((n >> (8 * i)) & 0xff);
  out += header;
  for (const NamedView* t : order)
    if (t->second.nbytes() > 0) out.append(static_cast<const char*>(t->second.data), t->second.nbytes());
  return out;
}

namespace {
std::atomic<uint64_t> g_tmp_counter{0};

[[noreturn]] void write_fail(const std::string& path, const std::string& what, int err) {
  detail::fail(ErrorKind::Runtime,
               detail::cat("save_safetensors '", path, "': ", what, ": ", std::strerror(err)));
}
}  // namespace

void save_safetensors(const std::string& path, const std::vector<NamedView>& tensors,
                      const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::string bytes = serialize_safetensors(tensors, metadata);
  std::string tmp = detail::cat(path, ".tmp.", ::getpid(), ".", g_tmp_counter.fetch_add(1));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) write_fail(path, detail::cat("cannot create the temporary file '", tmp, "'"), errno);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      write_fail(path, "write failed", e);
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    write_fail(path, "fsync failed", e);
  }
  if (::close(fd) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    write_fail(path, "close failed", e);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    write_fail(path, "rename of the temporary file failed", e);
  }
}

}  // namespace lorart
