// Cross-node device-interrupt latency of the distributed VM, next to its floor measured in the same run.
//
// aggvm-master and three aggvm-agents run as separate processes exactly as scripts/cluster.sh starts them — as root
// each in its own network namespace on a veth bridge (tests/support/netns.h), otherwise all on 127.0.0.1 (with a
// note) — and host one probe-guest VM of 3 nodes x 2 vCPUs (irq-sink workload, kernel irqchip, TCP, event wait mode).
// GSI 4 is routed FIXED / physical to APIC ID 3: vCPU 3, on node-b. Each sample is one traced edge of GSI 4 raised
// on node-a, one interrupt in flight at a time, from one of two sources (--source):
//   train  (default) one RingDoorbell asks node-a for a train of edges, one every --interval-us, timed by node-a's
//          own clock (node-agent/raise_train.h): a device on node-a raising at a set rate. No RPC runs during a
//          sample, so only the interrupt path competes for the 2 cores.
//   rpc    one RingDoorbell RPC per sample: the RPC's reply (the master's and this bench's gRPC threads) runs
//          while the interrupt crosses the nodes.
//
//   node-a raises GSI 4 (trace `raised`) -> kInterrupt to the master (hop 1) -> IOAPIC + router -> kDeliver to node-b
//   (hop 2) -> KVM_SIGNAL_MSI (trace `injected`) -> vCPU 3's handler entry (guest rdtsc in its IRQ record)
//
// Latency = handler entry - raised, both CLOCK_MONOTONIC ns of this machine: the trace block comes back from node-b
// as a kTraceRecordType record (node-agent/cluster_vm_host.h), the guest rdtsc is converted with a TSC <-> CLOCK_MONOTONIC
// mapping measured in this run (guest TSC = host TSC here, FACTS.md; the TSC rate is fitted over the run and printed
// next to KVM_GET_TSC_KHZ).
//
// Floor, measured in the same run after the cluster stopped: 2 hops x TcpTransport one-way latency (64-byte frames,
// event wait mode, between the master's and node-b's namespaces) + the local KVM_SIGNAL_MSI -> guest handler latency
// (node-agent/irq_probe.h on a local ProbeVm, kernel irqchip), measured
//   back to back  round trips and MSIs one right after the other: the threads and the vCPU are still awake;
//   paced         one round trip / MSI every G, G = the median gap between the cross-node samples' `raised` stamps:
//                 the transport threads sleep in epoll and the vCPU in HLT in between, as the cluster's data-plane
//                 threads and node-b's vCPU 3 do before every cross-node sample;
//   paced stream  the tcp hop as frames sent one way only, every G (bench::OneWay::kStream: arrival - send on the
//                 clock both namespaces share), which is how a cluster hop travels: nobody answers, so the
//                 receiver's TCP sends its own ACKs, and on one machine they are built and processed inside the
//                 receiver's recv. An echo's round trip / 2 carries its ACK on the echo instead.
// Every floor and its ratio are printed; the paced stream floor is the like-for-like comparison.
//
// --pin-path CPU: after the floors, the cross-node part again on a second cluster whose daemons place the interrupt
// path on CPU (aggvm-master/aggvm-agent --dataplane-cpus CPU, agents --vcpu-cpus CPU, every other thread --cpus on
// the remaining CPUs), reported against the paced floor and against a placed floor measured the same way with its
// threads on CPU too (both tcp threads; the injecting thread, asleep after its MSI as node-b's data-plane thread is,
// and the vCPU threads): placed against placed is the like-for-like ratio, and it does not depend on where the
// scheduler happened to put the unplaced floor's threads (one CPU or two: 10 or 15-18 µs per tcp hop here).
//
// --rounds R: the run split into R rounds, each a fresh cluster's share of the samples followed by its share of every
// floor (and, with --pin-path, the placed cluster's share and the placed floor). This host's speed drifts over
// minutes (±20 % between runs); a ratio whose cross-node part and floor were measured minutes apart carries that
// drift, so the results are pooled over the rounds and each round's like-for-like ratios are printed as well.
//
//   cluster_latency_bench [--samples 3000] [--source train|rpc] [--interval-us 2000] [--max-seconds 90]
//                         [--floor-samples 3000] [--loopback] [--pin-path CPU] [--rounds R] [--json FILE]
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench/cluster/cluster_floor.h"
#include "common/clock.h"
#include "common/stats.h"
#include "common/thread.h"
#include "node-agent/cluster_vm_host.h"
#include "transport/frame.h"
#include "tests/support/cluster_launcher.h"

namespace aggvm::bench {
namespace {

namespace v1 = ::aggvm::v1;

constexpr uint32_t kHelloRecord = 1;  // guest/abi.h AGGVM_REC_HELLO
constexpr uint32_t kIrqRecord = 2;    // AGGVM_REC_IRQ: a = vector, b = rdtsc at handler entry
constexpr uint32_t kGsi = 4, kVector = 0x44, kTargetVcpu = 3;
const char* const kVm = "clusterbench";
constexpr uint32_t kHops = 2;  // node-a -> master, master -> node-b

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "cluster_latency_bench: %s\n", what.c_str());
  std::exit(1);
}

v1::VmSpec Spec() {
  v1::VmSpec spec = testing::ClusterSpec(kVm, "irq-sink", v1::IRQCHIP_MODE_KERNEL);  // 3 nodes x 2 vCPUs, event
  spec.set_memory_mib(64);
  spec.set_transport(v1::TRANSPORT_KIND_TCP);
  auto* route = spec.add_interrupt_routes();  // fixed, physical APIC ID 3 = vCPU 3 on node-b
  route->set_gsi(kGsi);
  route->set_vector(kVector);
  route->set_delivery(v1::INTERRUPT_DELIVERY_FIXED);
  route->set_dest_mode(v1::DESTINATION_MODE_PHYSICAL);
  route->set_destination(kTargetVcpu);
  route->set_trigger(v1::INTERRUPT_TRIGGER_EDGE);
  return spec;
}

// One traced edge of GSI 4 raised on node-a.
v1::RingDoorbellRequest TracedRing() {
  v1::RingDoorbellRequest req;
  req.set_vm(kVm);
  req.set_node("node-a");
  req.set_gsi(kGsi);
  req.set_asserted(true);
  req.set_traced(true);
  return req;
}

struct CrossNode {
  std::vector<double> handler_us;     // raised on node-a -> vCPU 3's handler entry on node-b (primary)
  std::vector<double> to_master_us;   // raised -> master_received
  std::vector<double> decided_us;     // raised -> master_decided
  std::vector<double> target_us;      // raised -> node-b received the kDeliver
  std::vector<double> injected_us;    // raised -> KVM_SIGNAL_MSI done on node-b
  std::vector<double> inject_to_handler_us;  // injected -> handler entry
  std::vector<double> rpc_us;         // bench's RingDoorbell call -> handler entry (incl. gRPC + master -> node-a)
  std::vector<double> raised_ns;      // each sample's `raised` stamp (for the pacing of the paced floor)
  uint64_t lost = 0, rejected = 0;
  double fitted_tsc_khz = 0;
};

// The per-hop rows of a cross-node run: printed label, JSON key, samples.
struct HopRow {
  const char* label;
  const char* key;
  std::vector<double> CrossNode::*samples;
};
constexpr HopRow kHopRows[] = {
    {"raised on node-a -> master received (hop 1)", "to_master", &CrossNode::to_master_us},
    {"raised on node-a -> master routed", "master_decided", &CrossNode::decided_us},
    {"raised on node-a -> node-b received kDeliver (hop 2)", "target_received", &CrossNode::target_us},
    {"raised on node-a -> KVM_SIGNAL_MSI done on node-b", "injected", &CrossNode::injected_us},
    {"  node-b injected -> guest handler entry", "inject_to_handler", &CrossNode::inject_to_handler_us},
};

// Every sample vector of a cross-node run (the hop rows' and the rest): what pooling rounds appends.
constexpr std::vector<double> CrossNode::*kCrossNodeSamples[] = {
    &CrossNode::handler_us,  &CrossNode::to_master_us,         &CrossNode::decided_us, &CrossNode::target_us,
    &CrossNode::injected_us, &CrossNode::inject_to_handler_us, &CrossNode::rpc_us,     &CrossNode::raised_ns,
};

// A floor: kHops x a transport one-way + a local MSI -> handler (of p50s, or of p99s).
constexpr double FloorOf(double one_way, double msi) { return kHops * one_way + msi; }

nlohmann::json HopsJson(const CrossNode& c) {
  nlohmann::json j;
  for (const HopRow& h : kHopRows) j[h.key] = ToJson(Summarize(c.*h.samples));
  return j;
}

// Runs the cluster part on the started cluster: VM created and started, `samples` doorbells (bounded by
// `max_seconds`), VM stopped. `train_interval_us` > 0: one train of edges from node-a itself; else one RPC each.
absl::StatusOr<CrossNode> MeasureCrossNode(testing::ClusterLauncher& cluster, size_t samples, size_t warmup,
                                           double max_seconds, uint32_t train_interval_us) {
  using testing::Call;
  auto fail = [&](absl::Status s) {
    cluster.TailLogs();
    return s;
  };
  v1::Master::Stub* stub = &cluster.stub();
  v1::CreateVmRequest create;
  *create.mutable_spec() = Spec();
  v1::VmStatus status;
  if (auto s = Call([&](grpc::ClientContext& c) { return stub->CreateVm(&c, create, &status); }); !s.ok()) {
    return fail(absl::InternalError("CreateVm: " + s.error_message()));
  }
  testing::VmWatch watch(*stub, kVm);
  v1::VmRef ref;
  ref.set_name(kVm);
  if (auto s = Call([&](grpc::ClientContext& c) { return stub->StartVm(&c, ref, &status); }); !s.ok()) {
    return fail(absl::InternalError("StartVm: " + s.error_message()));
  }
  auto stop_vm = [&] { (void)Call([&](grpc::ClientContext& c) { return stub->StopVm(&c, ref, &status); }); };
  if (!watch.WaitFor([&] { return watch.count(kHelloRecord) >= 6 || StopRequested(); }, absl::Seconds(60)) ||
      watch.count(kHelloRecord) < 6) {
    stop_vm();
    return fail(absl::DeadlineExceededError("the guest's 6 vCPUs did not all say HELLO within 60 s"));
  }

  CrossNode out;
  struct Raw {
    uint64_t rpc_ns;
    ClockPair pair;
    v1::GuestRecord irq, trace;
  };
  std::vector<Raw> raw;
  std::vector<v1::GuestRecord> train_irqs, train_traces;  // train source: every record, paired by time below
  uint64_t train_rpc_ns = 0;
  size_t next_irq = watch.count(kIrqRecord), next_trace = watch.count(agent::kTraceRecordType);
  const ClockPair first = ReadPair();
  const absl::Time end = absl::Now() + absl::Seconds(max_seconds);
  if (train_interval_us > 0) {
    // One train: node-a raises warmup + samples edges on its own clock; the records come back as they happen.
    const size_t total = warmup + samples;
    v1::RingDoorbellRequest req = TracedRing();
    req.set_count(static_cast<uint32_t>(total));
    req.set_interval_us(train_interval_us);
    v1::RingDoorbellResponse resp;
    const uint64_t rpc_ns = MonotonicNanos();
    if (auto s = Call([&](grpc::ClientContext& c) { return stub->RingDoorbell(&c, req, &resp); }, 5); !s.ok()) {
      stop_vm();
      return fail(absl::InternalError("RingDoorbell (train): " + s.error_message()));
    }
    const absl::Time train_end =
        std::min(end, absl::Now() + absl::Microseconds(double(total) * train_interval_us) + absl::Seconds(10));
    watch.WaitFor([&] {
      return (watch.count(kIrqRecord) >= next_irq + total && watch.count(agent::kTraceRecordType) >= next_trace + total) ||
             StopRequested() || absl::Now() >= train_end;
    }, absl::Seconds(max_seconds + 10));
    if (watch.count(kIrqRecord) < next_irq + total) {
      // Cut short (max_seconds, a lost edge): stop the train; a one-edge train replaces it (one more edge, untraced).
      req.set_count(1);
      req.set_interval_us(transport::ControlPayload::kMinTrainIntervalUs);
      req.set_traced(false);
      (void)Call([&](grpc::ClientContext& c) { return stub->RingDoorbell(&c, req, &resp); }, 5);
    }
    // Paired by time once the TSC rate is known (below): a record missing on one side must not shift every later pair.
    const size_t irqs = watch.count(kIrqRecord) - next_irq, traces = watch.count(agent::kTraceRecordType) - next_trace;
    for (size_t i = 0; i < irqs; ++i) {
      if (auto irq = watch.RecordAt(kIrqRecord, next_irq + i, absl::ZeroDuration())) train_irqs.push_back(*irq);
    }
    for (size_t i = 0; i < traces; ++i) {
      if (auto t = watch.RecordAt(agent::kTraceRecordType, next_trace + i, absl::ZeroDuration())) {
        train_traces.push_back(*t);
      }
    }
    train_rpc_ns = rpc_ns;
  }
  for (size_t i = 0; train_interval_us == 0 && i < warmup + samples && !StopRequested() && absl::Now() < end; ++i) {
    const v1::RingDoorbellRequest req = TracedRing();
    v1::RingDoorbellResponse resp;
    const ClockPair pair = ReadPair();
    const uint64_t rpc_ns = MonotonicNanos();
    if (auto s = Call([&](grpc::ClientContext& c) { return stub->RingDoorbell(&c, req, &resp); }, 5); !s.ok()) {
      stop_vm();
      return fail(absl::InternalError("RingDoorbell: " + s.error_message()));
    }
    // The next IRQ record and the next trace record, in arrival order.
    auto irq = watch.RecordAt(kIrqRecord, next_irq, absl::Seconds(2));
    auto trace = irq ? watch.RecordAt(agent::kTraceRecordType, next_trace, absl::Seconds(2)) : std::nullopt;
    if (!irq || !trace) {
      out.lost += 1;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let a late pair arrive, then forget it
      next_irq = watch.count(kIrqRecord);
      next_trace = watch.count(agent::kTraceRecordType);
      continue;
    }
    next_irq += 1;
    next_trace += 1;
    if (i >= warmup) raw.push_back({rpc_ns, pair, *irq, *trace});
  }
  const ClockPair last = ReadPair();
  stop_vm();
  if (StopRequested()) return absl::CancelledError("interrupted");
  if (last.ns <= first.ns + 1'000'000) return absl::InternalError("the run was too short to fit the TSC rate");
  const double tsc_per_ns = static_cast<double>(last.tsc - first.tsc) / static_cast<double>(last.ns - first.ns);
  out.fitted_tsc_khz = tsc_per_ns * 1e6;
  if (train_interval_us > 0) {
    // Each edge's trace record (by its `raised`) with the IRQ record whose handler entry falls after it and within
    // one interval: edges are one interval apart, so at most one does. Unmatched edges count as lost.
    auto handler_of = [&](const v1::GuestRecord& r) {
      return static_cast<double>(first.ns) +
             (static_cast<double>(r.b()) - static_cast<double>(first.tsc)) / tsc_per_ns;
    };
    std::sort(train_traces.begin(), train_traces.end(), [](const auto& a, const auto& b) { return a.a() < b.a(); });
    std::sort(train_irqs.begin(), train_irqs.end(), [](const auto& a, const auto& b) { return a.b() < b.b(); });
    size_t j = 0, matched = 0;
    for (size_t i = 0; i < train_traces.size(); ++i) {
      const double raised = static_cast<double>(train_traces[i].a());
      while (j < train_irqs.size() && handler_of(train_irqs[j]) <= raised) ++j;
      if (j == train_irqs.size() || handler_of(train_irqs[j]) >= raised + train_interval_us * 1e3) continue;
      matched += 1;
      if (i >= warmup) raw.push_back({train_rpc_ns, first, train_irqs[j], train_traces[i]});
      ++j;
    }
    const size_t total = warmup + samples;
    out.lost = total > matched ? total - matched : 0;
  }

  for (const auto& r : raw) {
    if (r.irq.a() != kVector || r.irq.vcpu() != kTargetVcpu || r.irq.node() != "node-b") {
      out.rejected += 1;
      continue;
    }
    const uint64_t raised = r.trace.a();
    const auto lo = [](uint64_t v) { return static_cast<uint32_t>(v); };
    const auto hi = [](uint64_t v) { return static_cast<uint32_t>(v >> 32); };
    const uint32_t injected = hi(r.trace.c());
    // The handler's rdtsc, mapped to CLOCK_MONOTONIC through the pair read just before this sample's ring (a train:
    // the pair read before the train, with the rate fitted over the run).
    const double handler_ns = static_cast<double>(r.pair.ns) +
                              (static_cast<double>(r.irq.b()) - static_cast<double>(r.pair.tsc)) / tsc_per_ns;
    const double e2e = handler_ns - static_cast<double>(raised);
    const bool past_next = train_interval_us > 0 && e2e >= train_interval_us * 1e3;  // belongs to a later edge
    if (raised < r.rpc_ns || injected == 0xFFFFFFFFu || e2e <= 0 || past_next) {  // not this ring's pair: skip
      out.rejected += 1;
      continue;
    }
    out.handler_us.push_back(e2e / 1e3);
    out.raised_ns.push_back(static_cast<double>(raised));
    out.to_master_us.push_back(lo(r.trace.b()) / 1e3);
    out.decided_us.push_back(hi(r.trace.b()) / 1e3);
    out.target_us.push_back(lo(r.trace.c()) / 1e3);
    out.injected_us.push_back(injected / 1e3);
    out.inject_to_handler_us.push_back((e2e - injected) / 1e3);
    if (train_interval_us == 0) out.rpc_us.push_back((handler_ns - static_cast<double>(r.rpc_ns)) / 1e3);
  }
  return out;
}

void Append(std::vector<double>& to, const std::vector<double>& from) { to.insert(to.end(), from.begin(), from.end()); }

void Append(CrossNode& to, const CrossNode& from) {
  for (auto member : kCrossNodeSamples) Append(to.*member, from.*member);
  to.lost += from.lost;
  to.rejected += from.rejected;
  to.fitted_tsc_khz = from.fitted_tsc_khz;  // each round fits its own (its samples are mapped with it); the last shown
}

void Append(LocalMsi& to, const LocalMsi& from) {
  Append(to.to_handler_us, from.to_handler_us);
  to.tsc_khz = from.tsc_khz;
}

// Every sample of a run, or of one round of it.
struct Pool {
  CrossNode cross;
  std::optional<CrossNode> placed;  // --pin-path
  std::vector<double> tcp, tcp_paced, tcp_stream, tcp_placed, stream_placed;
  LocalMsi msi, msi_paced, msi_sleeping;
  std::optional<LocalMsi> msi_placed;  // --pin-path

  void Add(const Pool& round) {
    Append(cross, round.cross);
    if (round.placed) Append(placed ? *placed : placed.emplace(), *round.placed);
    Append(tcp, round.tcp);
    Append(tcp_paced, round.tcp_paced);
    Append(tcp_stream, round.tcp_stream);
    Append(tcp_placed, round.tcp_placed);
    Append(stream_placed, round.stream_placed);
    Append(msi, round.msi);
    Append(msi_paced, round.msi_paced);
    Append(msi_sleeping, round.msi_sleeping);
    if (round.msi_placed) Append(msi_placed ? *msi_placed : msi_placed.emplace(), *round.msi_placed);
  }
};

// One round's like-for-like p50s: cross-node against the paced stream floor (kHops x one-way stream + paced MSI), and
// placed against the placed stream floor.
struct RoundRatios {
  double e2e_p50 = 0, floor_p50 = 0, placed_e2e_p50 = 0, placed_floor_p50 = 0;
  [[nodiscard]] double ratio() const { return floor_p50 > 0 ? e2e_p50 / floor_p50 : 0; }
  [[nodiscard]] double placed_ratio() const { return placed_floor_p50 > 0 ? placed_e2e_p50 / placed_floor_p50 : 0; }
};

RoundRatios RatiosOf(const Pool& round) {
  RoundRatios r;
  r.e2e_p50 = Summarize(round.cross.handler_us).p50;
  r.floor_p50 = FloorOf(Summarize(round.tcp_stream).p50, Summarize(round.msi_paced.to_handler_us).p50);
  if (round.placed && round.msi_placed) {
    r.placed_e2e_p50 = Summarize(round.placed->handler_us).p50;
    r.placed_floor_p50 = FloorOf(Summarize(round.stream_placed).p50, Summarize(round.msi_placed->to_handler_us).p50);
  }
  return r;
}

int Main(int argc, char** argv) {
  CLI::App app{"cross-node device-interrupt latency (doorbell on node-a -> guest handler on node-b) vs its floor"};
  size_t samples = 3000, floor_samples = 3000, warmup = 100;
  double max_seconds = 90;
  bool loopback = false;
  std::string source = "train";
  uint32_t interval_us = 2000;
  std::string json_path;
  app.add_option("--samples", samples, "doorbells measured (after --warmup)");
  app.add_option("--warmup", warmup, "doorbells rung first and not counted");
  app.add_option("--max-seconds", max_seconds, "bound on each round's cross-node sampling time");
  app.add_option("--source", source, "train: node-a raises a train of edges on its own clock (no RPC per sample); "
                 "rpc: one RingDoorbell RPC per sample")->check(CLI::IsMember({"train", "rpc"}));
  app.add_option("--interval-us", interval_us, "train: one edge every this many µs")
      ->check(CLI::Range(static_cast<uint32_t>(transport::ControlPayload::kMinTrainIntervalUs),
                         static_cast<uint32_t>(transport::ControlPayload::kMaxTrainIntervalUs)));
  app.add_option("--floor-samples", floor_samples, "transport round trips and local MSIs for the floor");
  app.add_flag("--loopback", loopback, "every process on 127.0.0.1 instead of network namespaces");
  app.add_option("--json", json_path, "write the results as JSON");
  size_t rounds = 1;
  app.add_option("--rounds", rounds,
                 "split the samples into this many rounds, each a cluster run followed by its floors, so that a "
                 "slow phase of the host falls on both; pooled results, and each round's ratios")
      ->check(CLI::Range(size_t{1}, size_t{100}));
  int pin_path = -1;
  app.add_option("--pin-path", pin_path,
                 "also measure with the interrupt path placed on this CPU (every daemon's data-plane thread, the "
                 "vCPU threads; the daemons' other threads on the other CPUs), after the unplaced run");
  CLI11_PARSE(app, argc, argv);
  std::vector<std::string> pinned_master_args, pinned_agent_args;
  if (pin_path >= 0) {
    std::vector<int> others;
    cpu_set_t mine;
    if (sched_getaffinity(0, sizeof mine, &mine) != 0) Die("sched_getaffinity failed");
    if (pin_path >= CPU_SETSIZE || !CPU_ISSET(pin_path, &mine)) Die(fmt::format("--pin-path {}: not a CPU this bench may use", pin_path));
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (c != pin_path && CPU_ISSET(c, &mine)) others.push_back(c);
    }
    if (others.empty()) Die("--pin-path needs at least two CPUs (the path's and one for everything else)");
    const std::string path = std::to_string(pin_path), rest = FormatCpuList(others);
    pinned_master_args = {"--cpus", rest, "--dataplane-cpus", path};
    pinned_agent_args = {"--cpus", rest, "--dataplane-cpus", path, "--vcpu-cpus", path};
  }
  if (samples / rounds < 2 || floor_samples / rounds < 2) {
    Die(fmt::format("--rounds {}: each round needs at least 2 samples and 2 floor samples (--samples {}, "
                    "--floor-samples {})", rounds, samples, floor_samples));
  }
  const uint32_t train_interval_us = source == "train" ? interval_us : 0;
  const size_t per_round = (samples + rounds - 1) / rounds;
  if (train_interval_us > 0 && double(warmup + per_round) * train_interval_us > max_seconds * 1e6) {
    Die(fmt::format("{} edges {} µs apart take longer than --max-seconds {}", warmup + per_round, train_interval_us,
                    max_seconds));
  }
  const std::vector<int> path_cpus = pin_path >= 0 ? std::vector<int>{pin_path} : std::vector<int>{};
  Pool pool;
  std::vector<RoundRatios> round_ratios;
  std::string network;
  double gap_us = 0;
  for (size_t r = 0; r < rounds; ++r) {
    if (StopRequested()) Die("interrupted");
    // Round r's share: the samples split as evenly as they go.
    const auto share = [&](size_t total) { return total / rounds + (r < total % rounds ? 1 : 0); };
    Pool round;
    auto bench = StartBenchCluster("clusterbench", loopback);
    if (!bench.ok()) Die("cluster: " + bench.status().ToString());
    auto& cluster = bench->cluster;
    if (r == 0) {
      network = bench->network;
      std::printf("cluster_latency_bench: master + 3 agents (%s), 3 nodes x 2 vCPUs, kernel irqchip, tcp, event wait "
                  "mode; GSI %u raised on node-a -> vector 0x%x, fixed to vCPU %u on node-b (%u hops); %zu round(s)\n",
                  network == "netns" ? "each in its own network namespace, veth bridge" : "loopback", kGsi, kVector,
                  kTargetVcpu, kHops, rounds);
      std::fflush(stdout);
    }
    auto cross = MeasureCrossNode(*cluster, share(samples), warmup, max_seconds, train_interval_us);
    if (!cross.ok()) {
      cluster.reset();
      Die("cross-node run: " + std::string(cross.status().ToString()) + " (logs in " + bench->logdir + ")");
    }
    round.cross = *std::move(cross);
    cluster->StopAll();  // the floor's transports run alone in the same namespaces
    // Each round's floor transports listen on ports of their own (no wait for the last round's to be released).
    const int port = 17700 + 20 * static_cast<int>(r);
    auto take = [](absl::StatusOr<std::vector<double>> got, const char* what) {
      if (!got.ok()) Die(fmt::format("{}: {}", what, got.status().ToString()));
      return *std::move(got);
    };
    round.tcp = take(bench::TcpOneWayUs(*cluster, 0, 2, share(floor_samples), port), "transport floor");
    // The paced floor: the same transport and injection, one every G = the cross-node samples' median spacing (of
    // the first round), so the threads and the vCPU are asleep when it comes, as in the cluster.
    if (r == 0) gap_us = MedianGap(round.cross.raised_ns) / 1e3;
    if (gap_us <= 0) Die("too few cross-node samples to pace the floor");
    const absl::Duration pace = absl::Microseconds(gap_us);
    round.tcp_paced =
        take(bench::TcpOneWayUs(*cluster, 0, 2, share(floor_samples), port + 2, pace), "paced transport floor");
    // The same pace, frames one way only, as a cluster hop sends them (OneWay::kStream).
    round.tcp_stream = take(bench::TcpOneWayUs(*cluster, 0, 2, share(floor_samples), port + 4, pace, {},
                                               OneWay::kStream), "paced one-way stream floor");
    // --pin-path: the placed floor, like for like with the placed cluster: the same paced transport with both
    // threads on the path's CPU (below: the paced injection with the injecting thread and the vCPUs there too).
    if (pin_path >= 0) {
      round.tcp_placed = take(bench::TcpOneWayUs(*cluster, 0, 2, share(floor_samples), port + 6, pace, path_cpus),
                              "placed transport floor");
      round.stream_placed = take(bench::TcpOneWayUs(*cluster, 0, 2, share(floor_samples), port + 8, pace, path_cpus,
                                                    OneWay::kStream), "placed one-way stream floor");
    }
    cluster.reset();
    RemoveLogs(*bench);
    // The same cross-node run with the interrupt path placed (--pin-path): a second cluster with those flags.
    if (pin_path >= 0) {
      auto placed = StartBenchCluster("clusterbench", loopback, pinned_master_args, pinned_agent_args);
      if (!placed.ok()) Die("cluster with --pin-path: " + placed.status().ToString());
      auto p = MeasureCrossNode(*placed->cluster, share(samples), warmup, max_seconds, train_interval_us);
      placed->cluster.reset();
      if (!p.ok()) Die("cross-node run with --pin-path: " + p.status().ToString() + " (logs in " + placed->logdir + ")");
      RemoveLogs(*placed);
      round.placed = *std::move(p);
    }
    if (StopRequested()) Die("interrupted");
    auto msi = [&](absl::Duration msi_pace, agent::IrqProbe::Waiter waiter, const std::vector<int>& cpus,
                   const char* what) {
      auto got = MeasureLocalMsi(vcpu::IrqchipMode::kKernel, share(floor_samples), msi_pace, waiter, cpus);
      if (!got.ok()) Die(fmt::format("{}: {}", what, got.status().ToString()));
      return *std::move(got);
    };
    round.msi = msi(absl::ZeroDuration(), agent::IrqProbe::Waiter::kSpin, {}, "local KVM_SIGNAL_MSI floor");
    round.msi_paced = msi(pace, agent::IrqProbe::Waiter::kSpin, {}, "paced local KVM_SIGNAL_MSI floor");
    // The same, with the injecting thread asleep right after its KVM_SIGNAL_MSI (as node-b's data-plane thread,
    // which goes back to epoll) instead of spinning for the record: shown next to the floor, not used in it.
    round.msi_sleeping = msi(pace, agent::IrqProbe::Waiter::kSleep, {}, "paced local MSI (sleeping injector)");
    // The placed floor's injection: the injecting thread sleeps after its MSI, as node-b's data-plane thread does
    // (spinning for the record on the vCPU's own CPU would take that CPU from the vCPU).
    if (pin_path >= 0) {
      round.msi_placed = msi(pace, agent::IrqProbe::Waiter::kSleep, path_cpus, "placed local MSI floor");
    }
    round_ratios.push_back(RatiosOf(round));
    if (rounds > 1) {
      const RoundRatios& rr = round_ratios.back();
      std::printf("round %zu of %zu: cross-node p50 %.1f µs / stream floor %.1f = %.2f", r + 1, rounds, rr.e2e_p50,
                  rr.floor_p50, rr.ratio());
      if (round.placed) {
        std::printf("; placed %.1f / placed stream floor %.1f = %.2f", rr.placed_e2e_p50, rr.placed_floor_p50,
                    rr.placed_ratio());
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    pool.Add(round);
  }
  const Summary e2e = Summarize(pool.cross.handler_us);
  const Summary tcp = Summarize(pool.tcp);
  const Summary tcp_paced = Summarize(pool.tcp_paced);
  const Summary tcp_stream = Summarize(pool.tcp_stream);
  const Summary msi = Summarize(pool.msi.to_handler_us);
  const Summary msi_paced = Summarize(pool.msi_paced.to_handler_us);
  // Each floor: kHops x a transport one-way + a local MSI -> handler.
  struct Floor {
    const char* key;
    std::string label;
    Summary one_way, msi;
    double p50 = 0, p99 = 0;
  };
  auto floor_of = [](const char* key, std::string label, const Summary& hop, const Summary& m) {
    return Floor{key, std::move(label), hop, m, FloorOf(hop.p50, m.p50), FloorOf(hop.p99, m.p99)};
  };
  const std::vector<Floor> floors = {
      floor_of("floor", "back to back: tcp rtt/2 + local MSI (vCPU awake)", tcp, msi),
      floor_of("floor_paced", "paced: tcp rtt/2 + local MSI (all asleep)", tcp_paced, msi_paced),
      floor_of("floor_paced_stream", "paced: tcp one-way stream + local MSI (like for like)", tcp_stream, msi_paced),
  };

  std::printf("\nsource: %s\n", train_interval_us > 0
                                   ? fmt::format("a train of edges raised by node-a itself, one every {} µs",
                                                 train_interval_us).c_str()
                                   : "one RingDoorbell RPC per sample");
  std::printf("cross-node samples: %zu (lost %lu, rejected %lu), one every %.0f µs (median); handler time = guest "
              "rdtsc -> CLOCK_MONOTONIC via TSC rate fitted over each round, the last %.0f kHz (KVM_GET_TSC_KHZ %lu)\n",
              e2e.count, static_cast<unsigned long>(pool.cross.lost), static_cast<unsigned long>(pool.cross.rejected),
              gap_us, pool.cross.fitted_tsc_khz, static_cast<unsigned long>(pool.msi.tsc_khz));
  std::printf("\n%-66s %9s %9s %9s\n", "path (µs)", "p50", "p99", "count");
  auto row = [](const std::string& name, const Summary& s) {
    std::printf("%-66s %9.1f %9.1f %9zu\n", name.c_str(), s.p50, s.p99, s.count);
  };
  auto hop_rows = [&](const CrossNode& c) {
    for (const HopRow& h : kHopRows) row(h.label, Summarize(c.*h.samples));
  };
  auto floor_rows = [&](const std::vector<Floor>& fs, double e2e_p50, const char* what) {
    for (const Floor& f : fs) {
      std::printf("%-66s %9.1f %9.1f\n", fmt::format("FLOOR {}", f.label).c_str(), f.p50, f.p99);
    }
    for (const Floor& f : fs) {
      const double r = f.p50 > 0 ? e2e_p50 / f.p50 : 0;
      std::printf("ratio p50 %s / %-26s = %.2f (goal <= 1.25): %s\n", what, f.key, r,
                  r <= 1.25 ? "met" : "NOT met");
    }
  };
  hop_rows(pool.cross);
  row("RAISED ON NODE-A -> GUEST HANDLER ON NODE-B", e2e);
  if (!pool.cross.rpc_us.empty()) {
    row("  (RingDoorbell RPC issued -> guest handler, incl. gRPC)", Summarize(pool.cross.rpc_us));
  }
  row("floor: tcp one-way = rtt/2, 64-byte frames, event, back to back", tcp);
  row(fmt::format("floor: tcp one-way = rtt/2, paced {:.0f} µs (asleep)", gap_us), tcp_paced);
  row(fmt::format("floor: tcp one-way stream (arrival - send), paced {:.0f} µs", gap_us), tcp_stream);
  row("floor: local KVM_SIGNAL_MSI -> handler, back to back (awake)", msi);
  row(fmt::format("floor: local KVM_SIGNAL_MSI -> handler, paced {:.0f} µs (asleep)", gap_us), msi_paced);
  row("  (the same, the injecting thread asleep after the MSI, not spinning)", Summarize(pool.msi_sleeping.to_handler_us));
  floor_rows(floors, e2e.p50, "cross-node");

  std::vector<Floor> placed_floors;
  if (pool.placed) {
    const Summary e2e_pinned = Summarize(pool.placed->handler_us);
    const Summary msi_p = Summarize(pool.msi_placed->to_handler_us);
    placed_floors = {
        floor_of("placed_floor_paced", fmt::format("placed: paced tcp rtt/2 + local MSI, all on CPU {}", pin_path),
                 Summarize(pool.tcp_placed), msi_p),
        floor_of("placed_floor_stream",
                 fmt::format("placed: paced tcp stream + local MSI, all on CPU {} (like for like)", pin_path),
                 Summarize(pool.stream_placed), msi_p),
        floors[1],
        floors[2],
    };
    std::printf("\nwith the interrupt path on CPU %d (data-plane threads of the master and the agents, vCPU threads; "
                "the daemons' other threads on CPUs %s): %zu samples (lost %lu, rejected %lu)\n",
                pin_path, pinned_agent_args[1].c_str(), e2e_pinned.count, static_cast<unsigned long>(pool.placed->lost),
                static_cast<unsigned long>(pool.placed->rejected));
    std::printf("%-66s %9s %9s %9s\n", "path (µs)", "p50", "p99", "count");
    hop_rows(*pool.placed);
    row("RAISED ON NODE-A -> GUEST HANDLER ON NODE-B (placed)", e2e_pinned);
    row(fmt::format("placed floor: tcp one-way = rtt/2, paced, both threads on CPU {}", pin_path),
        Summarize(pool.tcp_placed));
    row(fmt::format("placed floor: tcp one-way stream, paced, both threads on CPU {}", pin_path),
        Summarize(pool.stream_placed));
    row(fmt::format("placed floor: local MSI -> handler, paced, injector (asleep) + vCPUs on CPU {}", pin_path),
        msi_p);
    floor_rows(placed_floors, e2e_pinned.p50, "placed cross-node");
  }

  // Each round against its own floor: how much of a ratio is the host's drift between the cluster's and the floor's
  // minutes.
  std::vector<double> by_round, placed_by_round;
  for (const RoundRatios& r : round_ratios) {
    by_round.push_back(r.ratio());
    if (r.placed_floor_p50 > 0) placed_by_round.push_back(r.placed_ratio());
  }
  auto spread = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t met = static_cast<size_t>(std::count_if(v.begin(), v.end(), [](double x) { return x <= 1.25; }));
    const double median = v.size() % 2 == 1 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
    return fmt::format("{:.2f}", fmt::join(v, " ")) +
           fmt::format(" (median {:.2f}; goal <= 1.25 met in {} of {})", median, met, v.size());
  };
  if (rounds > 1) {
    std::printf("\nper round, each against the floor measured in the same round (like for like, sorted):\n");
    std::printf("  cross-node / floor_paced_stream          %s\n", spread(by_round).c_str());
    if (!placed_by_round.empty()) {
      std::printf("  placed cross-node / placed_floor_stream  %s\n", spread(placed_by_round).c_str());
    }
  }

  if (!json_path.empty()) {
    auto floor_json = [&](const Floor& f, double e2e_p50) {
      return nlohmann::json{{"tcp_one_way", ToJson(f.one_way)},
                            {"local_msi_to_handler", ToJson(f.msi)},
                            {"p50_us", f.p50},
                            {"p99_us", f.p99},
                            {"ratio_p50", f.p50 > 0 ? e2e_p50 / f.p50 : 0}};
    };
    nlohmann::json j;
    j["bench"] = "cluster_latency";
    j["network"] = network;
    j["irqchip"] = "kernel";
    j["transport"] = "tcp";
    j["wait_mode"] = "event";
    j["source"] = source;
    if (train_interval_us > 0) j["train_interval_us"] = train_interval_us;
    j["hops"] = kHops;
    j["method"] = "raised = trace block stamp on node-a (CLOCK_MONOTONIC); handler = guest rdtsc of vCPU 3's IRQ "
                  "record mapped to CLOCK_MONOTONIC (TSC rate fitted over the run). Floors: hops x tcp one-way "
                  "(rtt/2 of an echo, or a one-way stream: arrival - send on the shared clock) + local "
                  "KVM_SIGNAL_MSI -> handler; paced = one every sample_gap_us, so the threads and the vCPU sleep in "
                  "between as in the cluster; placed = those threads on path_cpu";
    j["lost"] = pool.cross.lost;
    j["rejected"] = pool.cross.rejected;
    j["fitted_tsc_khz"] = pool.cross.fitted_tsc_khz;
    j["kvm_tsc_khz"] = pool.msi.tsc_khz;
    j["sample_gap_us"] = gap_us;
    j["cross_node"] = ToJson(e2e);
    j["hops_detail"] = HopsJson(pool.cross);
    j["hops_detail"]["rpc_to_handler"] = ToJson(Summarize(pool.cross.rpc_us));
    j["local_msi_to_handler_paced_injector_asleep"] = ToJson(Summarize(pool.msi_sleeping.to_handler_us));
    for (const Floor& f : floors) j["floors"][f.key] = floor_json(f, e2e.p50);
    if (pool.placed) {
      const Summary e2e_pinned = Summarize(pool.placed->handler_us);
      j["placed"] = {{"path_cpu", pin_path},
                     {"other_cpus", pinned_agent_args[1]},
                     {"master_args", pinned_master_args},
                     {"agent_args", pinned_agent_args},
                     {"lost", pool.placed->lost},
                     {"rejected", pool.placed->rejected},
                     {"cross_node", ToJson(e2e_pinned)},
                     {"hops_detail", HopsJson(*pool.placed)}};
      for (const Floor& f : placed_floors) j["placed"]["floors"][f.key] = floor_json(f, e2e_pinned.p50);
    }
    j["rounds"] = rounds;
    for (const RoundRatios& r : round_ratios) {
      j["round_ratios"]["floor_paced_stream"].push_back(r.ratio());
      if (r.placed_floor_p50 > 0) j["round_ratios"]["placed_floor_stream"].push_back(r.placed_ratio());
    }
    j["goal_ratio_p50"] = 1.25;
    std::ofstream(json_path) << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace aggvm::bench

int main(int argc, char** argv) { return aggvm::bench::Main(argc, argv); }
