// Cross-node guest IPI round trip of the distributed VM, per mode pair, next to its floor measured in the same run.
//
// aggvm-master and three aggvm-agents run as processes as scripts/cluster.sh starts them (root: each in its own network
// namespace on a veth bridge; else loopback with a note), tests/support/cluster_launcher.h. For each mode pair
// (kernel / user irqchip x via-master / direct route mode) one probe-guest VM of 3 nodes x 2 vCPUs runs ipi-pingpong
// between vCPU 0 on node-a (ping) and vCPU 3 on node-b (pong); the round trip is the guest's own rdtsc span of each
// PING_ROUND record (ping sends -> pong's handler answers -> ping's handler ran), converted with KVM_GET_TSC_KHZ.
//
// Hops one way: via-master node-a -> master -> node-b (2), direct node-a -> node-b (1). Floor, measured in the same
// run after the cluster stopped:
//   local IPI round trip (ipi-pingpong between two vCPUs of one local VM, same irqchip mode, guest rdtsc)
//   + 2 x TcpTransport one-way (64-byte frames, event wait mode, RTT / 2) x hops
// where the one-way is measured between the namespaces the hop joins (node-b <-> master, node-a <-> node-b), twice:
//   back to back  round trips one right after the other (each thread waits ~2 one-way latencies);
//   paced         one round trip per cross-node RTT of the mode pair (p50): in the cluster each data-plane thread
//                 sees one message per guest round and sleeps in epoll in between. The paced floor is like for like.
//
//   cluster_ipi_bench [--rounds 1000] [--warmup 20] [--floor-samples 2000] [--loopback] [--json FILE]
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench/cluster/cluster_floor.h"
#include "common/stats.h"
#include "tests/support/cluster_launcher.h"

namespace aggvm::bench {
namespace {

namespace v1 = ::aggvm::v1;

constexpr uint32_t kPingRound = 3;  // guest/abi.h AGGVM_REC_PING_ROUND: b = rdtsc before the IPI, c = answer handled
constexpr uint32_t kErrorRecord = 4;
constexpr uint32_t kPing = 0, kPong = 3;  // node-a, node-b


[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "cluster_ipi_bench: %s\n", what.c_str());
  std::exit(1);
}

struct ModePair {
  v1::IrqchipMode irqchip;
  v1::RouteMode route;
  std::string name() const {
    return fmt::format("{} / {}", irqchip == v1::IRQCHIP_MODE_USER ? "user" : "kernel",
                       route == v1::ROUTE_MODE_DIRECT ? "direct" : "via-master");
  }
  uint32_t hops() const { return route == v1::ROUTE_MODE_DIRECT ? 1 : 2; }
};

// One VM per mode pair: the PING_ROUND records' rdtsc spans in TSC ticks (after `warmup` rounds).
absl::StatusOr<std::vector<uint64_t>> MeasureCrossNode(testing::ClusterLauncher& cluster, const ModePair& m,
                                                       uint32_t rounds, uint32_t warmup) {
  const std::string vm = fmt::format("ipibench-{}-{}", m.irqchip == v1::IRQCHIP_MODE_USER ? "user" : "kernel",
                                     m.route == v1::ROUTE_MODE_DIRECT ? "direct" : "via-master");
  v1::VmSpec spec = testing::ClusterSpec(vm, "ipi-pingpong", m.irqchip);
  spec.set_memory_mib(64);
  spec.set_transport(v1::TRANSPORT_KIND_TCP);
  spec.set_route_mode(m.route);
  auto* w = spec.mutable_workload();
  w->set_iterations(rounds + warmup);
  w->set_ping_vcpu(kPing);
  w->set_pong_vcpu(kPong);
  w->set_ipi_vector(0x40);
  w->set_timeout_ms(10000);
  if (auto s = testing::CreateVm(cluster.stub(), spec); !s.ok()) {
    return absl::InternalError(fmt::format("CreateVm {}: {}", vm, s.error_message()));
  }
  testing::VmWatch watch(cluster.stub(), vm);
  auto s = testing::Lifecycle(cluster.stub(), "start", vm);
  if (!s.ok()) {
    (void)testing::Lifecycle(cluster.stub(), "stop", vm);
    return absl::InternalError(fmt::format("StartVm {}: {}", vm, s.error_message()));
  }
  const size_t want = rounds + warmup;
  watch.WaitFor([&] { return watch.count(kPingRound) >= want || watch.count(kErrorRecord) > 0 || StopRequested(); },
                absl::Seconds(120));
  (void)testing::Lifecycle(cluster.stub(), "stop", vm);
  if (auto errors = watch.records(kErrorRecord); !errors.empty()) {
    return absl::InternalError(fmt::format("{}: the guest reported error {} on vCPU {} ({})", vm, errors[0].a(),
                                           errors[0].vcpu(), watch.console(errors[0].vcpu())));
  }
  const auto recs = watch.records(kPingRound);
  if (recs.size() < want) {
    return absl::DeadlineExceededError(fmt::format("{}: {} of {} rounds within 120 s", vm, recs.size(), want));
  }
  std::vector<uint64_t> ticks;
  for (size_t i = warmup; i < want; ++i) {
    if (recs[i].c() > recs[i].b()) ticks.push_back(recs[i].c() - recs[i].b());
  }
  return ticks;
}

std::vector<double> ToUs(const std::vector<uint64_t>& ticks, uint64_t khz) {
  std::vector<double> us;
  us.reserve(ticks.size());
  for (uint64_t t : ticks) us.push_back(static_cast<double>(t) * 1000.0 / static_cast<double>(khz));
  return us;
}

int Main(int argc, char** argv) {
  CLI::App app{"cross-node guest IPI round trip (ipi-pingpong node-a <-> node-b) per mode pair vs its floor"};
  uint32_t rounds = 1000, warmup = 20;
  size_t floor_samples = 2000;
  bool loopback = false;
  std::string json_path;
  app.add_option("--rounds", rounds, "ping-pong rounds measured per mode pair (after --warmup)");
  app.add_option("--warmup", warmup, "rounds run first and not counted");
  app.add_option("--floor-samples", floor_samples, "transport round trips and local ping-pong rounds for the floor");
  app.add_flag("--loopback", loopback, "every process on 127.0.0.1 instead of network namespaces");
  app.add_option("--json", json_path, "write the results as JSON");
  CLI11_PARSE(app, argc, argv);
  auto bench = StartBenchCluster("ipibench", loopback);
  if (!bench.ok()) Die("cluster: " + bench.status().ToString());
  auto& cluster = bench->cluster;
  const std::string& network = bench->network;
  std::printf("cluster_ipi_bench: master + 3 agents (%s), 3 nodes x 2 vCPUs, tcp, event wait mode; ipi-pingpong "
              "vCPU %u @ node-a <-> vCPU %u @ node-b, %u rounds per mode pair\n",
              network == "netns" ? "each in its own network namespace, veth bridge" : "loopback", kPing, kPong,
              rounds);
  std::fflush(stdout);

  const std::vector<ModePair> modes = {{v1::IRQCHIP_MODE_KERNEL, v1::ROUTE_MODE_VIA_MASTER},
                                       {v1::IRQCHIP_MODE_KERNEL, v1::ROUTE_MODE_DIRECT},
                                       {v1::IRQCHIP_MODE_USER, v1::ROUTE_MODE_VIA_MASTER},
                                       {v1::IRQCHIP_MODE_USER, v1::ROUTE_MODE_DIRECT}};
  std::vector<absl::StatusOr<std::vector<uint64_t>>> cross;
  for (const auto& m : modes) {
    if (StopRequested()) Die("interrupted");
    cross.push_back(MeasureCrossNode(*cluster, m, rounds, warmup));
    if (!cross.back().ok()) {
      std::fprintf(stderr, "%s: %s\n", m.name().c_str(), cross.back().status().ToString().c_str());
    }
  }
  cluster->StopAll();  // the floor's transports run alone in the same namespaces
  auto via_master_hop = TcpOneWayUs(*cluster, 0, 2, floor_samples, 17700);  // master <-> node-b
  auto direct_hop = TcpOneWayUs(*cluster, 1, 2, floor_samples, 17710);      // node-a <-> node-b
  if (!via_master_hop.ok()) Die("transport floor (master <-> node-b): " + via_master_hop.status().ToString());
  if (!direct_hop.ok()) Die("transport floor (node-a <-> node-b): " + direct_hop.status().ToString());
  if (StopRequested()) Die("interrupted");
  auto local_kernel = MeasureLocalIpiRoundTrip(vcpu::IrqchipMode::kKernel, static_cast<uint32_t>(floor_samples));
  if (!local_kernel.ok()) Die("local ipi-pingpong floor (kernel): " + local_kernel.status().ToString());
  // KVM_GET_TSC_KHZ of a local VM converts the cluster's guest rdtsc spans (guest TSC = host TSC on this machine).
  const uint64_t khz = local_kernel->tsc_khz;
  if (khz == 0) Die("KVM_GET_TSC_KHZ gave no TSC frequency");
  // The paced transport floor of each mode pair: one round trip per cross-node RTT (p50) of that mode.
  std::vector<std::optional<Summary>> tcp_paced(modes.size());
  for (size_t i = 0; i < modes.size(); ++i) {
    if (!cross[i].ok() || cross[i]->empty()) continue;
    const double rtt_us = Summarize(ToUs(*cross[i], khz)).p50;
    const bool direct = modes[i].route == v1::ROUTE_MODE_DIRECT;
    auto paced = TcpOneWayUs(*cluster, direct ? 1 : 0, 2, floor_samples, 17720 + 10 * static_cast<int>(i),
                             absl::Microseconds(rtt_us));
    if (!paced.ok()) Die("paced transport floor (" + modes[i].name() + "): " + paced.status().ToString());
    tcp_paced[i] = Summarize(*paced);
  }
  cluster.reset();
  auto local_user = MeasureLocalIpiRoundTrip(vcpu::IrqchipMode::kUser, static_cast<uint32_t>(floor_samples));
  if (!local_user.ok()) Die("local ipi-pingpong floor (user): " + local_user.status().ToString());
  RemoveLogs(*bench);

  const Summary tcp_master = Summarize(*via_master_hop), tcp_direct = Summarize(*direct_hop);
  const Summary lk = Summarize(local_kernel->round_trip_us), lu = Summarize(local_user->round_trip_us);
  std::printf("\n%-58s %9s %9s %9s\n", "floor parts (µs)", "p50", "p99", "count");
  auto row = [](const std::string& name, const Summary& s) {
    std::printf("%-58s %9.1f %9.1f %9zu\n", name.c_str(), s.p50, s.p99, s.count);
  };
  row("tcp one-way master <-> node-b (via-master hop), rtt/2", tcp_master);
  row("tcp one-way node-a <-> node-b (direct hop), rtt/2", tcp_direct);
  row("local IPI round trip, kernel irqchip (guest rdtsc)", lk);
  row("local IPI round trip, user irqchip (guest rdtsc)", lu);

  for (size_t i = 0; i < modes.size(); ++i) {
    if (tcp_paced[i]) row(fmt::format("tcp one-way paced for {} (asleep), rtt/2", modes[i].name()), *tcp_paced[i]);
  }

  std::printf("\n%-24s %5s %9s %9s %9s %11s %7s %12s %7s\n", "cross-node RTT (µs)", "hops", "p50", "p99", "count",
              "floor p50", "ratio", "paced floor", "ratio");
  nlohmann::json jmodes = nlohmann::json::array();
  for (size_t i = 0; i < modes.size(); ++i) {
    const ModePair& m = modes[i];
    const Summary& local = m.irqchip == v1::IRQCHIP_MODE_USER ? lu : lk;
    const Summary& tcp = m.route == v1::ROUTE_MODE_DIRECT ? tcp_direct : tcp_master;
    const double floor_p50 = local.p50 + 2.0 * m.hops() * tcp.p50;
    const double floor_p99 = local.p99 + 2.0 * m.hops() * tcp.p99;
    nlohmann::json j = {{"irqchip", m.irqchip == v1::IRQCHIP_MODE_USER ? "user" : "kernel"},
                        {"route_mode", m.route == v1::ROUTE_MODE_DIRECT ? "direct" : "via-master"},
                        {"hops_one_way", m.hops()},
                        {"floor", {{"local_ipi_round_trip", ToJson(local)},
                                   {"tcp_one_way", ToJson(tcp)},
                                   {"p50_us", floor_p50},
                                   {"p99_us", floor_p99}}}};
    if (!cross[i].ok()) {
      std::printf("%-24s %5u %s\n", m.name().c_str(), m.hops(), std::string(cross[i].status().message()).c_str());
      j["error"] = std::string(cross[i].status().message());
    } else {
      const Summary s = Summarize(ToUs(*cross[i], khz));
      const double ratio = floor_p50 > 0 ? s.p50 / floor_p50 : 0;
      const double paced_p50 = tcp_paced[i] ? local.p50 + 2.0 * m.hops() * tcp_paced[i]->p50 : 0;
      const double ratio_paced = paced_p50 > 0 ? s.p50 / paced_p50 : 0;
      std::printf("%-24s %5u %9.1f %9.1f %9zu %11.1f %7.2f %12.1f %7.2f\n", m.name().c_str(), m.hops(), s.p50, s.p99,
                  s.count, floor_p50, ratio, paced_p50, ratio_paced);
      j["cross_node_round_trip"] = ToJson(s);
      j["ratio_p50"] = ratio;
      if (tcp_paced[i]) {
        j["floor_paced"] = {{"local_ipi_round_trip", ToJson(local)},
                            {"tcp_one_way", ToJson(*tcp_paced[i])},
                            {"pace_us", s.p50},
                            {"p50_us", paced_p50},
                            {"p99_us", local.p99 + 2.0 * m.hops() * tcp_paced[i]->p99}};
        j["ratio_p50_paced"] = ratio_paced;
      }
    }
    jmodes.push_back(j);
  }
  std::printf("\nfloor = local IPI round trip (same irqchip mode) + 2 x tcp one-way x hops (back to back; paced: one "
              "transport round trip per cross-node RTT, the like-for-like one); goal: ratio <= 1.25 at p50\n");

  if (!json_path.empty()) {
    nlohmann::json j;
    j["bench"] = "cluster_ipi";
    j["network"] = network;
    j["transport"] = "tcp";
    j["wait_mode"] = "event";
    j["rounds"] = rounds;
    j["kvm_tsc_khz"] = khz;
    j["method"] = "ipi-pingpong vCPU 0 @ node-a <-> vCPU 3 @ node-b; round trip = PING_ROUND c - b (guest rdtsc) / "
                  "KVM_GET_TSC_KHZ; floor = local ipi-pingpong round trip + 2 x tcp one-way (rtt/2) x hops";
    j["modes"] = jmodes;
    j["goal_ratio_p50"] = 1.25;
    std::ofstream(json_path) << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace aggvm::bench

int main(int argc, char** argv) { return aggvm::bench::Main(argc, argv); }
