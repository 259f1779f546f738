// How the torch-side algorithms of csrc/tiled/ call a kernel of csrc/include/fastkd: through a
// function the caller chose (the CPU kernel, the CUDA launcher or the emulated one), so the
// algorithms do not know the backends.
#pragma once
#include <functional>

namespace fastkd::tiled {

template <typename Params>
using Kernel = std::function<void(const Params&)>;

}  // namespace fastkd::tiled
