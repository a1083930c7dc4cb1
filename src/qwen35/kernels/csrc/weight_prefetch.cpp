// Reading the next layer's weights into the caches while Python runs this layer's small ops.
//
// Decoding one token reads every weight once, and only the matmuls read memory: between
// them (norms, the DeltaNet step, attention, Python) the memory bus idles. A background
// thread fills those gaps: the model names the weights it will need next (the next
// layer's), and the thread reads them, one load per cache line, into this core's L2 and
// the shared L3, where the matmul then finds them. It yields to the kernels: while any
// packed kernel runs it stops (the matmul threads need the cores and the bus), and picks
// up where it was when the kernel returns. A new request replaces the old one.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "weight_prefetch.h"

namespace qwen35_ggml {

std::atomic<int> g_kernels_running{0};
std::atomic<bool> g_reader_waiting{false};
std::mutex g_idle_mutex;
std::condition_variable g_idle;

void kernels_idle() {
  std::lock_guard<std::mutex> lock(g_idle_mutex);
  g_idle.notify_all();
}

namespace {

constexpr int64_t LINE = 64;
constexpr int64_t CHECK_EVERY = 4096;  // bytes read between looks at the kernels and the queue

class Prefetcher {
 public:
  Prefetcher() : thread_([this] { run(); }) { thread_.detach(); }

  void request(std::vector<std::pair<const uint8_t*, int64_t>> ranges) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_ = std::move(ranges);
      generation_.fetch_add(1);
    }
    wake_.notify_one();
  }

 private:
  void run() {
    uint64_t seen = 0;
    std::vector<std::pair<const uint8_t*, int64_t>> ranges;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        ranges = std::move(pending_);
      }
      read(ranges, seen);
    }
  }

  // Touch every line of the ranges, in order, until they are done or a newer request comes.
  void read(const std::vector<std::pair<const uint8_t*, int64_t>>& ranges, uint64_t mine) {
    uint64_t sink = 0;
    for (const auto& [start, length] : ranges) {
      for (int64_t offset = 0; offset < length; offset += CHECK_EVERY) {
        if (g_kernels_running.load(std::memory_order_relaxed) > 0) wait_for_kernels();
        if (generation_.load(std::memory_order_relaxed) != mine) return;
        const int64_t stop = std::min(length, offset + CHECK_EVERY);
        for (int64_t at = offset; at < stop; at += LINE) sink += start[at];
      }
    }
    sink_.fetch_add(sink, std::memory_order_relaxed);  // keeps the loads
  }

  // Sleep (off the core) until no kernel runs; the last kernel out wakes us.
  static void wait_for_kernels() {
    std::unique_lock<std::mutex> lock(g_idle_mutex);
    g_reader_waiting.store(true);
    g_idle.wait(lock, [] { return g_kernels_running.load() == 0; });
    g_reader_waiting.store(false);
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::pair<const uint8_t*, int64_t>> pending_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> sink_{0};
  std::thread thread_;
};

Prefetcher& prefetcher() {
  static Prefetcher* instance = new Prefetcher();  // never destroyed: its thread runs until exit
  return *instance;
}

// Read `tensors` (CPU, contiguous) into the caches in the background, at most `budget` bytes.
void prefetch_weights(at::TensorList tensors, int64_t budget) {
  std::vector<std::pair<const uint8_t*, int64_t>> ranges;
  for (const at::Tensor& t : tensors) {
    if (budget <= 0) break;
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "prefetch: tensors must be contiguous CPU tensors");
    const int64_t length = std::min<int64_t>(budget, t.numel() * t.element_size());
    ranges.emplace_back(static_cast<const uint8_t*>(t.data_ptr()), length);
    budget -= length;
  }
  prefetcher().request(std::move(ranges));
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("prefetch_weights(Tensor[] tensors, int budget) -> ()", &qwen35_ggml::prefetch_weights);
}
