// Frozen base linear layers loaded from safetensors checkpoints, for services that
// keep one base model and apply per-request adapters (lorart/adapter_store.h).
//
//   DenseLinear: `P.weight` [out, in] (+ optional `P.bias` [out]), y = x @ W.T + b
//   NF4Linear:   Hugging Face bitsandbytes 4-bit keys (NF4, with or without double
//                quantization), y = x @ dequant(W).T + b
#pragma once

#include <string>

#include "lorart/common.h"
#include "lorart/nf4.h"
#include "lorart/safetensors.h"
#include "lorart/tensor.h"

namespace lorart {

struct DenseLinear {
  Tensor weight;  // [out_features, in_features], float32 (or as stored with keep_dtype)
  Tensor bias;    // [out_features] or undefined
  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }

  // Loads `<prefix>.weight` (+ `<prefix>.bias` when present). prefix "" means keys
  // "weight"/"bias". F32/BF16/F16 weights; converted to float32 unless keep_dtype.
  static DenseLinear load(const SafetensorsFile& file, const std::string& prefix, bool keep_dtype = false);
  // y[n, out] = x[n, in] @ W.T + b (CPU, float32 accumulation; x, y float32/bfloat16/float16).
  void forward(const TensorView& x, const TensorView& y) const;
};

struct NF4Linear {
  Tensor packed;         // uint8, (rows*cols+1)/2 bytes
  Tensor absmax;         // float32 [nblocks], or uint8 [nblocks] with double quantization
  Tensor nested_absmax;  // float32 [ceil(nblocks/256)] (double quantization only)
  Tensor nested_code;    // float32 [256] (double quantization only)
  Tensor quant_map;      // float32 [16], the NF4 code table as stored
  float offset = 0.f;    // nested_offset (double quantization only)
  int64_t blocksize = 64;
  int64_t rows = 0, cols = 0;    // out_features, in_features
  DType dtype = DType::F32;      // the compute dtype recorded in the checkpoint
  Tensor bias;                   // [out_features] float32, or undefined
  bool double_quant() const { return nested_absmax.defined(); }
  int64_t in_features() const { return cols; }
  int64_t out_features() const { return rows; }

  // Loads `<prefix>.weight`, `.weight.absmax`, `.weight.quant_map`,
  // `.weight.quant_state.bitsandbytes__nf4` (JSON bytes) and, with double quantization,
  // `.weight.nested_absmax` / `.weight.nested_quant_map` (+ `<prefix>.bias`). Every
  // size is checked against the quant_state's shape and blocksize; quant_map must be
  // the NF4 table (FP4 checkpoints are refused).
  static NF4Linear load(const SafetensorsFile& file, const std::string& prefix);
  // Whether `<prefix>.weight.quant_state.bitsandbytes__nf4` exists in `file`.
  static bool present(const SafetensorsFile& file, const std::string& prefix);
  // A view for the NF4 kernels (lorart/nf4.h), valid while this layer lives.
  NF4View view() const;
  // The dequantized weight [rows, cols] in float32 (lorart::nf4_dequantize).
  Tensor dequantize() const;
  // y[n, out] = x[n, in] @ dequant(W).T + b through lorart::nf4_gemv (W decoded on the
  // fly, float32 accumulation; x and y of one dtype float32/bfloat16/float16, CPU).
  void forward(const TensorView& x, const TensorView& y) const;
};

// One base layer of either kind, chosen by what the file holds at `prefix`.
struct BaseLinear {
  bool is_nf4 = false;
  DenseLinear dense;
  NF4Linear nf4;
  static BaseLinear load(const SafetensorsFile& file, const std::string& prefix);
  int64_t in_features() const { return is_nf4 ? nf4.in_features() : dense.in_features(); }
  int64_t out_features() const { return is_nf4 ? nf4.out_features() : dense.out_features(); }
  void forward(const TensorView& x, const TensorView& y) const { is_nf4 ? nf4.forward(x, y) : dense.forward(x, y); }
};

}  // namespace lorart
