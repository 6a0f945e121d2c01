// Umbrella header for the lorart C++ API.
#pragma once

#include "lorart/common.h"
