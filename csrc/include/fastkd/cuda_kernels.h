// The CUDA launchers of every loss family as one table of function pointers. The torch glue calls
// the compiled-in CUDA kernels directly; the table lets it call the same launchers compiled for
// the host CUDA emulator instead (csrc/emu/README.md), on CPU tensors, in the emulated tests.
#pragma once

#include "fastkd/feature_kd.h"
#include "fastkd/logit_kd.h"
#include "fastkd/logit_topk.h"
#include "fastkd/relation_kd.h"

namespace fastkd {

struct CudaKernelTable {
  int (*logit_kd)(const LogitKDParams&, void*);
  int (*feature_kd_epilogue)(const FeatureEpilogueParams&, void*);
  int (*sp_stats)(const SPTileParams&, void*);
  int (*sp_tile)(const SPTileParams&, void*);
  int (*rkd_stats)(const RKDTileParams&, void*);
  int (*rkd_tile)(const RKDTileParams&, void*);
  int (*rkd_angle)(const RKDAngleParams&, void*);
  int (*pkt_stats)(const PKTTileParams&, void*);
  int (*pkt_tile)(const PKTTileParams&, void*);
  // Why the last launch failed (the emulator's message), for the glue's error.
  const char* (*last_error)();
  // After last_error, so that the entries above keep their offsets.
  int (*logit_topk)(const LogitTopKParams&, void*);
};

}  // namespace fastkd
