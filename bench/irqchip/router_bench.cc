// Router decisions per second on one core.
//
// Scenarios over an N-vCPU x2APIC VM (default 64, spread over 4 nodes):
//   fixed-physical         fixed delivery, physical destination = one random APIC ID
//   x2apic-logical-cluster fixed delivery, x2APIC logical destination: a random cluster and member bitmap
//   lowest-priority-N      lowest-priority delivery to all N vCPUs (physical broadcast), random priorities, once
//                          per policy (sdm, round-robin, node-local-first)
// Each scenario is measured for Router::Route and, in the same run, for a naive reference (a scan of every vCPU with
// MatchesDestination and a minimum-priority pick) as the baseline. The binary replaces the global operator new to
// count heap allocations inside the timed loops: the Router's must be 0.
//
// Usage: bench_irqchip_router [--vcpus 64] [--seconds 0.3] [--repeats 5] [--json FILE]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <new>
#include <random>
#include <string>
#include <ctime>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "tests/support/alloc_counter.h"
#include "irqchip/destination.h"
#include "irqchip/router.h"

// Allocations are counted by tests/support/alloc_counter (it replaces the global operator new).

namespace {

using namespace aggvm;
using namespace aggvm::irqchip;
using Clock = std::chrono::steady_clock;

double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

constexpr size_t kRequests = 4096;  // pre-generated, cycled (power of two)

struct Scenario {
  std::string name;
  RoutingPolicy policy;
  std::vector<InterruptRequest> requests;
};

struct Measurement {
  double decisions_per_s = 0;       // per CPU-second of the measuring thread
  double wall_decisions_per_s = 0;  // per wall-clock second (lower when the machine is shared)
  double ns_per_decision = 0;
  double deliveries_per_decision = 0;
  uint64_t allocations = 0;
};

// Runs `decide(request) -> deliveries` over the request ring for about `seconds` of this thread's CPU time,
// `repeats` times; returns the median run. Rates are per second of CPU time of the one core running the loop
// (CLOCK_THREAD_CPUTIME_ID), so that other processes sharing the machine do not dilute them; the wall-clock rate is
// reported too. Allocations are counted over all timed loops.
template <typename Decide>
Measurement Measure(const std::vector<InterruptRequest>& reqs, double seconds, int repeats, Decide&& decide) {
  std::vector<double> rates, wall_rates;
  uint64_t allocs = 0;
  uint64_t delivered = 0, decided = 0;
  for (int r = 0; r < repeats; ++r) {
    uint64_t n = 0;
    const uint64_t a0 = ::aggvm::testing::ProcessAllocations();
    const auto w0 = Clock::now();
    const double c0 = ThreadCpuSeconds();
    double c = c0;
    do {
      for (int k = 0; k < 16384; ++k, ++n) delivered += decide(reqs[n & (kRequests - 1)]);
      c = ThreadCpuSeconds();
    } while (c - c0 < seconds);
    const double wall = std::chrono::duration<double>(Clock::now() - w0).count();
    allocs += ::aggvm::testing::ProcessAllocations() - a0;
    decided += n;
    rates.push_back(static_cast<double>(n) / (c - c0));
    wall_rates.push_back(static_cast<double>(n) / wall);
  }
  std::sort(rates.begin(), rates.end());
  std::sort(wall_rates.begin(), wall_rates.end());
  Measurement m;
  m.decisions_per_s = rates[rates.size() / 2];
  m.wall_decisions_per_s = wall_rates[wall_rates.size() / 2];
  m.ns_per_decision = 1e9 / m.decisions_per_s;
  m.deliveries_per_decision = static_cast<double>(delivered) / static_cast<double>(decided);
  m.allocations = allocs;
  return m;
}

// The baseline: what a straightforward implementation does -- test every vCPU against the SDM rules.
uint32_t NaiveRoute(const std::vector<VcpuInfo>& vcpus, const InterruptRequest& req, std::vector<Delivery>& out) {
  const InterruptMessage& m = req.message;
  uint32_t count = 0;
  int best = -1;
  for (uint32_t i = 0; i < vcpus.size(); ++i) {
    if (!vcpus[i].apic.enabled || !MatchesDestination(m, vcpus[i].apic)) continue;
    if (IsArbitrated(m)) {
      if (best < 0 || vcpus[i].priority < vcpus[static_cast<uint32_t>(best)].priority) best = static_cast<int>(i);
    } else {
      out[count++] = Delivery{VcpuIndex(i), vcpus[i].node};
    }
  }
  if (best >= 0) out[count++] = Delivery{VcpuIndex(static_cast<uint32_t>(best)), vcpus[static_cast<uint32_t>(best)].node};
  return count;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Router decisions per second (aggvm irqchip)"};
  uint32_t nvcpus = 64;
  double seconds = 0.3;
  int repeats = 5;
  std::string json_path;
  app.add_option("--vcpus", nvcpus, "vCPUs in the VM (x2APIC IDs 0..N-1, 4 nodes)")->check(CLI::Range(1u, 1024u));
  app.add_option("--seconds", seconds, "seconds per timed run")->check(CLI::PositiveNumber);
  app.add_option("--repeats", repeats, "timed runs per measurement (median reported)")->check(CLI::Range(1, 100));
  app.add_option("--json", json_path, "write the results as JSON to FILE");
  CLI11_PARSE(app, argc, argv);

  std::mt19937_64 rng(0xA66D);
  std::vector<VcpuInfo> vcpus;
  for (uint32_t i = 0; i < nvcpus; ++i) {
    const ApicId id(i);
    vcpus.push_back(VcpuInfo{NodeId(static_cast<uint16_t>(i % 4)),
                             ApicAddressing{id, true, X2apicLdrFromId(id), kDfrFlat, true},
                             static_cast<uint8_t>((rng() % 4) << 4)});
  }
  auto base = [&](DeliveryMode mode, DestMode dm, uint32_t dest) {
    InterruptRequest r;
    r.source_node = NodeId(static_cast<uint16_t>(rng() % 4));
    r.message.vector = Vector(static_cast<uint8_t>(0x30 + rng() % 0xC0));
    r.message.mode = mode;
    r.message.dest_mode = dm;
    r.message.destination = dest;
    r.message.x2apic_destination = true;
    return r;
  };
  std::vector<Scenario> scenarios;
  {
    Scenario s{"fixed-physical", RoutingPolicy::kSdm, {}};
    for (size_t i = 0; i < kRequests; ++i) {
      s.requests.push_back(base(DeliveryMode::kFixed, DestMode::kPhysical, static_cast<uint32_t>(rng() % nvcpus)));
    }
    scenarios.push_back(std::move(s));
  }
  {
    Scenario s{"x2apic-logical-cluster", RoutingPolicy::kSdm, {}};
    const uint32_t clusters = (nvcpus + 15) / 16;
    for (size_t i = 0; i < kRequests; ++i) {
      const uint32_t cluster = static_cast<uint32_t>(rng() % clusters);
      const uint32_t members = static_cast<uint32_t>(rng() & 0xFFFF) | 1u;
      s.requests.push_back(base(DeliveryMode::kFixed, DestMode::kLogical, (cluster << 16) | members));
    }
    scenarios.push_back(std::move(s));
  }
  for (auto policy : {RoutingPolicy::kSdm, RoutingPolicy::kRoundRobin, RoutingPolicy::kNodeLocalFirst}) {
    Scenario s{"lowest-priority-" + std::to_string(nvcpus) + "/" + std::string(RoutingPolicyName(policy)), policy, {}};
    for (size_t i = 0; i < kRequests; ++i) {
      s.requests.push_back(base(DeliveryMode::kLowestPriority, DestMode::kPhysical, kX2apicBroadcast));
    }
    scenarios.push_back(std::move(s));
  }

  nlohmann::json results = nlohmann::json::array();
  std::printf("rates per CPU-second of one core (wall-clock rate in parentheses)\n");
  std::printf("%-36s %14s %8s %14s %9s %7s | %14s %8s %8s\n", "scenario", "router dec/s", "ns/dec", "(wall dec/s)",
              "deliv/dec", "allocs", "naive dec/s", "ns/dec", "speedup");
  volatile uint32_t sink = 0;
  bool goals_met = true;
  for (const Scenario& s : scenarios) {
    auto router_or = Router::Create(vcpus, RouterConfig{.policy = s.policy});
    if (!router_or.ok()) {
      std::fprintf(stderr, "router: %s\n", std::string(router_or.status().message()).c_str());
      return 1;
    }
    Router router = std::move(*router_or);
    std::vector<Delivery> out(nvcpus);
    const Measurement r = Measure(s.requests, seconds, repeats, [&](const InterruptRequest& q) {
      const RouteResult res = router.Route(q, out);
      if (res.count) sink = sink + out[0].vcpu.value();
      return res.count;
    });
    const Measurement b = Measure(s.requests, seconds, repeats, [&](const InterruptRequest& q) {
      const uint32_t c = NaiveRoute(vcpus, q, out);
      if (c) sink = sink + out[0].vcpu.value();
      return c;
    });
    std::printf("%-36s %14.0f %8.1f %14.0f %9.2f %7llu | %14.0f %8.1f %7.1fx\n", s.name.c_str(), r.decisions_per_s,
                r.ns_per_decision, r.wall_decisions_per_s, r.deliveries_per_decision,
                static_cast<unsigned long long>(r.allocations), b.decisions_per_s, b.ns_per_decision,
                r.decisions_per_s / b.decisions_per_s);
    double goal = 0;
    if (s.name == "fixed-physical") goal = 20e6;
    if (s.name.rfind("lowest-priority", 0) == 0 && s.policy == RoutingPolicy::kSdm) goal = 5e6;
    if (r.allocations != 0 || (goal > 0 && r.decisions_per_s < goal)) goals_met = false;
    results.push_back({{"scenario", s.name},
                       {"policy", std::string(RoutingPolicyName(s.policy))},
                       {"vcpus", nvcpus},
                       {"router", {{"decisions_per_cpu_s", r.decisions_per_s},
                                   {"decisions_per_wall_s", r.wall_decisions_per_s},
                                   {"ns_per_decision", r.ns_per_decision},
                                   {"deliveries_per_decision", r.deliveries_per_decision},
                                   {"allocations_in_loop", r.allocations}}},
                       {"baseline_naive_scan", {{"decisions_per_cpu_s", b.decisions_per_s},
                                                {"ns_per_decision", b.ns_per_decision}}},
                       {"goal_decisions_per_s", goal}});
  }
  std::printf("goals (>= 20 M/s fixed physical, >= 5 M/s lowest priority sdm, 0 allocations): %s\n",
              goals_met ? "met" : "NOT met");
  if (!json_path.empty()) {
    nlohmann::json doc = {{"benchmark", "irqchip_router"},
                          {"seconds_per_run", seconds},
                          {"repeats", repeats},
                          {"results", results},
                          {"goals_met", goals_met}};
    std::ofstream f(json_path);
    if (!f) {
      std::fprintf(stderr, "cannot write --json file %s\n", json_path.c_str());
      return 1;
    }
    f << doc.dump(2) << "\n";
  }
  return 0;
}
