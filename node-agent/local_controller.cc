#include "node-agent/local_controller.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>

#include "common/clock.h"
#include "node-agent/io_forwarder.h"

namespace aggvm::agent {

using transport::ControlPayload;
using transport::DeliverPayload;
using transport::EoiPayload;
using transport::Frame;
using transport::FrameType;
using transport::InterruptPayload;
using transport::IoRequestPayload;
using transport::TraceBlock;

namespace {

// See master/global_controller.cc: hops stamped on another machine may not compare with `raised`; clamp rather
// than make the frame invalid.
uint64_t StampHop(const TraceBlock& t) {
  const uint64_t now = MonotonicNanos();
  if (now <= t.raised) return t.raised + 1;
  if (now - t.raised > std::numeric_limits<uint32_t>::max()) return 0;
  return now;
}

// Spinlock guard for the send lock: held only around one Transport::Send.
class SpinGuard {
 public:
  explicit SpinGuard(std::atomic_flag& f) : f_(f) {
    while (f_.test_and_set(std::memory_order_acquire)) {
      while (f_.test(std::memory_order_relaxed)) __builtin_ia32_pause();
    }
  }
  ~SpinGuard() { f_.clear(std::memory_order_release); }
  SpinGuard(const SpinGuard&) = delete;
  SpinGuard& operator=(const SpinGuard&) = delete;

 private:
  std::atomic_flag& f_;
};

// Forwarded IPIs: APIC IDs up to this bound are looked up in a direct table (256 KiB at most).
constexpr uint32_t kMaxApicIdTable = 1u << 16;

}  // namespace

LocalController::LocalController(LocalControllerConfig config, transport::Transport* transport, VmPort* vm)
    : config_(std::move(config)), transport_(transport), vm_(vm) {}

LocalController::~LocalController() = default;

absl::StatusOr<std::unique_ptr<LocalController>> LocalController::Create(LocalControllerConfig config,
                                                                        transport::Transport* transport,
                                                                        VmPort* vm) {
  if (transport == nullptr || vm == nullptr) {
    return absl::InvalidArgumentError("local controller: transport and VM port must not be null");
  }
  if (config.num_vcpus == 0 || config.num_vcpus > 1024) {
    return absl::InvalidArgumentError(
        fmt::format("local controller: num_vcpus = {} (must be 1..1024)", config.num_vcpus));
  }
  if (config.master == transport->self()) {
    return absl::InvalidArgumentError(
        fmt::format("local controller: the master node id {} is this node's own id", config.master));
  }
  std::unique_ptr<LocalController> c(new LocalController(std::move(config), transport, vm));
  c->owned_.assign(c->config_.num_vcpus, 0);
  for (VcpuIndex v : c->config_.owned) {
    if (v.value() >= c->config_.num_vcpus) {
      return absl::InvalidArgumentError(fmt::format("local controller: owned vCPU {} is outside the VM's {} vCPUs",
                                                    v, c->config_.num_vcpus));
    }
    if (c->owned_[v.value()] != 0) {
      return absl::InvalidArgumentError(fmt::format("local controller: vCPU {} is listed twice as owned", v));
    }
    c->owned_[v.value()] = 1;
  }
  c->pending_ = std::make_unique<std::array<std::atomic<uint32_t>, 256>[]>(c->config_.num_vcpus);
  for (uint32_t i = 0; i < c->config_.num_vcpus; ++i) {
    for (auto& e : c->pending_[i]) e.store(0, std::memory_order_relaxed);
  }
  const LocalControllerConfig& cc = c->config_;
  if (!cc.vcpu_node.empty() && cc.vcpu_node.size() != cc.num_vcpus) {
    return absl::InvalidArgumentError(fmt::format("local controller: vcpu_node lists {} vCPUs, the VM has {}",
                                                  cc.vcpu_node.size(), cc.num_vcpus));
  }
  if (cc.apic_ids.size() != cc.vcpu_node.size()) {
    return absl::InvalidArgumentError(fmt::format(
        "local controller: apic_ids lists {} vCPUs but vcpu_node {}; give both (one per vCPU) or neither",
        cc.apic_ids.size(), cc.vcpu_node.size()));
  }
  uint32_t max_node = cc.master.value();
  uint32_t max_apic = 0;
  for (uint32_t v = 0; v < cc.vcpu_node.size(); ++v) {
    max_node = std::max<uint32_t>(max_node, cc.vcpu_node[v].value());
    if (cc.apic_ids[v].value() >= kMaxApicIdTable) {
      return absl::InvalidArgumentError(fmt::format(
          "local controller: vCPU {} has APIC ID {}; forwarded IPIs support APIC IDs below {}", v, cc.apic_ids[v],
          kMaxApicIdTable));
    }
    max_apic = std::max(max_apic, cc.apic_ids[v].value());
  }
  if (!cc.vcpu_node.empty()) {
    c->vcpu_of_apic_.assign(max_apic + 1, -1);
    for (uint32_t v = 0; v < cc.vcpu_node.size(); ++v) {
      if (c->vcpu_of_apic_[cc.apic_ids[v].value()] >= 0) {
        return absl::InvalidArgumentError(
            fmt::format("local controller: APIC ID {} is given to two vCPUs", cc.apic_ids[v]));
      }
      c->vcpu_of_apic_[cc.apic_ids[v].value()] = static_cast<int32_t>(v);
    }
  }
  c->peer_lock_count_ = max_node + 1;
  c->is_peer_.assign(c->peer_lock_count_, 0);
  for (NodeId n : cc.vcpu_node) c->is_peer_[n.value()] = 1;
  c->peer_locks_ = std::make_unique<std::atomic_flag[]>(c->peer_lock_count_);
  for (size_t i = 0; i < c->peer_lock_count_; ++i) c->peer_locks_[i].clear();
  c->gsi_level_ = std::make_unique<std::atomic<uint8_t>[]>(transport::kMaxGsi);
  for (uint32_t g = 0; g < transport::kMaxGsi; ++g) c->gsi_level_[g].store(0, std::memory_order_relaxed);
  return c;
}

absl::Status LocalController::SendToMaster(Frame& frame) {
  absl::Status s;
  {
    SpinGuard g(send_lock_);
    s = transport_->Send(config_.master, frame);
  }
  if (!s.ok()) counters_.send_failed.Add();
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Device side.

absl::Status LocalController::SendGsiLevel(Gsi gsi, uint8_t level, bool traced, uint64_t raised_ns) {
  Frame f;
  f.type = FrameType::kInterrupt;
  InterruptPayload p;
  p.kind = InterruptPayload::Kind::kGsiLevel;
  p.level = level;
  p.gsi = gsi;
  f.payload = p;
  if (traced) {
    f.flags = transport::kFlagTraced;
    f.trace.trace_id = next_trace_id_.fetch_add(1, std::memory_order_relaxed);
    f.trace.raised = raised_ns;
    f.trace.local_controller = StampHop(f.trace);
  }
  // Caller holds send_lock_.
  absl::Status s = transport_->Send(config_.master, f);
  if (!s.ok()) counters_.send_failed.Add();
  return s;
}

absl::Status LocalController::RaiseEdge(Gsi gsi, bool traced) {
  const uint64_t raised = traced ? MonotonicNanos() : 0;
  if (gsi.value() >= transport::kMaxGsi) {
    return absl::InvalidArgumentError(fmt::format("raise: GSI {} is out of range (below {})", gsi,
                                                  transport::kMaxGsi));
  }
  SpinGuard g(send_lock_);
  // One frame: the master asserts and deasserts the pin (a rising edge). One send and one wake-up of the master per
  // edge, not two — on a node with few cores the second frame's handling competed with the delivery of the first.
  if (auto s = SendGsiLevel(gsi, InterruptPayload::kLevelEdge, traced, raised); !s.ok()) return s;
  gsi_level_[gsi.value()].store(0, std::memory_order_relaxed);
  counters_.raised.Add();
  return absl::OkStatus();
}

absl::Status LocalController::SetLevel(Gsi gsi, bool asserted, bool traced) {
  const uint64_t raised = traced ? MonotonicNanos() : 0;
  if (gsi.value() >= transport::kMaxGsi) {
    return absl::InvalidArgumentError(fmt::format("set level: GSI {} is out of range (below {})", gsi,
                                                  transport::kMaxGsi));
  }
  SpinGuard g(send_lock_);
  // The level check and the send under one hold: two threads changing one GSI reach the master in the order of
  // their effect here.
  auto& level = gsi_level_[gsi.value()];
  if (level.load(std::memory_order_relaxed) == (asserted ? 1 : 0)) {
    counters_.level_unchanged.Add();
    return absl::OkStatus();
  }
  if (auto s = SendGsiLevel(gsi, asserted ? 1 : 0, traced, raised); !s.ok()) return s;
  level.store(asserted ? 1 : 0, std::memory_order_relaxed);
  counters_.raised.Add();
  return absl::OkStatus();
}

absl::Status LocalController::SignalMsi(uint64_t address, uint32_t data, bool traced) {
  Frame f;
  f.type = FrameType::kInterrupt;
  InterruptPayload p;
  p.kind = InterruptPayload::Kind::kMsi;
  p.msi_address = address;
  p.msi_data = data;
  f.payload = p;
  if (traced) {
    f.flags = transport::kFlagTraced;
    f.trace.trace_id = next_trace_id_.fetch_add(1, std::memory_order_relaxed);
    f.trace.raised = MonotonicNanos();
    f.trace.local_controller = StampHop(f.trace);
  }
  absl::Status s = SendToMaster(f);  // INVALID_ARGUMENT (from ValidateFrame) names a bad address/data
  if (s.ok()) counters_.msis_sent.Add();
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Guest IPIs to remote vCPUs.

absl::Status LocalController::SendToPeer(NodeId node, Frame& frame) {
  if (node.value() >= peer_lock_count_) {
    counters_.send_failed.Add();
    return absl::InvalidArgumentError(fmt::format("send: node {} is not a node of this VM", node));
  }
  absl::Status s;
  {
    SpinGuard g(peer_locks_[node.value()]);
    s = transport_->Send(node, frame);
  }
  if (!s.ok()) counters_.send_failed.Add();
  return s;
}

namespace {
void StartTrace(Frame& f, uint64_t raised, std::atomic<uint32_t>& next_id) {
  if (raised == 0) return;
  f.flags = transport::kFlagTraced;
  f.trace.trace_id = next_id.fetch_add(1, std::memory_order_relaxed);
  f.trace.raised = raised;
  f.trace.local_controller = StampHop(f.trace);
}
}  // namespace

void LocalController::SendIpiToMaster(transport::IpiPayload& p, uint64_t raised) {
  Frame f;
  f.type = FrameType::kIpi;
  f.payload = p;
  StartTrace(f, raised, next_trace_id_);
  if (SendToMaster(f).ok()) {
    counters_.ipis_via_master.Add();
  } else {
    counters_.ipis_send_failed.Add();
  }
}

void LocalController::SendDirect(VcpuIndex vcpu, irqchip::DeliveryMode mode, Vector vector, uint32_t source,
                                 uint64_t raised) {
  Frame f;
  f.type = FrameType::kDeliver;
  DeliverPayload d;
  d.vcpu = vcpu;
  d.vector = vector;
  // One destination: a lowest-priority message has nothing left to arbitrate.
  d.mode = mode == irqchip::DeliveryMode::kLowestPriority ? irqchip::DeliveryMode::kFixed : mode;
  d.ipi_source_vcpu = source;
  f.payload = d;
  StartTrace(f, raised, next_trace_id_);
  if (SendToPeer(config_.vcpu_node[vcpu.value()], f).ok()) {
    counters_.ipis_direct.Add();
  } else {
    counters_.ipis_send_failed.Add();
  }
}

void LocalController::ForwardIpi(ApicId target, irqchip::DeliveryMode mode, Vector vector) {
  const uint64_t raised = config_.trace_ipis ? MonotonicNanos() : 0;
  if (config_.direct_ipis && !config_.vcpu_node.empty()) {
    const int64_t v = VcpuOfApic(target.value());
    if (v < 0) {
      counters_.ipis_to_nowhere.Add();
      return;
    }
    if (config_.vcpu_node[v] != transport_->self()) {
      SendDirect(VcpuIndex(static_cast<uint32_t>(v)), mode, vector, transport::kIpiSourceProxyResolved, raised);
      return;
    }
    // A proxy never stands for a local vCPU; should the topology say so, the master sorts it out.
  }
  transport::IpiPayload p;
  p.source_vcpu = VcpuIndex(transport::kIpiSourceProxyResolved);
  p.destination = target.value();
  p.vector = vector;
  p.mode = mode;
  SendIpiToMaster(p, raised);
}

void LocalController::ForwardIcr(VcpuIndex source, const irqchip::InterruptMessage& m) {
  using irqchip::DeliveryMode;
  if (m.mode == DeliveryMode::kInit && !m.level && m.trigger == irqchip::TriggerMode::kLevel) {
    // INIT level de-assert: no effect on any processor since the Pentium 4 (SDM vol. 3, 11.6.1); the master's
    // delivery carries no level bit, so forwarding it would become a real INIT on the owner node.
    counters_.init_deasserts_dropped.Add();
    return;
  }
  const uint64_t raised = config_.trace_ipis ? MonotonicNanos() : 0;
  if (config_.direct_ipis && !config_.vcpu_node.empty()) {
    const bool broadcast =
        m.destination == 0xFFFFFFFFu || (!m.x2apic_destination && m.destination == 0xFFu);
    if (m.dest_mode == irqchip::DestMode::kPhysical && m.shorthand == irqchip::Shorthand::kNone && !broadcast &&
        m.mode != DeliveryMode::kLowestPriority && m.mode != DeliveryMode::kSmi && m.mode != DeliveryMode::kExtInt) {
      const int64_t v = VcpuOfApic(m.destination);
      if (v < 0) {
        counters_.ipis_to_nowhere.Add();
        return;
      }
      if (config_.vcpu_node[v] != transport_->self()) {
        SendDirect(VcpuIndex(static_cast<uint32_t>(v)), m.mode, m.vector, source.value(), raised);
        return;
      }
    }
  }
  transport::IpiPayload p;
  p.source_vcpu = source;
  p.destination = m.destination;
  p.vector = m.vector;
  p.mode = m.mode;
  p.dest_logical = m.dest_mode == irqchip::DestMode::kLogical ? 1 : 0;
  p.shorthand = static_cast<uint8_t>(m.shorthand);
  p.level = m.level ? 1 : 0;
  p.trigger_level = m.trigger == irqchip::TriggerMode::kLevel ? 1 : 0;
  SendIpiToMaster(p, raised);
}

void LocalController::ReportPriority(VcpuIndex vcpu, uint8_t ppr) {
  if (vcpu.value() >= ControlPayload::kMaxPriorityVcpus) return;
  Frame f;
  f.type = FrameType::kControl;
  f.payload = ControlPayload{.op = ControlPayload::Op::kPriority, .arg0 = vcpu.value(), .arg1 = ppr};
  if (SendToMaster(f).ok()) counters_.priorities_sent.Add();
}

// ---------------------------------------------------------------------------------------------------------------
// vCPU side.

std::optional<Gsi> LocalController::pending_level(VcpuIndex vcpu, Vector vector) const {
  if (vcpu.value() >= config_.num_vcpus) return std::nullopt;
  const uint32_t e = pending_[vcpu.value()][vector.value()].load(std::memory_order_acquire);
  if (e == 0) return std::nullopt;
  return Gsi(e - 1);
}

void LocalController::OnGuestEoi(VcpuIndex vcpu, Vector vector) {
  if (vcpu.value() >= config_.num_vcpus) {
    counters_.eois_unmatched.Add();
    return;
  }
  // acquire: pairs with the release store made before Inject, so the GSI read is the one injected.
  const uint32_t e = pending_[vcpu.value()][vector.value()].exchange(0, std::memory_order_acq_rel);
  if (e == 0) {
    counters_.eois_unmatched.Add();
    return;
  }
  Frame f;
  f.type = FrameType::kEoi;
  f.payload = EoiPayload{.vcpu = vcpu, .vector = vector, .gsi = Gsi(e - 1)};
  if (SendToMaster(f).ok()) counters_.eois_sent.Add();
}

// ---------------------------------------------------------------------------------------------------------------
// Data-plane thread.

absl::StatusOr<size_t> LocalController::PollOnce() { return Handle(transport_->Poll(batch_)); }

absl::Status LocalController::Run(std::stop_token stop) {
  const std::stop_callback wake_on_stop(stop, [this] { transport_->Wake(); });  // the wait may have no timeout
  absl::Status result;
  while (!stop.stop_requested()) {
    auto n = config_.wait_mode == transport::WaitMode::kBusyPoll ? transport_->Poll(batch_)
                                                                  : transport_->Wait(batch_, config_.idle_wait);
    auto handled = Handle(std::move(n));
    if (!handled.ok()) {
      result = handled.status();
      break;
    }
    if (master_lost()) {
      result = absl::UnavailableError("the master left the data plane (goodbye)");
      break;
    }
  }
  // The train is a sender too: it must be gone before the owner closes the transport (which follows Run's end).
  train_.Stop();
  return result;
}

absl::StatusOr<size_t> LocalController::Handle(absl::StatusOr<size_t> polled) {
  if (!polled.ok()) {
    // Any loss the transport reports is checked against the master with a ping: a lost master ends the node's data
    // plane; a lost peer node (direct route mode) only makes sends to it fail (counted in ipis_send_failed).
    if (polled.status().code() == absl::StatusCode::kUnavailable) {
      Frame ping;
      ping.type = FrameType::kControl;
      ping.payload = ControlPayload{.op = ControlPayload::Op::kPing, .arg0 = 0, .arg1 = 0};
      const absl::Status s = SendToMaster(ping);
      if (s.code() == absl::StatusCode::kUnavailable) {
        MasterLost(s);
        return s;
      }
      return size_t{0};
    }
    return polled.status();
  }
  for (size_t i = 0; i < *polled; ++i) HandleFrame(batch_[i]);
  return *polled;
}

void LocalController::MasterLost(const absl::Status& why) {
  if (master_lost_.exchange(true, std::memory_order_acq_rel)) return;
  counters_.master_lost.Add();
  if (io_forwarder_ != nullptr) io_forwarder_->FailAll(why);
}

void LocalController::HandleFrame(transport::ReceivedFrame& rf) {
  counters_.frames_received.Add();
  Frame& f = rf.frame;
  if (f.type == FrameType::kDeliver) {
    if (rf.from != config_.master) {
      // Direct route mode: only the VM's other nodes may deliver here.
      if (!config_.vcpu_node.empty() &&
          (rf.from.value() >= is_peer_.size() || is_peer_[rf.from.value()] == 0)) {
        counters_.dropped_unknown_peer.Add();
        return;
      }
      counters_.direct_received.Add();
    }
    if (const auto* p = std::get_if<DeliverPayload>(&f.payload)) return HandleDeliver(*p, f);
  } else if (rf.from == config_.master) {
    switch (f.type) {
      case FrameType::kControl:
        if (const auto* p = std::get_if<ControlPayload>(&f.payload)) return HandleControl(*p);
        break;
      case FrameType::kIoResponse:
        if (const auto* p = std::get_if<IoRequestPayload>(&f.payload)) {
          if (io_forwarder_ == nullptr) {
            counters_.dropped_no_forwarder.Add();
            return;
          }
          counters_.io_responses.Add();
          io_forwarder_->OnResponse(*p);
          return;
        }
        break;
      default: break;
    }
  }
  counters_.dropped_unexpected.Add();
}

void LocalController::HandleDeliver(const DeliverPayload& p, Frame& f) {
  if (p.vcpu.value() >= config_.num_vcpus) {
    counters_.dropped_unknown_vcpu.Add();
    return;
  }
  if (owned_[p.vcpu.value()] == 0) {
    counters_.dropped_not_owned.Add();
    return;
  }
  if (f.traced()) f.trace.target_received = StampHop(f.trace);
  const bool level = p.level_triggered != 0;
  if (level) {
    // Recorded before the injection (release): the guest's EOI may race with our return from Inject.
    pending_[p.vcpu.value()][p.vector.value()].store(p.gsi.value() + 1, std::memory_order_release);
  }
  const absl::Status s = vm_->Inject(p.vcpu, p.vector, p.mode, level);
  if (!s.ok()) {
    counters_.inject_failed.Add();
    if (level) pending_[p.vcpu.value()][p.vector.value()].store(0, std::memory_order_relaxed);
    return;
  }
  counters_.delivered.Add();
  if (level) counters_.level_delivered.Add();
  switch (p.mode) {
    case irqchip::DeliveryMode::kNmi: counters_.delivered_nmi.Add(); break;
    case irqchip::DeliveryMode::kInit: counters_.delivered_init.Add(); break;
    case irqchip::DeliveryMode::kStartup: counters_.delivered_sipi.Add(); break;
    default: break;
  }
  if (f.traced()) {
    f.trace.injected = StampHop(f.trace);
    if (config_.on_trace) config_.on_trace(f.trace);
  }
}

void LocalController::HandleControl(const ControlPayload& p) {
  switch (p.op) {
    case ControlPayload::Op::kRaiseGsi: {
      // The frame decoder already checked arg0 < kMaxGsi and the flag bits (transport/frame.cc).
      const Gsi gsi(static_cast<uint32_t>(p.arg0));
      const bool traced = (p.arg1 & ControlPayload::kRaiseTraced) != 0;
      if (const uint32_t count = ControlPayload::TrainCount(p.arg1); count != 0) {
        // A train of edges (the decoder checked: edge, count, interval): raised from the train's thread, each
        // stamped `raised` there. Starting it replaces a running one (a short join: that thread wakes at once).
        train_.Start(count, absl::Microseconds(ControlPayload::TrainIntervalUs(p.arg1)), [this, gsi, traced] {
          (void)RaiseEdge(gsi, traced);  // a failed send is counted in send_failed
          counters_.train_raises.Add();
        });
        counters_.trains.Add();
        counters_.control_raises.Add();
        return;
      }
      const absl::Status s = (p.arg1 & ControlPayload::kRaiseLevel)
                                 ? SetLevel(gsi, (p.arg1 & ControlPayload::kRaiseAssert) != 0, traced)
                                 : RaiseEdge(gsi, traced);
      if (s.ok()) {
        counters_.control_raises.Add();
      } else {
        counters_.dropped_bad_control.Add();
      }
      return;
    }
    case ControlPayload::Op::kPing:
    case ControlPayload::Op::kPong:
      counters_.pings.Add();
      return;
    case ControlPayload::Op::kGoodbye:
      MasterLost(absl::UnavailableError("the master said goodbye on the data plane"));
      return;
    case ControlPayload::Op::kHello:
    case ControlPayload::Op::kPriority:  // node -> master only
      break;
  }
  counters_.dropped_bad_control.Add();
}

}  // namespace aggvm::agent
