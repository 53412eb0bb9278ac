// Python bindings of the CUDA kernels: module lego_kernels._C.
//
// The functions take raw device pointers (int, from torch.Tensor.data_ptr()), sizes, a dtype code (DTYPE_FP32,
// DTYPE_FP16, DTYPE_BF16), the CUDA device index and the stream handle (torch.cuda.current_stream().cuda_stream), so
// the module needs no PyTorch to build or import. Use them through lego_kernels/_cuda.py, which allocates the outputs
// and checks devices, dtypes and layouts; this file checks what it can see (sizes, codes, null pointers, alignment) and
// raises ValueError with the reason. CUDA failures, including "no GPU" and "no driver", raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "launchers.h"
#include "runtime.h"

namespace py = pybind11;

namespace {

#ifndef LEGO_MODULE_NAME
#define LEGO_MODULE_NAME _C
#endif
#ifndef LEGO_CUDA_ARCHS
#define LEGO_CUDA_ARCHS "unknown"
#endif

using Ptr = std::uintptr_t;

[[noreturn]] void bad(const std::string& op, const std::string& why) { throw py::value_error(op + ": " + why); }

void check_dtype(const std::string& op, int dtype) {
  if (dtype != lego::kFloat32 && dtype != lego::kFloat16 && dtype != lego::kBFloat16)
    bad(op, "dtype code " + std::to_string(dtype) + " is not one of DTYPE_FP32 (0), DTYPE_FP16 (1), DTYPE_BF16 (2)");
}

void check_ptrs(const std::string& op, std::initializer_list<std::pair<const char*, Ptr>> ptrs) {
  for (const auto& [name, p] : ptrs)
    if (p == 0) bad(op, std::string(name) + " is a null pointer");
}

void check_adaln_sizes(const std::string& op, int64_t N, int64_t S, int64_t d, int64_t B, Ptr image_index) {
  if (N < 0 || S < 1 || d < 1 || B < 1)
    bad(op, "sizes must be N >= 0, S >= 1, d >= 1, B >= 1; got N=" + std::to_string(N) + " S=" + std::to_string(S) +
                " d=" + std::to_string(d) + " B=" + std::to_string(B));
  if (d > lego::kAdalnMaxWidth)
    bad(op, "hidden size d=" + std::to_string(d) + " exceeds the kernel's maximum " +
                std::to_string(lego::kAdalnMaxWidth));
  if (image_index == 0 && N % B != 0)
    bad(op, "N=" + std::to_string(N) + " sequences do not split evenly over B=" + std::to_string(B) +
                " images; pass image_index");
}

void check_attention_sizes(const std::string& op, int64_t N, int64_t S, int64_t H, int64_t head_dim) {
  if (N < 0 || H < 1) bad(op, "sizes must be N >= 0 and H >= 1");
  if (S < 1 || S > lego::kShortAttentionMaxSeq)
    bad(op, "sequence length S=" + std::to_string(S) + " is outside 1.." +
                std::to_string(lego::kShortAttentionMaxSeq) + "; longer sequences go to SDPA");
  if (!lego::short_attention_supports_head_dim(head_dim)) {
    std::string dims;
    for (int dh : lego::kShortAttentionHeadDims) dims += (dims.empty() ? "" : ", ") + std::to_string(dh);
    bad(op, "no kernel for head size " + std::to_string(head_dim) + "; compiled head sizes: " + dims);
  }
}

void check_aligned16(const std::string& op, std::initializer_list<std::pair<const char*, Ptr>> ptrs) {
  for (const auto& [name, p] : ptrs)
    if (p % 16 != 0) bad(op, std::string(name) + " is not 16-byte aligned (pass a fresh contiguous tensor)");
}

template <typename P>
P as(Ptr p) {
  return reinterpret_cast<P>(p);
}

cudaStream_t as_stream(Ptr s) { return reinterpret_cast<cudaStream_t>(s); }

void adaln_modulate_fwd(Ptr x, Ptr shift, Ptr scale, Ptr image_index, Ptr y, Ptr mean, Ptr rstd, int64_t N, int64_t S,
                        int64_t d, int64_t B, int dtype, int device, Ptr stream) {
  const std::string op = "adaln_modulate_fwd";
  check_dtype(op, dtype);
  check_adaln_sizes(op, N, S, d, B, image_index);
  check_ptrs(op, {{"x", x}, {"shift", shift}, {"scale", scale}, {"y", y}, {"mean", mean}, {"rstd", rstd}});
  lego::DeviceGuard guard(device);
  lego::adaln_forward(dtype, false, as<const void*>(x), nullptr, nullptr, as<const void*>(shift),
                      as<const void*>(scale), as<const int64_t*>(image_index), nullptr, as<void*>(y), as<float*>(mean),
                      as<float*>(rstd), N, S, d, B, as_stream(stream));
}

void adaln_modulate_bwd(Ptr dy, Ptr x, Ptr scale, Ptr image_index, Ptr mean, Ptr rstd, Ptr dx, Ptr dshift, Ptr dscale,
                        Ptr workspace, int64_t N, int64_t S, int64_t d, int64_t B, int dtype, int device, Ptr stream) {
  const std::string op = "adaln_modulate_bwd";
  check_dtype(op, dtype);
  check_adaln_sizes(op, N, S, d, B, image_index);
  check_ptrs(op, {{"dy", dy},
                  {"x", x},
                  {"scale", scale},
                  {"mean", mean},
                  {"rstd", rstd},
                  {"dx", dx},
                  {"dshift", dshift},
                  {"dscale", dscale},
                  {"workspace", workspace}});
  lego::DeviceGuard guard(device);
  lego::adaln_backward(dtype, false, as<const void*>(dy), nullptr, as<const void*>(x), nullptr, nullptr,
                       as<const void*>(scale), as<const int64_t*>(image_index), as<const float*>(mean),
                       as<const float*>(rstd), as<void*>(dx), nullptr, nullptr, as<void*>(dshift), as<void*>(dscale),
                       as<float*>(workspace), N, S, d, B, as_stream(stream));
}

void gated_residual_adaln_fwd(Ptr x, Ptr y, Ptr gate, Ptr shift, Ptr scale, Ptr image_index, Ptr x_out, Ptr h,
                              Ptr mean, Ptr rstd, int64_t N, int64_t S, int64_t d, int64_t B, int dtype, int device,
                              Ptr stream) {
  const std::string op = "gated_residual_adaln_fwd";
  check_dtype(op, dtype);
  check_adaln_sizes(op, N, S, d, B, image_index);
  check_ptrs(op, {{"x", x},
                  {"y", y},
                  {"gate", gate},
                  {"shift", shift},
                  {"scale", scale},
                  {"x_out", x_out},
                  {"h", h},
                  {"mean", mean},
                  {"rstd", rstd}});
  lego::DeviceGuard guard(device);
  lego::adaln_forward(dtype, true, as<const void*>(x), as<const void*>(y), as<const void*>(gate),
                      as<const void*>(shift), as<const void*>(scale), as<const int64_t*>(image_index),
                      as<void*>(x_out), as<void*>(h), as<float*>(mean), as<float*>(rstd), N, S, d, B,
                      as_stream(stream));
}

void gated_residual_adaln_bwd(Ptr dx_out, Ptr dh, Ptr x_out, Ptr y, Ptr gate, Ptr scale, Ptr image_index, Ptr mean,
                              Ptr rstd, Ptr dx, Ptr dy, Ptr dgate, Ptr dshift, Ptr dscale, Ptr workspace, int64_t N,
                              int64_t S, int64_t d, int64_t B, int dtype, int device, Ptr stream) {
  const std::string op = "gated_residual_adaln_bwd";
  check_dtype(op, dtype);
  check_adaln_sizes(op, N, S, d, B, image_index);
  check_ptrs(op, {{"dx_out", dx_out},
                  {"dh", dh},
                  {"x_out", x_out},
                  {"y", y},
                  {"gate", gate},
                  {"scale", scale},
                  {"mean", mean},
                  {"rstd", rstd},
                  {"dx", dx},
                  {"dy", dy},
                  {"dgate", dgate},
                  {"dshift", dshift},
                  {"dscale", dscale},
                  {"workspace", workspace}});
  lego::DeviceGuard guard(device);
  lego::adaln_backward(dtype, true, as<const void*>(dh), as<const void*>(dx_out), as<const void*>(x_out),
                       as<const void*>(y), as<const void*>(gate), as<const void*>(scale),
                       as<const int64_t*>(image_index), as<const float*>(mean), as<const float*>(rstd), as<void*>(dx),
                       as<void*>(dy), as<void*>(dgate), as<void*>(dshift), as<void*>(dscale), as<float*>(workspace), N,
                       S, d, B, as_stream(stream));
}

void short_attention_fwd(Ptr qkv, Ptr o, Ptr lse, int64_t N, int64_t S, int64_t H, int64_t head_dim, int dtype,
                         int device, Ptr stream) {
  const std::string op = "short_attention_fwd";
  check_dtype(op, dtype);
  check_attention_sizes(op, N, S, H, head_dim);
  check_ptrs(op, {{"qkv", qkv}, {"o", o}, {"lse", lse}});
  check_aligned16(op, {{"qkv", qkv}, {"o", o}});
  lego::DeviceGuard guard(device);
  lego::short_attention_forward(dtype, as<const void*>(qkv), as<void*>(o), as<float*>(lse), N, S, H, head_dim,
                                as_stream(stream));
}

void short_attention_bwd(Ptr dout, Ptr qkv, Ptr o, Ptr lse, Ptr dqkv, int64_t N, int64_t S, int64_t H, int64_t head_dim,
                         int dtype, int device, Ptr stream) {
  const std::string op = "short_attention_bwd";
  check_dtype(op, dtype);
  check_attention_sizes(op, N, S, H, head_dim);
  check_ptrs(op, {{"do", dout}, {"qkv", qkv}, {"o", o}, {"lse", lse}, {"dqkv", dqkv}});
  check_aligned16(op, {{"do", dout}, {"qkv", qkv}, {"o", o}, {"dqkv", dqkv}});
  lego::DeviceGuard guard(device);
  lego::short_attention_backward(dtype, as<const void*>(dout), as<const void*>(qkv), as<const void*>(o),
                                 as<const float*>(lse), as<void*>(dqkv), N, S, H, head_dim, as_stream(stream));
}

// Number of visible CUDA devices; 0 when there is no GPU or no driver (never raises).
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

// A human-readable account of why CUDA can or cannot be used here.
py::dict cuda_status() {
  py::dict out;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  int runtime = 0, driver = 0;
  (void)cudaRuntimeGetVersion(&runtime);
  (void)cudaDriverGetVersion(&driver);
  out["device_count"] = err == cudaSuccess ? count : 0;
  out["error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  out["runtime_version"] = runtime;
  out["driver_version"] = driver;
  out["archs"] = std::string(LEGO_CUDA_ARCHS);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return out;
}

}  // namespace


PYBIND11_MODULE(LEGO_MODULE_NAME, m) {
  m.doc() =
      "CUDA kernels of lego_kernels (csrc/): short attention and adaLN, forward and backward. Low level: raw device "
      "pointers, sizes, dtype code, device, stream. Use lego_kernels._cuda, which wraps these for torch tensors.";
  m.attr("DTYPE_FP32") = static_cast<int>(lego::kFloat32);
  m.attr("DTYPE_FP16") = static_cast<int>(lego::kFloat16);
  m.attr("DTYPE_BF16") = static_cast<int>(lego::kBFloat16);
  m.attr("SHORT_ATTENTION_MAX_SEQ") = lego::kShortAttentionMaxSeq;
  m.attr("SHORT_ATTENTION_HEAD_DIMS") =
      std::vector<int>(std::begin(lego::kShortAttentionHeadDims), std::end(lego::kShortAttentionHeadDims));
  m.attr("ADALN_MAX_WIDTH") = lego::kAdalnMaxWidth;
  m.attr("ADALN_BACKWARD_MAX_BLOCKS") = lego::kAdalnBackwardMaxBlocks;
#ifdef LEGO_EMULATE
  m.attr("EMULATED") = true;
#else
  m.attr("EMULATED") = false;
#endif

  m.def("device_count", &device_count, "Visible CUDA devices; 0 without a GPU or driver (never raises).");
  m.def("cuda_status", &cuda_status,
        "dict: device_count, error (empty when CUDA works), runtime_version, driver_version, archs (compiled for).");

  auto release = py::call_guard<py::gil_scoped_release>();
  m.def("adaln_modulate_fwd", &adaln_modulate_fwd, release,
        "y = LN(x) * (1 + scale[b]) + shift[b]; also writes mean, rstd (fp32 [N*S]).", py::arg("x"), py::arg("shift"),
        py::arg("scale"), py::arg("image_index"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("N"),
        py::arg("S"), py::arg("d"), py::arg("B"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("adaln_modulate_bwd", &adaln_modulate_bwd, release,
        "dx, dshift, dscale of adaln_modulate; image_order: int64 [2, N] (image_index sorted, then the sorted "
        "sequences) or 0; workspace: fp32 [2, ADALN_BACKWARD_MAX_BLOCKS + B, d] scratch.",
        py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("image_order"), py::arg("mean"), py::arg("rstd"),
        py::arg("dx"), py::arg("dshift"),
        py::arg("dscale"), py::arg("workspace"), py::arg("N"), py::arg("S"), py::arg("d"), py::arg("B"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("gated_residual_adaln_fwd", &gated_residual_adaln_fwd, release,
        "x_out = x + gate[b] * y; h = adaln_modulate(x_out); also writes mean, rstd of x_out.", py::arg("x"),
        py::arg("y"), py::arg("gate"), py::arg("shift"), py::arg("scale"), py::arg("image_index"), py::arg("x_out"),
        py::arg("h"), py::arg("mean"), py::arg("rstd"), py::arg("N"), py::arg("S"), py::arg("d"), py::arg("B"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("gated_residual_adaln_bwd", &gated_residual_adaln_bwd, release,
        "dx, dy, dgate, dshift, dscale of gated_residual_adaln; image_order: as adaln_modulate_bwd's; workspace: "
        "fp32 [3, ADALN_BACKWARD_MAX_BLOCKS + B, d] scratch.",
        py::arg("dx_out"), py::arg("dh"), py::arg("x_out"), py::arg("y"), py::arg("gate"), py::arg("scale"),
        py::arg("image_order"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dy"), py::arg("dgate"), py::arg("dshift"),
        py::arg("dscale"), py::arg("workspace"), py::arg("N"), py::arg("S"), py::arg("d"), py::arg("B"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("short_attention_fwd", &short_attention_fwd, release,
        "o [N,S,H*D] and lse fp32 [N,H,S] of softmax(q k^T / sqrt(D)) v for qkv [N,S,3*H*D], S <= 16.", py::arg("qkv"),
        py::arg("o"), py::arg("lse"), py::arg("N"), py::arg("S"), py::arg("H"), py::arg("head_dim"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));
  m.def("short_attention_bwd", &short_attention_bwd, release, "dqkv [N,S,3*H*D] from do, qkv, o, lse.", py::arg("do"),
        py::arg("qkv"), py::arg("o"), py::arg("lse"), py::arg("dqkv"), py::arg("N"), py::arg("S"), py::arg("H"),
        py::arg("head_dim"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
}
