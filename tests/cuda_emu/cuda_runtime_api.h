// Stand-in for the CUDA header of the same name: see cuda_emu.h.
#pragma once
#include "cuda_emu.h"
