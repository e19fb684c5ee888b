// Shared by the CPU and CUDA kernels of the vpt_fast_ext ops: the argument checks
// (run before any launch, so a kernel never sees a shape it was not written for) and the
// patch order of the Qwen2-VL image processor.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>

// The cache dtypes kv_splice writes: float32, float16, bfloat16.
#define VPT_DISPATCH_CACHE_TYPES(TYPE, NAME, ...)        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                         \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace vpt_fast {

// Shapes, dtypes, layouts and devices of kv_splice's arguments (slot values are data:
// the CPU kernel checks them, the CUDA kernel asserts on them).
void check_kv_splice(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                     const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin);

// kv_splice's inputs as the kernels read them: the first slot_mapping.numel() rows, with a dense
// innermost dimension (token and head strides may be anything: slices of a fused QKV projection,
// padded batches), in one dtype (k, v, cos and sin promoted together when cos/sin come in
// another dtype than k_new, as the reference's arithmetic promotes them), and contiguous slots.
// cos and sin are undefined tensors when the keys are not rotated.
struct SpliceInputs {
  at::Tensor k, v, cos, sin, slots;
};
SpliceInputs prepare_kv_splice(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& slot_mapping,
                               const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin);

// Shapes, dtypes, layouts and devices of crop_patch_rows' arguments; returns the number of
// patch rows of the output.
int64_t check_crop_patch_rows(const at::Tensor& image, const at::Tensor& iy, const at::Tensor& wy,
                              const at::Tensor& ix, const at::Tensor& wx, const at::Tensor& mean,
                              const at::Tensor& std, int64_t patch_size, int64_t merge_size);

// PIL's 8-bit resampling ends each pass by rounding half up and clipping to [0, 255].
C10_HOST_DEVICE inline float pil_round(float v) {
  v = floorf(v + 0.5f);
  return v < 0.f ? 0.f : (v > 255.f ? 255.f : v);
}

// Position (patch row, patch column) of output row `n` in the processor's order: rows run
// over merge blocks (block row, block column) and, inside a block, over its merge x merge
// patches row by row, so the merger that follows the vision tower sees each block's patches
// next to each other.
C10_HOST_DEVICE inline void qwen_patch_position(int64_t n, int64_t grid_w, int64_t merge, int64_t* patch_row,
                                                int64_t* patch_col) {
  const int64_t j = n % merge;
  const int64_t i = (n / merge) % merge;
  const int64_t block = n / (merge * merge);
  const int64_t blocks_w = grid_w / merge;
  *patch_row = (block / blocks_w) * merge + i;
  *patch_col = (block % blocks_w) * merge + j;
}

}  // namespace vpt_fast
