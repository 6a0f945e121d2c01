// Umbrella header for the lorart C++ API.
#pragma once

#include "lorart/common.h"
#include "lorart/tensor.h"
#include "lorart/json.h"
#include "lorart/safetensors.h"
#include "lorart/adapter_store.h"
#include "lorart/base_layer.h"
#include "lorart/nf4.h"
#include "lorart/lora.h"
#include "lorart/optim.h"
#include "lorart/act.h"
#include "lorart/norm.h"
