#include "store/nf4_decode.h"

#include <algorithm>

#include "common/parallel.h"

namespace lorart::detail {

const float kNF4Table[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                             -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                             0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                             0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                             0.7229568362236023f, 1.0f};

void nf4_decode_cpu(const NF4Linear& l, float* out) {
  const int64_t n = l.rows * l.cols;
  const int64_t nblocks = (n + l.blocksize - 1) / l.blocksize;
  const uint8_t* q = l.packed.ptr<uint8_t>();
  parallel_for(nblocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float am;
      if (l.double_quant())
        am = l.nested_code.ptr<float>()[l.absmax.ptr<uint8_t>()[b]] * l.nested_absmax.ptr<float>()[b / 256] +
             l.offset;
      else
        am = l.absmax.ptr<float>()[b];
      const int64_t e = std::min(n, (b + 1) * l.blocksize);
      for (int64_t i = b * l.blocksize; i < e; ++i) {
        const uint8_t byte = q[i >> 1];
        const int code = (i & 1) ? (byte & 0x0f) : (byte >> 4);
        out[i] = kNF4Table[code] * am;
      }
    }
  });
}

}  // namespace lorart::detail
