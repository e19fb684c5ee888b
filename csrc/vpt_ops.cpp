// vpt_fast_ext: the op schemas, their argument checks, and the CPU kernels.
// The CUDA kernels of the same ops are in vpt_ops_cuda.cu.
//
// Both ops are defined by the plain torch references in vpt_fast/ops/ and tested against
// them; the schemas mark the caches kv_splice writes into (Tensor(a!)), so torch.compile and
// functionalization see the mutation.

#include "vpt_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace vpt_fast {

namespace {

bool is_cache_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
}

}  // namespace

void check_kv_splice(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                     const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin) {
  TORCH_CHECK(k_new.dim() == 3, "kv_splice: k_new must be (tokens, kv_heads, head_dim), got ", k_new.sizes());
  TORCH_CHECK(v_new.sizes() == k_new.sizes(), "kv_splice: v_new must have k_new's shape ", k_new.sizes(), ", got ",
              v_new.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "kv_splice: k_cache must be (blocks, block_size, kv_heads, head_dim), got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "kv_splice: v_cache must have k_cache's shape ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(2) == k_new.size(1) && k_cache.size(3) == k_new.size(2),
              "kv_splice: the caches' (kv_heads, head_dim) must match k_new's (", k_new.size(1), ", ", k_new.size(2),
              "), got (", k_cache.size(2), ", ", k_cache.size(3), ")");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "kv_splice: k_cache and v_cache must be contiguous");
  TORCH_CHECK(at::isFloatingType(k_new.scalar_type()), "kv_splice: k_new must be a floating point tensor, got ",
              k_new.scalar_type());
  TORCH_CHECK(v_new.scalar_type() == k_new.scalar_type(), "kv_splice: v_new must have k_new's dtype ",
              k_new.scalar_type(), ", got ", v_new.scalar_type());
  TORCH_CHECK(is_cache_dtype(k_cache.scalar_type()), "kv_splice: k_cache must be float32, float16 or bfloat16, got ",
              k_cache.scalar_type());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "kv_splice: v_cache must have k_cache's dtype ",
              k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "kv_splice: slot_mapping must be int64, got ",
              slot_mapping.scalar_type());
  TORCH_CHECK(slot_mapping.dim() == 1, "kv_splice: slot_mapping must be 1-D, got shape ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.numel() <= k_new.size(0), "kv_splice: slot_mapping has ", slot_mapping.numel(),
              " slots for ", k_new.size(0), " new tokens");
  const char* op = "kv_splice";
  check_same_device(op, k_new, "k_new", k_cache, "k_cache");
  check_same_device(op, v_new, "v_new", k_cache, "k_cache");
  check_same_device(op, v_cache, "v_cache", k_cache, "k_cache");
  check_same_device(op, slot_mapping, "slot_mapping", k_cache, "k_cache");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "kv_splice: give both cos and sin, or neither");
  if (cos.has_value()) {
    const int64_t dim = k_new.size(2);
    TORCH_CHECK(dim % 2 == 0, "kv_splice: rotating keys needs an even head_dim, got ", dim);
    for (const auto& [table, name] : {std::pair{&*cos, "cos"}, std::pair{&*sin, "sin"}}) {
      TORCH_CHECK(table->dim() == 2 && table->size(0) >= slot_mapping.numel() && table->size(1) == dim, "kv_splice: ",
                  name, " must be (tokens >= ", slot_mapping.numel(), ", ", dim, "), got ", table->sizes());
      TORCH_CHECK(at::isFloatingType(table->scalar_type()), "kv_splice: ", name,
                  " must be a floating point tensor, got ", table->scalar_type());
      check_same_device(op, *table, name, k_cache, "k_cache");
    }
    TORCH_CHECK(sin->scalar_type() == cos->scalar_type(), "kv_splice: sin must have cos's dtype ",
                cos->scalar_type(), ", got ", sin->scalar_type());
  }
}

namespace {
at::Tensor dense_last_dim(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }
}  // namespace

SpliceInputs prepare_kv_splice(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& slot_mapping,
                               const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin) {
  const int64_t tokens = slot_mapping.numel();
  SpliceInputs in{dense_last_dim(k_new.narrow(0, 0, tokens)), dense_last_dim(v_new.narrow(0, 0, tokens)),
                  at::Tensor(), at::Tensor(), slot_mapping.contiguous()};
  if (cos.has_value()) {
    in.cos = dense_last_dim(cos->narrow(0, 0, tokens));
    in.sin = dense_last_dim(sin->narrow(0, 0, tokens));
    const at::ScalarType common = c10::promoteTypes(in.k.scalar_type(), in.cos.scalar_type());
    // Widening is exact, so v (which is only copied) is unchanged by taking the common dtype.
    for (at::Tensor* t : {&in.k, &in.v, &in.cos, &in.sin}) {
      if (t->scalar_type() != common) *t = t->to(common);
    }
  }
  return in;
}

int64_t check_crop_patch_rows(const at::Tensor& image, const at::Tensor& iy, const at::Tensor& wy,
                              const at::Tensor& ix, const at::Tensor& wx, const at::Tensor& mean,
                              const at::Tensor& std, int64_t patch_size, int64_t merge_size) {
  TORCH_CHECK(image.scalar_type() == at::kByte, "crop_patch_rows: image must be uint8, got ", image.scalar_type());
  TORCH_CHECK(image.dim() == 3 && image.size(2) == 3, "crop_patch_rows: image must be (height, width, 3), got ",
              image.sizes());
  TORCH_CHECK(image.is_contiguous(), "crop_patch_rows: image must be contiguous (height, width, 3)");
  TORCH_CHECK(patch_size >= 1 && merge_size >= 1, "crop_patch_rows: patch_size and merge_size must be positive, got ",
              patch_size, " and ", merge_size);
  for (const auto& [index, weight, index_name, weight_name, axis] :
       {std::tuple{&iy, &wy, "iy", "wy", "output rows"}, std::tuple{&ix, &wx, "ix", "wx", "output columns"}}) {
    TORCH_CHECK(index->scalar_type() == at::kInt, "crop_patch_rows: ", index_name, " must be int32, got ",
                index->scalar_type());
    TORCH_CHECK(index->dim() == 2 && index->size(1) >= 1, "crop_patch_rows: ", index_name, " must be (", axis,
                ", taps >= 1), got ", index->sizes());
    TORCH_CHECK(weight->scalar_type() == at::kFloat, "crop_patch_rows: ", weight_name, " must be float32, got ",
                weight->scalar_type());
    TORCH_CHECK(weight->sizes() == index->sizes(), "crop_patch_rows: ", weight_name, " must have ", index_name,
                "'s shape ", index->sizes(), ", got ", weight->sizes());
    check_same_device("crop_patch_rows", *index, index_name, image, "image");
    check_same_device("crop_patch_rows", *weight, weight_name, image, "image");
  }
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&std, "std"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == 3, "crop_patch_rows: ", name,
                " must be float32 of shape (3,), got ", t->scalar_type(), " of shape ", t->sizes());
    check_same_device("crop_patch_rows", *t, name, image, "image");
  }
  const int64_t block = patch_size * merge_size;
  const int64_t out_h = iy.size(0), out_w = ix.size(0);
  TORCH_CHECK(out_h % block == 0 && out_w % block == 0, "crop_patch_rows: the output size ", out_h, "x", out_w,
              " (rows of iy x rows of ix) must be a multiple of patch_size * merge_size = ", block);
  return (out_h / patch_size) * (out_w / patch_size);
}

namespace {

// ---------------------------------------------------------------------------------------------
// kv_splice

template <typename in_t, typename cache_t>
void kv_splice_cpu_kernel(const SpliceInputs& in, at::Tensor& k_cache, at::Tensor& v_cache) {
  // Computed in opmath (float for half/bfloat16) and rounded once into the cache. For float
  // inputs this is the reference's arithmetic step for step: each product and the sum are
  // rounded separately (the extension is built with -ffp-contract=off, so no fused multiply-add).
  using acc_t = at::opmath_type<in_t>;
  const at::Tensor &k = in.k, &v = in.v;
  const bool rotate = in.cos.defined();
  const int64_t tokens = k.size(0), heads = k.size(1), dim = k.size(2), half = dim / 2;
  const int64_t k_tok = k.stride(0), k_head = k.stride(1), v_tok = v.stride(0), v_head = v.stride(1);
  const in_t* k_ptr = k.const_data_ptr<in_t>();
  const in_t* v_ptr = v.const_data_ptr<in_t>();
  const in_t* cos_ptr = rotate ? in.cos.const_data_ptr<in_t>() : nullptr;
  const in_t* sin_ptr = rotate ? in.sin.const_data_ptr<in_t>() : nullptr;
  const int64_t cos_row = rotate ? in.cos.stride(0) : 0, sin_row = rotate ? in.sin.stride(0) : 0;
  const int64_t* slots = in.slots.const_data_ptr<int64_t>();
  cache_t* kc = k_cache.mutable_data_ptr<cache_t>();
  cache_t* vc = v_cache.mutable_data_ptr<cache_t>();

  auto copy_row = [](const in_t* src, cache_t* dst, int64_t n) {
    if constexpr (std::is_same_v<in_t, cache_t>) {
      std::memcpy(dst, src, n * sizeof(cache_t));
    } else {
      for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<cache_t>(static_cast<acc_t>(src[d]));
    }
  };

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, heads * dim));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      cache_t* k_dst = kc + slot * heads * dim;
      cache_t* v_dst = vc + slot * heads * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const in_t* k_src = k_ptr + t * k_tok + h * k_head;
        copy_row(v_ptr + t * v_tok + h * v_head, v_dst + h * dim, dim);
        if (!rotate) {
          copy_row(k_src, k_dst + h * dim, dim);
          continue;
        }
        // rotate-half: out[d] = k[d] cos[d] - k[d + D/2] sin[d],
        //              out[d + D/2] = k[d + D/2] cos[d + D/2] + k[d] sin[d + D/2]
        const in_t* c = cos_ptr + t * cos_row;
        const in_t* s = sin_ptr + t * sin_row;
        cache_t* out = k_dst + h * dim;
        for (int64_t d = 0; d < half; ++d) {
          const acc_t x1 = static_cast<acc_t>(k_src[d]), x2 = static_cast<acc_t>(k_src[d + half]);
          const acc_t lo = x1 * static_cast<acc_t>(c[d]) - x2 * static_cast<acc_t>(s[d]);
          const acc_t hi = x2 * static_cast<acc_t>(c[d + half]) + x1 * static_cast<acc_t>(s[d + half]);
          out[d] = static_cast<cache_t>(lo);
          out[d + half] = static_cast<cache_t>(hi);
        }
      }
    }
  });
}

void kv_splice_cpu(const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping, const std::optional<at::Tensor>& cos,
                   const std::optional<at::Tensor>& sin) {
  check_kv_splice(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin);
  if (slot_mapping.numel() == 0) return;
  const SpliceInputs in = prepare_kv_splice(k_new, v_new, slot_mapping, cos, sin);
  const int64_t* slots = in.slots.const_data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < in.slots.numel(); ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < capacity, "kv_splice: slot_mapping[", t, "] = ", slots[t],
                " is neither -1 (skip) nor a slot in [0, ", capacity, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.k.scalar_type(), "kv_splice_cpu", [&] {
    using in_t = scalar_t;
    VPT_DISPATCH_CACHE_TYPES(k_cache.scalar_type(), "kv_splice_cpu_cache",
                             [&] { kv_splice_cpu_kernel<in_t, scalar_t>(in, k_cache, v_cache); });
  });
}

// ---------------------------------------------------------------------------------------------
// crop_patch_rows

void check_table_range(const at::Tensor& index, int64_t limit, const char* name, const char* axis) {
  const int32_t* p = index.const_data_ptr<int32_t>();
  const auto [lo, hi] = std::minmax_element(p, p + index.numel());
  TORCH_CHECK(*lo >= 0 && *hi < limit, "crop_patch_rows: ", name, " holds source ", axis, " indices in [", *lo, ", ",
              *hi, "], outside the image's [0, ", limit, ")");
}

at::Tensor crop_patch_rows_cpu(const at::Tensor& image, const at::Tensor& iy, const at::Tensor& wy,
                               const at::Tensor& ix, const at::Tensor& wx, const at::Tensor& mean,
                               const at::Tensor& std, int64_t patch_size, int64_t merge_size, bool vertical_first) {
  const int64_t rows = check_crop_patch_rows(image, iy, wy, ix, wx, mean, std, patch_size, merge_size);
  const int64_t p = patch_size, pp = p * p;
  at::Tensor out = at::empty({rows, 3 * pp}, image.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const at::Tensor iy_c = iy.contiguous(), wy_c = wy.contiguous(), ix_c = ix.contiguous(), wx_c = wx.contiguous();
  const int64_t img_h = image.size(0), img_w = image.size(1);
  check_table_range(iy_c, img_h, "iy", "row");
  check_table_range(ix_c, img_w, "ix", "column");

  const uint8_t* img = image.const_data_ptr<uint8_t>();
  const int32_t* iy_p = iy_c.const_data_ptr<int32_t>();
  const int32_t* ix_p = ix_c.const_data_ptr<int32_t>();
  const float* wy_p = wy_c.const_data_ptr<float>();
  const float* wx_p = wx_c.const_data_ptr<float>();
  const int64_t ky = iy.size(1), kx = ix.size(1), grid_w = ix.size(0) / p;
  const at::Tensor mean_c = mean.contiguous(), std_c = std.contiguous();
  const float m[3] = {mean_c.const_data_ptr<float>()[0], mean_c.const_data_ptr<float>()[1],
                      mean_c.const_data_ptr<float>()[2]};
  const float sd[3] = {std_c.const_data_ptr<float>()[0], std_c.const_data_ptr<float>()[1],
                       std_c.const_data_ptr<float>()[2]};
  float* out_p = out.mutable_data_ptr<float>();

  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t patch_row, patch_col;
      qwen_patch_position(n, grid_w, merge_size, &patch_row, &patch_col);
      float* dst = out_p + n * 3 * pp;
      for (int64_t py = 0; py < p; ++py) {
        const int64_t y = patch_row * p + py;
        for (int64_t px = 0; px < p; ++px) {
          const int64_t x = patch_col * p + px;
          // Separable sampling in PIL's pass order (x then y, or y then x when vertical_first),
          // each pass rounded to an 8-bit level as PIL does.
          float acc[3] = {0.f, 0.f, 0.f};
          if (!vertical_first) {
            for (int64_t a = 0; a < ky; ++a) {
              const uint8_t* src_row = img + static_cast<int64_t>(iy_p[y * ky + a]) * img_w * 3;
              float row[3] = {0.f, 0.f, 0.f};
              for (int64_t b = 0; b < kx; ++b) {
                const uint8_t* pixel = src_row + static_cast<int64_t>(ix_p[x * kx + b]) * 3;
                const float w = wx_p[x * kx + b];
                for (int c = 0; c < 3; ++c) row[c] += w * static_cast<float>(pixel[c]);
              }
              const float w = wy_p[y * ky + a];
              for (int c = 0; c < 3; ++c) acc[c] += w * pil_round(row[c]);
            }
          } else {
            for (int64_t b = 0; b < kx; ++b) {
              const int64_t src_x = ix_p[x * kx + b];
              float col[3] = {0.f, 0.f, 0.f};
              for (int64_t a = 0; a < ky; ++a) {
                const uint8_t* pixel = img + (static_cast<int64_t>(iy_p[y * ky + a]) * img_w + src_x) * 3;
                const float w = wy_p[y * ky + a];
                for (int c = 0; c < 3; ++c) col[c] += w * static_cast<float>(pixel[c]);
              }
              const float w = wx_p[x * kx + b];
              for (int c = 0; c < 3; ++c) acc[c] += w * pil_round(col[c]);
            }
          }
          for (int c = 0; c < 3; ++c) dst[c * pp + py * p + px] = (pil_round(acc[c]) * (1.f / 255.f) - m[c]) / sd[c];
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace vpt_fast

TORCH_LIBRARY(vpt_fast_ext, m) {
  m.def(
      "kv_splice(Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "Tensor? cos, Tensor? sin) -> ()");
  m.def(
      "crop_patch_rows(Tensor image, Tensor iy, Tensor wy, Tensor ix, Tensor wx, Tensor mean, Tensor std, "
      "int patch_size, int merge_size, bool vertical_first=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(vpt_fast_ext, CPU, m) {
  m.impl("kv_splice", &vpt_fast::kv_splice_cpu);
  m.impl("crop_patch_rows", &vpt_fast::crop_patch_rows_cpu);
}

// The shape-only (fake) kernels are registered in Python (vpt_fast/_ext.py), where symbolic
// shapes work, for torch.compile tracing and the meta device.

// Importing the module (vpt_fast._C when built by setup.py, vpt_fast_ext when built on first
// use) runs the registrations above; the ops are then torch.ops.vpt_fast_ext.*.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "vpt_fast compiled kernels, registered as torch.ops.vpt_fast_ext";
}
