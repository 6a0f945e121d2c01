// Umbrella header for the lorart C++ API.
#pragma once

#include "lorart/common.h"
#include "lorart/tensor.h"
#include "lorart/json.h"
#include "lorart/safetensors.h"
#include "lorart/adapter_store.h"
#include "lorart/base_layer.h"
