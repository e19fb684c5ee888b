// CUDA kernels of the vpt_fast_ext ops (schemas and CPU kernels: vpt_ops.cpp).
//
// Arguments are checked on the host before launch (vpt_ops.h); what only the data can tell
// (slot and source-pixel indices) is asserted in the kernels, as torch's own indexing kernels
// do, since checking it on the host would need a synchronization and cannot run under
// CUDA-graph capture. The Python layer validates slot values when it is not capturing.

#include "vpt_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
// c10's stream and guard headers rather than ATen/cuda/CUDAContext.h: the same current-stream
// query without pulling in the cuBLAS/cuSPARSE/cuSOLVER headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace vpt_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// kv_splice: one block per token, threads over (head, chunk of VEC elements of head_dim).

// Explicitly rounded products and sums: nvcc would otherwise contract a*b + c*d into a fused
// multiply-add, and the float32 result would no longer be bit-identical to the reference's
// separately rounded torch ops.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& x) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = x;
}

template <typename cache_t, typename in_t, int VEC>
__device__ __forceinline__ Pack<cache_t, VEC> convert(const Pack<in_t, VEC>& x) {
  using acc_t = at::opmath_type<in_t>;
  Pack<cache_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<cache_t>(static_cast<acc_t>(x.v[j]));
  return out;
}

struct SpliceArgs {
  int64_t k_tok, k_head, v_tok, v_head, cos_row, sin_row, capacity;
  int heads, dim;
};

template <typename in_t, typename cache_t, int VEC, bool ROTATE>
__global__ void kv_splice_kernel(const in_t* __restrict__ k, const in_t* __restrict__ v,
                                 const in_t* __restrict__ cos, const in_t* __restrict__ sin,
                                 cache_t* __restrict__ k_cache, cache_t* __restrict__ v_cache,
                                 const int64_t* __restrict__ slots, SpliceArgs a) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0) return;
  CUDA_KERNEL_ASSERT_MSG(slot < a.capacity, "kv_splice: slot_mapping holds a slot past the cache's capacity");
  const int64_t row = slot * a.heads * a.dim;
  const int chunks = a.dim / VEC;

  for (int i = threadIdx.x; i < a.heads * chunks; i += blockDim.x) {
    const int h = i / chunks, d = (i % chunks) * VEC;
    store<VEC>(v_cache + row + h * a.dim + d,
               convert<cache_t, in_t, VEC>(load<VEC>(v + t * a.v_tok + h * a.v_head + d)));
    if constexpr (!ROTATE) {
      store<VEC>(k_cache + row + h * a.dim + d,
                 convert<cache_t, in_t, VEC>(load<VEC>(k + t * a.k_tok + h * a.k_head + d)));
    }
  }
  if constexpr (ROTATE) {
    // rotate-half: each thread owns a chunk of the first half and its partner in the second.
    const int half = a.dim / 2, half_chunks = half / VEC;
    const in_t* c = cos + t * a.cos_row;
    const in_t* s = sin + t * a.sin_row;
    for (int i = threadIdx.x; i < a.heads * half_chunks; i += blockDim.x) {
      const int h = i / half_chunks, d = (i % half_chunks) * VEC;
      const in_t* src = k + t * a.k_tok + h * a.k_head;
      const auto x1 = load<VEC>(src + d), x2 = load<VEC>(src + d + half);
      const auto c1 = load<VEC>(c + d), c2 = load<VEC>(c + d + half);
      const auto s1 = load<VEC>(s + d), s2 = load<VEC>(s + d + half);
      Pack<cache_t, VEC> lo, hi;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t a1 = static_cast<acc_t>(x1.v[j]), a2 = static_cast<acc_t>(x2.v[j]);
        lo.v[j] = static_cast<cache_t>(sub_rn(mul_rn(a1, static_cast<acc_t>(c1.v[j])),
                                              mul_rn(a2, static_cast<acc_t>(s1.v[j]))));
        hi.v[j] = static_cast<cache_t>(add_rn(mul_rn(a2, static_cast<acc_t>(c2.v[j])),
                                              mul_rn(a1, static_cast<acc_t>(s2.v[j]))));
      }
      cache_t* dst = k_cache + row + h * a.dim;
      store<VEC>(dst + d, lo);
      store<VEC>(dst + d + half, hi);
    }
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename in_t, typename cache_t, int VEC>
void launch_kv_splice(const in_t* k, const in_t* v, const in_t* cos, const in_t* sin, cache_t* kc, cache_t* vc,
                      const int64_t* slots, int64_t tokens, const SpliceArgs& a, cudaStream_t stream) {
  const int work = a.heads * a.dim / VEC;
  const int threads = std::clamp((work + 31) / 32 * 32, 32, 512);
  const auto blocks = static_cast<unsigned>(tokens);
  if (cos != nullptr) {
    kv_splice_kernel<in_t, cache_t, VEC, true><<<blocks, threads, 0, stream>>>(k, v, cos, sin, kc, vc, slots, a);
  } else {
    kv_splice_kernel<in_t, cache_t, VEC, false><<<blocks, threads, 0, stream>>>(k, v, cos, sin, kc, vc, slots, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_splice_cuda(const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& cos,
                    const std::optional<at::Tensor>& sin) {
  check_kv_splice(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin);
  const int64_t tokens = slot_mapping.numel();
  if (tokens == 0) return;
  TORCH_CHECK(k_new.size(1) * k_new.size(2) < (int64_t{1} << 31) && tokens < (int64_t{1} << 31),
              "kv_splice: tokens and kv_heads * head_dim must each fit in int32");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const SpliceInputs in = prepare_kv_splice(k_new, v_new, slot_mapping, cos, sin);
  const at::Tensor &k = in.k, &v = in.v, &c = in.cos, &s = in.sin;
  const bool rotate = c.defined();
  const SpliceArgs a{k.stride(0), k.stride(1), v.stride(0), v.stride(1), rotate ? c.stride(0) : 0,
                     rotate ? s.stride(0) : 0, k_cache.size(0) * k_cache.size(1), static_cast<int>(k.size(1)),
                     static_cast<int>(k.size(2))};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "kv_splice_cuda", [&] {
    using in_t = scalar_t;
    VPT_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), "kv_splice_cuda_cache", [&] {
      using cache_t = scalar_t;
      const in_t* k_ptr = k.const_data_ptr<in_t>();
      const in_t* v_ptr = v.const_data_ptr<in_t>();
      const in_t* cos_ptr = rotate ? c.const_data_ptr<in_t>() : nullptr;
      const in_t* sin_ptr = rotate ? s.const_data_ptr<in_t>() : nullptr;
      cache_t* kc = k_cache.mutable_data_ptr<cache_t>();
      cache_t* vc = v_cache.mutable_data_ptr<cache_t>();
      // 16-byte loads of the new tokens when every row, head and half-row starts on one.
      constexpr int VEC = 16 / sizeof(in_t);
      const int64_t span = rotate ? a.dim / 2 : a.dim;
      bool vectorize = span % VEC == 0 && a.k_tok % VEC == 0 && a.k_head % VEC == 0 && a.v_tok % VEC == 0 &&
                       a.v_head % VEC == 0 && aligned(k_ptr, 16) && aligned(v_ptr, 16) &&
                       aligned(kc, VEC * sizeof(cache_t)) && aligned(vc, VEC * sizeof(cache_t));
      if (rotate) {
        vectorize = vectorize && a.cos_row % VEC == 0 && a.sin_row % VEC == 0 && aligned(cos_ptr, 16) &&
                    aligned(sin_ptr, 16);
      }
      const int64_t* slot_ptr = in.slots.const_data_ptr<int64_t>();
      if (vectorize) {
        launch_kv_splice<in_t, cache_t, VEC>(k_ptr, v_ptr, cos_ptr, sin_ptr, kc, vc, slot_ptr, tokens, a, stream);
      } else {
        launch_kv_splice<in_t, cache_t, 1>(k_ptr, v_ptr, cos_ptr, sin_ptr, kc, vc, slot_ptr, tokens, a, stream);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// crop_patch_rows: one block per patch (output row), threads over the patch's p*p pixels; each
// thread samples the three channels of its pixel (one gather of the pixel's three bytes per tap)
// and writes them to the row's three channel planes, so stores stay coalesced per plane.

struct CropArgs {
  int64_t img_h, img_w, grid_w, merge;
  int ky, kx, p;
  bool vertical_first;
};

__global__ void crop_patch_rows_kernel(const uint8_t* __restrict__ image, const int32_t* __restrict__ iy,
                                       const float* __restrict__ wy, const int32_t* __restrict__ ix,
                                       const float* __restrict__ wx, const float* __restrict__ mean,
                                       const float* __restrict__ std, float* __restrict__ out, CropArgs a) {
  int64_t patch_row, patch_col;
  qwen_patch_position(blockIdx.x, a.grid_w, a.merge, &patch_row, &patch_col);
  const int pp = a.p * a.p;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * 3 * pp;
  for (int idx = threadIdx.x; idx < pp; idx += blockDim.x) {
    const int64_t y = patch_row * a.p + idx / a.p;
    const int64_t x = patch_col * a.p + idx % a.p;
    // Separable sampling in PIL's pass order (x then y, or y then x when vertical_first),
    // each pass rounded to an 8-bit level as PIL does.
    float acc[3] = {0.f, 0.f, 0.f};
    // the outer axis is the pass PIL runs second: its inner sums are rounded first
    const int outer_n = a.vertical_first ? a.kx : a.ky, inner_n = a.vertical_first ? a.ky : a.kx;
    for (int o = 0; o < outer_n; ++o) {
      float part[3] = {0.f, 0.f, 0.f};
      for (int in = 0; in < inner_n; ++in) {
        const int i = a.vertical_first ? in : o, j = a.vertical_first ? o : in;
        const int32_t src_y = iy[y * a.ky + i];
        const int32_t src_x = ix[x * a.kx + j];
        CUDA_KERNEL_ASSERT_MSG(src_y >= 0 && src_y < a.img_h, "crop_patch_rows: iy holds a row outside the image");
        CUDA_KERNEL_ASSERT_MSG(src_x >= 0 && src_x < a.img_w, "crop_patch_rows: ix holds a column outside the image");
        const uint8_t* pixel = image + (static_cast<int64_t>(src_y) * a.img_w + src_x) * 3;
        const float w = a.vertical_first ? wy[y * a.ky + i] : wx[x * a.kx + j];
#pragma unroll
        for (int ch = 0; ch < 3; ++ch) part[ch] += w * static_cast<float>(pixel[ch]);
      }
      const float w = a.vertical_first ? wx[x * a.kx + o] : wy[y * a.ky + o];
#pragma unroll
      for (int ch = 0; ch < 3; ++ch) acc[ch] += w * pil_round(part[ch]);
    }
#pragma unroll
    for (int ch = 0; ch < 3; ++ch) dst[ch * pp + idx] = (pil_round(acc[ch]) * (1.f / 255.f) - mean[ch]) / std[ch];
  }
}

at::Tensor crop_patch_rows_cuda(const at::Tensor& image, const at::Tensor& iy, const at::Tensor& wy,
                                const at::Tensor& ix, const at::Tensor& wx, const at::Tensor& mean,
                                const at::Tensor& std, int64_t patch_size, int64_t merge_size, bool vertical_first) {
  const int64_t rows = check_crop_patch_rows(image, iy, wy, ix, wx, mean, std, patch_size, merge_size);
  const c10::cuda::CUDAGuard guard(image.device());
  at::Tensor out = at::empty({rows, 3 * patch_size * patch_size}, image.options().dtype(at::kFloat));
  if (rows == 0) return out;
  TORCH_CHECK(rows < (int64_t{1} << 31), "crop_patch_rows: ", rows, " patches exceed one launch");
  const at::Tensor iy_c = iy.contiguous(), wy_c = wy.contiguous(), ix_c = ix.contiguous(), wx_c = wx.contiguous();
  const at::Tensor mean_c = mean.contiguous(), std_c = std.contiguous();
  CropArgs a{};
  a.img_h = image.size(0);
  a.img_w = image.size(1);
  a.grid_w = ix.size(0) / patch_size;
  a.merge = merge_size;
  a.ky = static_cast<int>(iy.size(1));
  a.kx = static_cast<int>(ix.size(1));
  a.p = static_cast<int>(patch_size);
  a.vertical_first = vertical_first;
  const int64_t pp = patch_size * patch_size;
  const int threads = static_cast<int>(std::min<int64_t>(1024, (pp + 31) / 32 * 32));
  crop_patch_rows_kernel<<<static_cast<unsigned>(rows), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      image.const_data_ptr<uint8_t>(), iy_c.const_data_ptr<int32_t>(), wy_c.const_data_ptr<float>(),
      ix_c.const_data_ptr<int32_t>(), wx_c.const_data_ptr<float>(), mean_c.const_data_ptr<float>(),
      std_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace vpt_fast

TORCH_LIBRARY_IMPL(vpt_fast_ext, CUDA, m) {
  m.impl("kv_splice", &vpt_fast::kv_splice_cuda);
  m.impl("crop_patch_rows", &vpt_fast::crop_patch_rows_cuda);
}
