// The cost of the latency lab's hot-path operations, each next to a baseline measured in the same run:
//
//   empty loop (baseline)          reading the next value from the pre-generated array, nothing else
//   LatencyHistogram::Record       the same loop recording the value
//   HopBreakdown::Add              one traced sample (7 hops) per iteration
//   relaxed atomic add (baseline)  std::atomic<uint64_t>::fetch_add(1, relaxed)
//   metrics counter Increment      CounterHandle::Increment (prometheus-cpp: CAS loop on an atomic double)
//   metrics histogram Observe      LatencyHistogramHandle::ObserveNanos (prometheus-cpp: takes a mutex)
//   MonotonicNanos                 one trace timestamp (vDSO clock_gettime)
//
// Values are log-normal latencies (median 20 µs). Each operation runs `--repeats` times, interleaved with the others
// so that machine noise hits all alike; the table shows the median ns/op. The binary replaces operator new to count
// heap allocations inside the timed loops: Record and Add must make none.
//
//   bench_lab [--iterations 5000000] [--repeats 5] [--json FILE]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "tests/support/alloc_counter.h"
#include "common/clock.h"
#include "lab/hop_breakdown.h"
#include "lab/latency_histogram.h"
#include "lab/metrics.h"

// Allocations are counted by tests/support/alloc_counter (it replaces the global operator new).

namespace aggvm::lab {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "bench_lab: %s\n", what.c_str());
  std::exit(1);
}

struct Op {
  std::string name;
  std::string baseline;  // the name of the baseline op it is compared with ("" for a baseline)
  std::function<void(uint64_t iterations)> run;
  std::vector<double> ns_per_op;
  uint64_t allocations = 0;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int Main(int argc, char** argv) {
  CLI::App app{"bench_lab: cost of LatencyHistogram recording and metrics increments vs baselines"};
  uint64_t iterations = 5'000'000;
  int repeats = 5;
  std::string json_path;
  app.add_option("--iterations", iterations, "operations per timed loop")->capture_default_str();
  app.add_option("--repeats", repeats, "timed loops per operation (median reported)")->capture_default_str();
  app.add_option("--json", json_path, "also write the results as JSON to FILE");
  CLI11_PARSE(app, argc, argv);
  if (iterations == 0 || repeats <= 0) Die("--iterations and --repeats must be > 0");

  // Pre-generated values, indexed with a mask so the loop body stays tiny.
  constexpr size_t kValues = 1 << 14;
  std::vector<uint64_t> values(kValues);
  std::mt19937_64 rng(42);
  std::lognormal_distribution<double> lat(std::log(20'000.0), 1.0);
  for (auto& v : values) v = static_cast<uint64_t>(std::max(1.0, lat(rng)));
  std::vector<transport::TraceBlock> traces(kValues);
  for (size_t i = 0; i < kValues; ++i) {
    auto& t = traces[i];
    t.raised = 1'000'000'000 + i * 1'000'000;
    t.local_controller = t.raised + values[i] / 8;
    t.master_received = t.local_controller + values[(i + 1) % kValues];
    t.master_decided = t.master_received + values[(i + 2) % kValues] / 16;
    t.target_received = t.master_decided + values[(i + 3) % kValues];
    t.injected = t.target_received + values[(i + 4) % kValues] / 4;
  }

  LatencyHistogram histogram;
  HopBreakdown breakdown;
  std::atomic<uint64_t> plain{0};
  MetricsRegistry registry;
  auto counter = registry.Counter("aggvm_bench_total", "bench counter", {{"node", "1"}});
  auto observed = registry.LatencyHistogram("aggvm_bench_latency_seconds", "bench histogram", {{"hop", "e2e"}});
  if (!counter.ok() || !observed.ok()) Die("cannot create metrics");
  const CounterHandle c = *counter;
  const LatencyHistogramHandle h = *observed;
  const uint64_t* vals = values.data();

  std::vector<Op> ops;
  auto add = [&ops](std::string name, std::string baseline, std::function<void(uint64_t)> run) {
    Op op;
    op.name = std::move(name);
    op.baseline = std::move(baseline);
    op.run = std::move(run);
    ops.push_back(std::move(op));
  };
  add("empty loop", "", [&](uint64_t n) {
                   for (uint64_t i = 0; i < n; ++i) {
                     uint64_t v = vals[i & (kValues - 1)];
                     asm volatile("" : "+r"(v));  // keep the load, do nothing with it
                   }
                 });
  add("LatencyHistogram::Record", "empty loop", [&](uint64_t n) {
                   for (uint64_t i = 0; i < n; ++i) histogram.Record(vals[i & (kValues - 1)]);
                 });
  add("HopBreakdown::Add (7 hops)", "empty loop", [&](uint64_t n) {
                   for (uint64_t i = 0; i < n; ++i) breakdown.Add(traces[i & (kValues - 1)]);
                 });
  add("relaxed atomic add", "", [&](uint64_t n) {
                   for (uint64_t i = 0; i < n; ++i) plain.fetch_add(1, std::memory_order_relaxed);
                 });
  add("metrics counter Increment", "relaxed atomic add", [&](uint64_t n) {
                   for (uint64_t i = 0; i < n; ++i) c.Increment();
                 });
  add("metrics histogram ObserveNanos", "relaxed atomic add", [&](uint64_t n) {
                   for (uint64_t i = 0; i < n; ++i) h.ObserveNanos(vals[i & (kValues - 1)]);
                 });
  add("MonotonicNanos (one trace stamp)", "empty loop", [&](uint64_t n) {
                   for (uint64_t i = 0; i < n; ++i) {
                     uint64_t t = MonotonicNanos();
                     asm volatile("" : "+r"(t));
                   }
                 });

  for (auto& op : ops) op.run(iterations / 10);  // warm up (page in the buckets, resolve PLT entries)
  for (int r = 0; r < repeats; ++r) {
    for (auto& op : ops) {
      const uint64_t a0 = ::aggvm::testing::ProcessAllocations();
      const auto t0 = std::chrono::steady_clock::now();
      op.run(iterations);
      const auto t1 = std::chrono::steady_clock::now();
      op.allocations += ::aggvm::testing::ProcessAllocations() - a0;
      op.ns_per_op.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() /
                             static_cast<double>(iterations));
    }
  }
  // Sanity: the work was done.
  if (histogram.count() == 0 || breakdown.samples() == 0 || c.value() <= 0) Die("the timed loops did nothing");

  std::printf("bench_lab: %llu iterations x %d repeats (median ns/op)\n",
              static_cast<unsigned long long>(iterations), repeats);
  std::printf("  %-34s %10s %10s %12s %12s\n", "operation", "ns/op", "min", "vs baseline", "allocations");
  nlohmann::json out = nlohmann::json::array();
  for (const auto& op : ops) {
    const double med = Median(op.ns_per_op);
    const double min = *std::min_element(op.ns_per_op.begin(), op.ns_per_op.end());
    double base = 0;
    for (const auto& b : ops) {
      if (b.name == op.baseline) base = Median(b.ns_per_op);
    }
    const std::string vs = op.baseline.empty() ? "(baseline)" : fmt::format("+{:.2f} ns", med - base);
    std::printf("  %-34s %10.2f %10.2f %12s %12llu\n", op.name.c_str(), med, min, vs.c_str(),
                static_cast<unsigned long long>(op.allocations));
    out.push_back({{"operation", op.name},
                   {"baseline", op.baseline},
                   {"ns_per_op_median", med},
                   {"ns_per_op_min", min},
                   {"ns_per_op_over_baseline", op.baseline.empty() ? 0.0 : med - base},
                   {"allocations", op.allocations},
                   {"samples", op.ns_per_op}});
  }
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << nlohmann::json{{"bench", "lab"}, {"iterations", iterations}, {"repeats", repeats}, {"results", out}}.dump(2)
      << "\n";
    if (!f) Die("cannot write " + json_path);
  }
  return 0;
}

}  // namespace
}  // namespace aggvm::lab

int main(int argc, char** argv) { return aggvm::lab::Main(argc, argv); }
