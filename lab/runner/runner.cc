#include "lab/runner/runner.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "lab/clock_offset.h"
#include "lab/trace_record.h"
#include "proto/aggvm.grpc.pb.h"

namespace aggvm::lab::runner {
namespace {

namespace v1 = ::aggvm::v1;

constexpr uint32_t kHelloRecord = 1;      // guest/abi.h AGGVM_REC_HELLO
constexpr uint32_t kIrqRecord = 2;        // AGGVM_REC_IRQ: a = vector, b = rdtsc at handler entry
constexpr uint32_t kPingRoundRecord = 3;  // AGGVM_REC_PING_ROUND: a = round, b = rdtsc before, c = rdtsc after
constexpr uint32_t kBroadcastRoundRecord = 6;  // AGGVM_REC_BCAST_ROUND: a = round, b = rdtsc before, c = last answer
constexpr uint32_t kGsi = 4, kVector = 0x44, kIpiVector = 0x40;

grpc::Status Call(const std::function<grpc::Status(grpc::ClientContext&)>& f, double seconds = 30) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1e3)));
  return f(ctx);
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), fmt::format("{}: {}", what, s.error_message()));
}

// A VM's guest and host records from WatchEvents, by type, in arrival order.
class RecordWatch {
 public:
  RecordWatch(v1::Master::Stub& stub, const std::string& vm) {
    v1::WatchEventsRequest req;
    req.set_vm(vm);
    req.set_console(true);
    reader_ = stub.WatchEvents(&ctx_, req);
    reader_->WaitForInitialMetadata();
    thread_ = std::thread([this] {
      v1::Event e;
      while (reader_->Read(&e)) {
        if (!e.has_record()) continue;
        std::lock_guard l(mu_);
        by_type_[e.record().type()].push_back(e.record());
        cv_.notify_all();
      }
    });
  }
  ~RecordWatch() {
    ctx_.TryCancel();
    thread_.join();
    (void)reader_->Finish();
  }
  /// The record of `type` at `index` once it arrived, nothing after `timeout`.
  std::optional<v1::GuestRecord> At(uint32_t type, size_t index, absl::Duration timeout) {
    std::unique_lock l(mu_);
    if (!cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return by_type_[type].size() > index; })) {
      return std::nullopt;
    }
    return by_type_[type][index];
  }
  size_t Count(uint32_t type) {
    std::lock_guard l(mu_);
    return by_type_[type].size();
  }
  std::vector<v1::GuestRecord> All(uint32_t type) {
    std::lock_guard l(mu_);
    return by_type_[type];
  }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint32_t, std::vector<v1::GuestRecord>> by_type_;
};

// One node's clock as one Lab.ProbeClocks saw it.
struct NodeClock {
  OffsetEstimate estimate;
  uint64_t tsc = 0, tsc_ns = 0;  // the node's (TSC, CLOCK_MONOTONIC) pair
  std::string error;
};
using ClockSnapshot = std::map<std::string, NodeClock>;

absl::StatusOr<ClockSnapshot> ProbeClocks(v1::Lab::Stub& lab, uint32_t samples, const std::string& phase,
                                          std::vector<ClockRecord>* records) {
  v1::ProbeClocksRequest req;
  req.set_samples(samples);
  v1::ProbeClocksResponse resp;
  if (auto s = Call([&](grpc::ClientContext& c) { return lab.ProbeClocks(&c, req, &resp); }); !s.ok()) {
    return FromGrpc(s, "Lab.ProbeClocks (is aggvm-master of this build running?)");
  }
  ClockSnapshot snap;
  for (const auto& n : resp.nodes()) {
    NodeClock c;
    c.error = n.error();
    c.estimate.offset_ns = n.offset_ns();
    c.estimate.uncertainty_ns = n.uncertainty_ns();
    c.estimate.rtt_min_ns = n.rtt_min_ns();
    c.estimate.at_local_ns = n.at_master_ns();
    c.estimate.samples_used = n.samples();
    c.tsc = n.node_tsc();
    c.tsc_ns = n.node_tsc_monotonic_ns();
    snap[n.node()] = c;
    if (records) {
      records->push_back({n.node(), phase, n.offset_ns(), n.uncertainty_ns(), n.rtt_min_ns(), n.samples(), n.error()});
    }
  }
  return snap;
}

// A node's clocks over one configuration: remote CLOCK_MONOTONIC -> master's, and its TSC -> its CLOCK_MONOTONIC.
struct NodeClockMap {
  std::optional<ClockModel> model;
  double uncertainty_ns = 0;  // the larger of the start and end estimates' (the hard bound on the model's offset)
  double tsc_per_ns = 0;
  uint64_t tsc0 = 0, ns0 = 0;

  uint64_t ToMaster(uint64_t node_ns) const { return node_ns == 0 ? 0 : model->ToLocal(node_ns); }
  uint64_t TscToMaster(uint64_t tsc) const {
    const double ns = static_cast<double>(ns0) + (static_cast<double>(tsc) - static_cast<double>(tsc0)) / tsc_per_ns;
    return ns <= 0 ? 0 : ToMaster(static_cast<uint64_t>(std::llround(ns)));
  }
};

absl::StatusOr<std::map<std::string, NodeClockMap>> ClockMaps(const ClockSnapshot& start, const ClockSnapshot& end) {
  std::map<std::string, NodeClockMap> out;
  for (const auto& [node, s] : start) {
    auto e = end.find(node);
    if (e == end.end() || !s.error.empty() || !e->second.error.empty()) continue;
    NodeClockMap m;
    auto model = ClockModel::FromStartEnd(s.estimate, e->second.estimate);
    m.model = model.ok() ? *model : ClockModel(s.estimate);
    m.uncertainty_ns = std::max(s.estimate.uncertainty_ns, e->second.estimate.uncertainty_ns);
    if (e->second.tsc_ns <= s.tsc_ns + 1'000'000 || e->second.tsc <= s.tsc) {
      return absl::InternalError(fmt::format("node '{}': the TSC pairs at start and end are too close to fit its rate",
                                             node));
    }
    m.tsc_per_ns = static_cast<double>(e->second.tsc - s.tsc) / static_cast<double>(e->second.tsc_ns - s.tsc_ns);
    m.tsc0 = s.tsc;
    m.ns0 = s.tsc_ns;
    out[node] = m;
  }
  return out;
}

v1::VmSpec SpecFor(const Experiment& e, const Configuration& c, const std::string& vm,
                   const std::vector<std::string>& nodes) {
  v1::VmSpec spec;
  spec.set_name(vm);
  spec.set_vcpus(static_cast<uint32_t>(nodes.size()));
  for (size_t i = 0; i < nodes.size(); ++i) {
    auto* p = spec.add_placement();
    p->set_node(nodes[i]);
    p->add_vcpus(static_cast<uint32_t>(i));
  }
  spec.set_memory_mib(64);
  spec.set_irqchip(c.irqchip == "user" ? v1::IRQCHIP_MODE_USER : v1::IRQCHIP_MODE_KERNEL);
  spec.set_transport(c.transport == "rdma" ? v1::TRANSPORT_KIND_RDMA : v1::TRANSPORT_KIND_TCP);
  spec.set_wait_mode(c.transport == "tcp-epoll" ? v1::WAIT_MODE_EVENT : v1::WAIT_MODE_BUSY_POLL);
  spec.set_route_mode(c.route_mode == "direct" ? v1::ROUTE_MODE_DIRECT : v1::ROUTE_MODE_VIA_MASTER);
  spec.set_routing_policy(c.routing_policy == "round-robin"        ? v1::ROUTING_POLICY_ROUND_ROBIN
                          : c.routing_policy == "node-local-first" ? v1::ROUTING_POLICY_NODE_LOCAL_FIRST
                                                                   : v1::ROUTING_POLICY_SDM);
  spec.set_trace(true);
  if (c.workload == "ipi-pingpong") {
    auto* w = spec.mutable_workload();
    w->set_name("ipi-pingpong");
    w->set_iterations(e.warmup + e.samples);
    w->set_ping_vcpu(0);
    w->set_pong_vcpu(1);
    w->set_ipi_vector(kIpiVector);
    return spec;
  }
  if (c.workload == "ipi-broadcast") {  // vCPU 0 sends; the agents compute the answers expected from the destination
    auto* w = spec.mutable_workload();
    w->set_name("ipi-broadcast");
    w->set_iterations(e.warmup + e.samples);
    w->set_ping_vcpu(0);
    w->set_ipi_vector(kIpiVector);
    w->set_dest_kind(e.broadcast_dest);
    return spec;
  }
  spec.mutable_workload()->set_name("irq-sink");
  auto* route = spec.add_interrupt_routes();
  route->set_gsi(kGsi);
  route->set_vector(kVector);
  route->set_trigger(v1::INTERRUPT_TRIGGER_EDGE);
  if (c.routing_policy == "sdm") {  // the last node's vCPU, by physical APIC ID
    route->set_delivery(v1::INTERRUPT_DELIVERY_FIXED);
    route->set_dest_mode(v1::DESTINATION_MODE_PHYSICAL);
    route->set_destination(static_cast<uint32_t>(nodes.size() - 1));
  } else {  // any vCPU but the first node's: the policy chooses (x2APIC logical cluster 0, bit i = vCPU i)
    route->set_delivery(v1::INTERRUPT_DELIVERY_LOWEST_PRIORITY);
    route->set_dest_mode(v1::DESTINATION_MODE_LOGICAL);
    route->set_destination(((1u << nodes.size()) - 1) & ~1u);
  }
  return spec;
}

struct Doorbell {
  uint64_t rpc_ns = 0;   // runner's clock, before the RPC (the master's on one machine)
  uint64_t sent_ns = 0;  // master's clock: the raise request left the master (RingDoorbellResponse.sent_ns)
  bool traced = true;
  v1::GuestRecord irq, trace;
};

// One traced interrupt with its stamps mapped to the master's clock.
struct MappedTrace {
  std::string target;
  transport::TraceBlock t;
  uint64_t handler = 0;  // 0: no guest-handler stamp
};

// The offset estimates are only good to ±RTT/2 of a control-plane probe (tens of µs), about the size of one hop, so
// on their own they can put a receive before its send. Each node's mapping is refined by the causality of the traced
// messages themselves (CausalBounds: raising node -> master, master -> target node), within the probes' hard bound,
// then the samples are added. The corrections are recorded with the results.
void FitAndAdd(std::vector<MappedTrace>& traces, const std::string& raising,
               const std::map<std::string, NodeClockMap>& maps, ConfigurationResult& out) {
  std::map<std::string, CausalBounds> bounds;
  for (const auto& m : traces) {
    // The frame left node-a at local_controller (older agents: raised, a looser bound).
    bounds[raising].SentToReference(m.t.local_controller != 0 ? m.t.local_controller : m.t.raised,
                                    m.t.master_received);
    bounds[m.target].ReceivedFromReference(m.t.master_decided, m.t.target_received);
  }
  std::map<std::string, double> correction;
  double violations = 0;
  for (const auto& [node, b] : bounds) {
    auto it = maps.find(node);
    const CausalFit f = b.Fit(it == maps.end() ? 0.0 : it->second.uncertainty_ns);
    correction[node] = f.correction_ns;
    out.measurements[fmt::format("clock_causal_correction_ns.{}", node)] = f.correction_ns;
    if (!f.consistent || !f.within_uncertainty) violations += 1;
  }
  out.measurements["clock_causal_violations"] = violations;
  for (auto& m : traces) {
    const double a = correction[raising], b = correction[m.target];
    m.t.raised = ApplyCorrection(m.t.raised, a);
    m.t.local_controller = ApplyCorrection(m.t.local_controller, a);
    m.t.target_received = ApplyCorrection(m.t.target_received, b);
    m.t.injected = ApplyCorrection(m.t.injected, b);
    out.hops.Add(m.t, ApplyCorrection(m.handler, b));
  }
}

class ConfigRun {
 public:
  ConfigRun(v1::Master::Stub& master, v1::Lab::Stub& lab, const Experiment& e, const Configuration& c,
            std::vector<std::string> nodes, std::string vm, const RunOptions& o)
      : master_(master), lab_(lab), e_(e), c_(c), nodes_(std::move(nodes)), vm_(std::move(vm)), o_(o) {}

  // Fills `out`; a non-OK status becomes its status line.
  absl::Status Run(ConfigurationResult& out, std::vector<ClockRecord>* clocks_start,
                   std::vector<ClockRecord>* clocks_end) {
    v1::CreateVmRequest create;
    *create.mutable_spec() = SpecFor(e_, c_, vm_, nodes_);
    v1::VmStatus status;
    if (auto s = Call([&](grpc::ClientContext& ctx) { return master_.CreateVm(&ctx, create, &status); }); !s.ok()) {
      return FromGrpc(s, "CreateVm");
    }
    RecordWatch watch(master_, vm_);
    v1::VmRef ref;
    ref.set_name(vm_);
    if (auto s = Call([&](grpc::ClientContext& ctx) { return master_.StartVm(&ctx, ref, &status); }, 90); !s.ok()) {
      return FromGrpc(s, "StartVm");
    }
    struct StopVm {
      v1::Master::Stub& m;
      v1::VmRef& r;
      ~StopVm() {
        v1::VmStatus st;
        (void)Call([&](grpc::ClientContext& ctx) { return m.StopVm(&ctx, r, &st); });
      }
    } stop{master_, ref};
    // irq-sink vCPUs say HELLO once their IDT and LAPIC are ready (the sender of the IPI workloads does not: its
    // warm-up handshake waits for its peers itself).
    const bool ipi_workload = c_.workload == "ipi-pingpong" || c_.workload == "ipi-broadcast";
    if (!ipi_workload && !watch.At(kHelloRecord, nodes_.size() - 1, absl::Seconds(60))) {
      return absl::DeadlineExceededError(fmt::format("the guest's {} vCPUs did not all say HELLO within 60 s",
                                                     nodes_.size()));
    }
    auto start = ProbeClocks(lab_, e_.clock_samples, "start", clocks_start);
    if (!start.ok()) return start.status();
    absl::Status run;
    if (c_.workload == "doorbell") run = RunDoorbell(watch);
    else if (c_.workload == "storm") run = RunStorm(watch, out);
    else run = WaitRounds(watch, c_.workload == "ipi-broadcast" ? kBroadcastRoundRecord : kPingRoundRecord);
    if (!run.ok()) return run;
    auto end = ProbeClocks(lab_, e_.clock_samples, "end", clocks_end);
    if (!end.ok()) return end.status();
    auto maps = ClockMaps(*start, *end);
    if (!maps.ok()) return maps.status();
    double worst = 0;
    for (const auto& [node, c] : *end) worst = std::max(worst, c.estimate.uncertainty_ns);
    out.measurements["clock_uncertainty_max_ns"] = worst;
    if (c_.workload == "doorbell") return Doorbells(*maps, out);
    if (c_.workload == "storm") return Storm(watch, *maps, out);
    return Rounds(watch, *maps, out, c_.workload == "ipi-broadcast" ? kBroadcastRoundRecord : kPingRoundRecord);
  }

 private:
  grpc::Status Ring(bool traced, uint64_t* sent_ns = nullptr) {
    v1::RingDoorbellRequest req;
    req.set_vm(vm_);
    req.set_node(nodes_.front());
    req.set_gsi(kGsi);
    req.set_asserted(true);
    req.set_traced(traced);
    v1::RingDoorbellResponse resp;
    grpc::Status s = Call([&](grpc::ClientContext& ctx) { return master_.RingDoorbell(&ctx, req, &resp); }, 5);
    if (sent_ns != nullptr) *sent_ns = resp.sent_ns();
    return s;
  }

  grpc::Status RingTrain(uint32_t count, uint32_t interval_us) {
    v1::RingDoorbellRequest req;
    req.set_vm(vm_);
    req.set_node(nodes_.front());
    req.set_gsi(kGsi);
    req.set_asserted(true);
    req.set_traced(true);
    req.set_count(count);
    req.set_interval_us(interval_us);
    v1::RingDoorbellResponse resp;
    return Call([&](grpc::ClientContext& ctx) { return master_.RingDoorbell(&ctx, req, &resp); }, 5);
  }

  absl::Status RunDoorbell(RecordWatch& watch) {
    size_t irq_index = 0, trace_index = 0;
    const absl::Time end = absl::Now() + absl::Seconds(e_.max_seconds);
    // pace_us: ring i is due at t0 + i * pace. A ring whose records came back late starts at once and is counted.
    const uint64_t pace_ns = static_cast<uint64_t>(e_.pace_us * 1e3);
    const uint64_t t0 = MonotonicNanos();
    // trace_cost: rings go in pairs, one of each group per pair, and which one of a pair comes first is drawn from a
    // fixed-seed generator (the same order every run): a strict traced/untraced alternation lets anything periodic on
    // the machine, or what the previous ring left behind, favour one group (the A/A control showed up to 8 %).
    std::mt19937 order(20261206);
    bool traced_first = true;
    for (uint32_t i = 0; i < e_.warmup + e_.samples && absl::Now() < end; ++i) {
      if (pace_ns > 0) {
        const uint64_t due = t0 + uint64_t{i} * pace_ns, now = MonotonicNanos();
        if (now < due) {
          std::this_thread::sleep_for(std::chrono::nanoseconds(due - now));
        } else if (i > 0) {
          pace_overruns_ += 1;
        }
      }
      // trace_cost alternates the two kinds; trace_cost_control keeps the labels but traces neither (an A/A run:
      // the spread of its ratio around 1 is what the harness itself contributes on this machine).
      if (i % 2 == 0) traced_first = (order() & 1u) != 0;
      const bool in_traced_group = !e_.trace_cost || ((i % 2 == 0) == traced_first);
      const bool traced = in_traced_group && !e_.trace_cost_control;
      Doorbell d;
      d.traced = in_traced_group;
      d.rpc_ns = MonotonicNanos();
      if (auto s = Ring(traced, &d.sent_ns); !s.ok()) return FromGrpc(s, "RingDoorbell");
      auto irq = watch.At(kIrqRecord, irq_index, absl::Seconds(2));
      std::optional<v1::GuestRecord> trace;
      if (irq && traced) trace = watch.At(kTraceRecordType, trace_index, absl::Seconds(2));
      if (!irq || (traced && !trace)) {
        lost_ += 1;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let a late record arrive, then skip it
        irq_index = watch.Count(kIrqRecord);
        trace_index = watch.Count(kTraceRecordType);
        continue;
      }
      irq_index += 1;
      if (traced) trace_index += 1;
      d.irq = *irq;
      if (trace) d.trace = *trace;
      if (i >= e_.warmup) doorbells_.push_back(d);
    }
    return absl::OkStatus();
  }

  absl::Status Doorbells(const std::map<std::string, NodeClockMap>& maps, ConfigurationResult& out) {
    auto raising = maps.find(nodes_.front());
    if (raising == maps.end()) return absl::InternalError(fmt::format("no clock for node '{}'", nodes_.front()));
    // The runner's clock -> the master's: the runner and the master share a machine in local runs; against a remote
    // master the RPC stamps only serve the trace-cost comparison (a constant offset cancels in the ratio).
    std::vector<double> on_ns, off_ns;          // RPC issued -> guest handler
    std::vector<double> on_sent_ns, off_sent_ns;  // the master asked node-a to raise -> guest handler (no RPC in it)
    std::vector<MappedTrace> traced;
    uint64_t rejected = 0;
    for (const auto& d : doorbells_) {
      auto target = maps.find(d.irq.node());
      if (d.irq.a() != kVector || target == maps.end() || d.irq.node() == nodes_.front()) {
        rejected += 1;
        continue;
      }
      const uint64_t handler = target->second.TscToMaster(d.irq.b());
      if (handler == 0) {
        rejected += 1;
        continue;
      }
      (d.traced ? on_ns : off_ns).push_back(static_cast<double>(handler) - static_cast<double>(d.rpc_ns));
      if (d.sent_ns != 0) {
        (d.traced ? on_sent_ns : off_sent_ns).push_back(static_cast<double>(handler) - static_cast<double>(d.sent_ns));
      }
      if (!d.traced || e_.trace_cost_control) continue;
      transport::TraceBlock t = DecodeTraceRecord(d.trace.a(), d.trace.b(), d.trace.c(), d.trace.d());
      t.raised = raising->second.ToMaster(t.raised);
      t.local_controller = raising->second.ToMaster(t.local_controller);
      t.target_received = target->second.ToMaster(t.target_received);
      t.injected = target->second.ToMaster(t.injected);
      traced.push_back({d.irq.node(), t, handler});
    }
    FitAndAdd(traced, nodes_.front(), maps, out);
    out.measurements["samples_lost"] = static_cast<double>(lost_);
    if (e_.pace_us > 0) {
      out.measurements["pace_us"] = e_.pace_us;
      out.measurements["pace_overruns"] = static_cast<double>(pace_overruns_);
    }
    out.measurements["samples_rejected"] = static_cast<double>(rejected);
    auto p50 = [](std::vector<double>& v) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : v[(v.size() - 1) / 2];
    };
    if (e_.trace_cost) {
      // The primary comparison starts when the master sends the raise request to node-a (RingDoorbellResponse
      // .sent_ns): the gRPC call, ~10x longer than the path and as noisy, stays out of it. The RPC-based one is kept.
      const double on = p50(on_ns), off = p50(off_ns);
      out.measurements["trace_on_rpc_to_handler_p50_ns"] = on;
      out.measurements["trace_off_rpc_to_handler_p50_ns"] = off;
      out.measurements["trace_cost_ratio_rpc_p50"] = off > 0 ? on / off : 0;
      out.measurements["trace_on_samples"] = static_cast<double>(on_ns.size());
      out.measurements["trace_off_samples"] = static_cast<double>(off_ns.size());
      const bool have_sent = !on_sent_ns.empty() && !off_sent_ns.empty();
      const double on_sent = p50(on_sent_ns), off_sent = p50(off_sent_ns);
      out.measurements["trace_on_sent_to_handler_p50_ns"] = on_sent;
      out.measurements["trace_off_sent_to_handler_p50_ns"] = off_sent;
      if (have_sent) {
        out.measurements["trace_cost_ratio_p50"] = off_sent > 0 ? on_sent / off_sent : 0;
      } else {  // a master that predates sent_ns
        out.measurements["trace_cost_ratio_p50"] = off > 0 ? on / off : 0;
      }
    } else {
      out.measurements["rpc_to_handler_p50_ns"] = p50(on_ns);
    }
    if (e_.trace_cost_control) {
      out.measurements["trace_cost_control"] = 1;
      if (on_ns.empty() || off_ns.empty()) return absl::UnavailableError("no doorbell came back with its records");
      return absl::OkStatus();
    }
    if (out.hops.samples() == 0) return absl::UnavailableError("no doorbell came back with its records");
    return absl::OkStatus();
  }

  // The storm is one train of traced edges raised by the first node on its own clock (kControl raise-gsi with a
  // count, node-agent/raise_train.h): the rate is the device's, not one RPC per ring's.
  absl::Status RunStorm(RecordWatch& watch, ConfigurationResult& out) {
    const uint32_t interval_us = static_cast<uint32_t>(std::lround(1e6 / e_.storm_rate_hz));
    const uint32_t count = static_cast<uint32_t>(std::lround(e_.storm_rate_hz * e_.storm_seconds));
    const size_t traces_before = watch.Count(kTraceRecordType);
    if (auto s = RingTrain(count, interval_us); !s.ok()) return FromGrpc(s, "RingDoorbell (storm train)");
    // Until every edge's trace record is back, or the counts stop moving once the train's time is over (bounded).
    const absl::Time train_end = absl::Now() + absl::Microseconds(double(count) * interval_us);
    watch.At(kTraceRecordType, traces_before + count - 1, absl::Microseconds(double(count) * interval_us) +
                                                            absl::Seconds(2));
    size_t last = SIZE_MAX;
    for (int i = 0; i < 50 && absl::Now() >= train_end && watch.Count(kTraceRecordType) != last &&
                    watch.Count(kTraceRecordType) < traces_before + count;
         ++i) {
      last = watch.Count(kTraceRecordType);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    const size_t traces = watch.Count(kTraceRecordType) - traces_before;
    double span_s = static_cast<double>(count) * interval_us / 1e6;
    if (traces > 1) {  // the achieved rate, from the first and last raised stamps of this train (the node's clock)
      auto first = watch.At(kTraceRecordType, traces_before, absl::ZeroDuration());
      auto last_rec = watch.At(kTraceRecordType, traces_before + traces - 1, absl::ZeroDuration());
      if (first && last_rec && last_rec->a() > first->a()) {
        span_s = static_cast<double>(last_rec->a() - first->a()) / 1e9 * static_cast<double>(traces) /
                 static_cast<double>(traces - 1);
      }
    }
    out.measurements["rings"] = static_cast<double>(count);
    out.measurements["ring_interval_us"] = interval_us;
    out.measurements["offered_rate_hz"] = e_.storm_rate_hz;
    out.measurements["achieved_rate_hz"] = span_s > 0 ? static_cast<double>(traces) / span_s : 0;
    out.measurements["storm_traces_lost"] = static_cast<double>(count > traces ? count - traces : 0);
    out.measurements["irq_records"] = static_cast<double>(watch.Count(kIrqRecord));
    return absl::OkStatus();
  }

  absl::Status Storm(RecordWatch& watch, const std::map<std::string, NodeClockMap>& maps, ConfigurationResult& out) {
    auto raising = maps.find(nodes_.front());
    if (raising == maps.end()) return absl::InternalError(fmt::format("no clock for node '{}'", nodes_.front()));
    const auto traces = watch.All(kTraceRecordType);
    std::vector<MappedTrace> mapped;
    for (const auto& r : traces) {
      auto target = maps.find(r.node());
      if (target == maps.end()) continue;
      transport::TraceBlock t = DecodeTraceRecord(r.a(), r.b(), r.c(), r.d());
      t.raised = raising->second.ToMaster(t.raised);
      t.local_controller = raising->second.ToMaster(t.local_controller);
      t.target_received = target->second.ToMaster(t.target_received);
      t.injected = target->second.ToMaster(t.injected);
      mapped.push_back({r.node(), t, 0});
    }
    FitAndAdd(mapped, nodes_.front(), maps, out);
    out.measurements["trace_records"] = static_cast<double>(traces.size());
    if (traces.empty()) return absl::UnavailableError("no trace record came back from the storm");
    return absl::OkStatus();
  }

  absl::Status WaitRounds(RecordWatch& watch, uint32_t type) {
    const size_t rounds = e_.warmup + e_.samples;
    if (!watch.At(type, rounds - 1, absl::Seconds(e_.max_seconds))) {
      return absl::DeadlineExceededError(fmt::format("{} of {} {} rounds within {} s", watch.Count(type), rounds,
                                                     c_.workload, e_.max_seconds));
    }
    return absl::OkStatus();
  }

  // PING_ROUND / BCAST_ROUND records (a = round, b = rdtsc before the IPI, c = rdtsc at the (last) answer), both on
  // the sender's node: its TSC rate is all that is needed. The round is end_to_end.
  absl::Status Rounds(RecordWatch& watch, const std::map<std::string, NodeClockMap>& maps, ConfigurationResult& out,
                      uint32_t type) {
    auto sender = maps.find(nodes_.front());
    if (sender == maps.end()) return absl::InternalError(fmt::format("no clock for node '{}'", nodes_.front()));
    for (const auto& r : watch.All(type)) {
      if (r.node() != nodes_.front() || r.a() < e_.warmup || r.c() < r.b()) continue;
      transport::TraceBlock t;
      t.raised = sender->second.TscToMaster(r.b());
      out.hops.Add(t, sender->second.TscToMaster(r.c()));
    }
    out.measurements["metric_end_to_end_is_round_trip"] = 1;
    if (type == kBroadcastRoundRecord) {
      // Every node holds one vCPU; all-including-self also answers itself (a local IPI).
      out.measurements["recipients"] =
          static_cast<double>(e_.broadcast_dest == "all-excluding-self" ? nodes_.size() - 1 : nodes_.size());
    }
    if (out.hops.samples() == 0) return absl::UnavailableError(fmt::format("no {} round came back", c_.workload));
    return absl::OkStatus();
  }

  v1::Master::Stub& master_;
  v1::Lab::Stub& lab_;
  const Experiment& e_;
  const Configuration& c_;
  const std::vector<std::string> nodes_;
  const std::string vm_;
  const RunOptions& o_;
  std::vector<Doorbell> doorbells_;
  uint64_t lost_ = 0;
  uint64_t pace_overruns_ = 0;  // paced rings that started late (the previous ring's records were not back in time)
};

}  // namespace

absl::StatusOr<ExperimentResult> RunExperiment(const Experiment& experiment, const RunOptions& options) {
  auto progress = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };
  auto channel = grpc::CreateChannel(options.master_address, grpc::InsecureChannelCredentials());
  auto master = v1::Master::NewStub(channel);
  auto lab = v1::Lab::NewStub(channel);
  v1::ListNodesRequest lreq;
  v1::ListNodesResponse nodes_resp;
  if (auto s = Call([&](grpc::ClientContext& c) { return master->ListNodes(&c, lreq, &nodes_resp); }, 10); !s.ok()) {
    return FromGrpc(s, fmt::format("cannot reach aggvm-master at {}", options.master_address));
  }
  std::vector<v1::NodeStatus> up;
  for (const auto& n : nodes_resp.nodes()) {
    if (n.health() == v1::NODE_HEALTH_UP) up.push_back(n);
  }
  std::sort(up.begin(), up.end(), [](const auto& a, const auto& b) { return a.node() < b.node(); });
  if (up.size() < experiment.nodes) {
    return absl::FailedPreconditionError(fmt::format("the experiment needs {} UP nodes, the master at {} has {}",
                                                     experiment.nodes, options.master_address, up.size()));
  }
  up.resize(experiment.nodes);
  std::vector<std::string> names;
  for (const auto& n : up) names.push_back(n.node());

  ExperimentResult result;
  result.name = experiment.name;
  result.software_version = std::string(SoftwareVersion());
  result.machine = MachineInfo::Collect();
  result.cluster = options.cluster;
  result.experiment_json = experiment.ToJson().dump();
  const auto configs = experiment.Expand();
  const std::string stem = fmt::format("lab{}", (absl::ToUnixMillis(absl::Now()) ^ ::getpid()) % 1'000'000'000);
  for (size_t k = 0; k < configs.size(); ++k) {
    const Configuration& c = configs[k];
    ConfigurationResult cr;
    cr.config = c.Labels();
    progress(fmt::format("[{}/{}] {}", k + 1, configs.size(), cr.Label()));
    std::string skip;
    if (c.transport == "rdma") {
      for (const auto& n : up) {
        if (!n.capabilities().rdma()) {
          skip = fmt::format("skipped: node '{}' has no RDMA device (ibv_get_device_list found none); use transport "
                             "tcp-busy-poll or tcp-epoll, or load rdma_rxe",
                             n.node());
          break;
        }
      }
    }
    if (!skip.empty()) {
      cr.status = skip;
      progress("  " + skip);
      result.configurations.push_back(std::move(cr));
      continue;
    }
    std::vector<ClockRecord> start, end;
    ConfigRun run(*master, *lab, experiment, c, names, fmt::format("{}-{}", stem, k), options);
    absl::Status st = run.Run(cr, &start, &end);
    if (result.clocks.empty()) result.clocks = start;  // the run's first estimate ...
    if (!end.empty()) {                                // ... and its last
      std::erase_if(result.clocks, [](const ClockRecord& r) { return r.phase == "end"; });
      result.clocks.insert(result.clocks.end(), end.begin(), end.end());
    }
    if (!st.ok()) {
      cr.status = "failed: " + std::string(st.message());
      progress("  " + cr.status);
    } else {
      const auto& e2e = cr.hops.hop(Hop::kEndToEnd).histogram;
      progress(fmt::format("  {} samples, end to end p50 {:.1f} us, p99 {:.1f} us", e2e.count(),
                           static_cast<double>(e2e.Percentile(50)) / 1e3,
                           static_cast<double>(e2e.Percentile(99)) / 1e3));
    }
    result.configurations.push_back(std::move(cr));
  }
  return result;
}

}  // namespace aggvm::lab::runner
