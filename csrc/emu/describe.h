// Force-included (-include) into every kernel file the CUDA emulator compiles: declares, for each
// parameter struct a kernel takes, which memory that kernel may read and write (found by
// argument-dependent lookup from emu::Launcher; definitions in csrc/emu/describe.cpp).
#pragma once
#include "cuda_runtime.h"
#include "fastkd/feature_kd.h"
#include "fastkd/logit_kd.h"
#include "fastkd/logit_topk.h"
#include "fastkd/relation_kd.h"

namespace fastkd {
void emu_describe(const LogitKDParams& p);
void emu_describe(const LogitTopKParams& p);
void emu_describe(const FeatureEpilogueParams& p);
void emu_describe(const SPTileParams& p);
void emu_describe(const RKDTileParams& p);
void emu_describe(const RKDAngleParams& p);
void emu_describe(const PKTTileParams& p);
}  // namespace fastkd
