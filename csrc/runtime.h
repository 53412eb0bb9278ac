// The CUDA runtime as the kernels and bindings see it: the real one, or (LEGO_EMULATE) the CPU emulator in
// emu/cuda_emu.h that runs the same kernel source on the host so CI can test it without a GPU.
//
// Also the host-side helpers every launcher needs: turning a cudaError_t into a C++ exception (which pybind11
// raises as a Python RuntimeError) and a device guard that fails cleanly when there is no GPU or no driver.
#pragma once

#ifdef LEGO_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
// Inside a .cu file: launch `kernel` (a function pointer to a __global__ function) on `stream`.
#define LEGO_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
// Dynamic shared memory as an array of T, 16-byte aligned.
#define LEGO_DYNAMIC_SMEM(T, name)                               \
  extern __shared__ __align__(16) unsigned char lego_smem_raw[]; \
  T* name = reinterpret_cast<T*>(lego_smem_raw)
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lego {

// Throws std::runtime_error("<what>: <CUDA error name>: <description>") when err is not cudaSuccess, after clearing
// the runtime's last-error slot so that a later, unrelated call does not report this error again.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  std::string msg = std::string("lego_kernels._C: ") + what + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    msg += " (this machine has no usable NVIDIA GPU/driver; use backend=\"triton\" or \"torch\")";
  }
  throw std::runtime_error(msg);
}

// Makes `device` current for the lifetime of the guard and restores the previous device afterwards. Raises a clean
// error (instead of launching into nothing) when there is no GPU, no driver, or no such device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), "cannot use CUDA");
    if (device < 0 || device >= count) {
      throw std::runtime_error("lego_kernels._C: CUDA device " + std::to_string(device) + " does not exist (" +
                               std::to_string(count) + " device(s) visible)");
    }
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Raises if the last launch failed (bad configuration, missing kernel image for this GPU, ...).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace lego
