// The kernels' side of weight_prefetch.cpp: a count of packed kernels running, which the
// background reader waits on (it stays off the cores and the bus while they work).
#pragma once
#include <atomic>

namespace qwen35_ggml {

extern std::atomic<int> g_kernels_running;
extern std::atomic<bool> g_reader_waiting;
void kernels_idle();  // wakes the reader

// Held for the duration of a kernel call.
struct KernelRunning {
  KernelRunning() { g_kernels_running.fetch_add(1); }
  ~KernelRunning() {
    if (g_kernels_running.fetch_sub(1) == 1 && g_reader_waiting.load()) kernels_idle();
  }
  KernelRunning(const KernelRunning&) = delete;
  KernelRunning& operator=(const KernelRunning&) = delete;
};

}  // namespace qwen35_ggml
