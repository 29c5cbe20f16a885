#include "master/global_controller.h"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <limits>

#include "common/clock.h"
#include "irqchip/destination.h"

namespace aggvm::master {

using irqchip::DeliveryMode;
using irqchip::DestMode;
using irqchip::InterruptMessage;
using irqchip::TriggerMode;
using transport::ControlPayload;
using transport::DeliverPayload;
using transport::EoiPayload;
using transport::Frame;
using transport::FrameType;
using transport::InterruptPayload;
using transport::IoRequestPayload;
using transport::IpiPayload;
using transport::TraceBlock;

namespace {

constexpr uint32_t kNoIpiSource = 0xffffffff;

// A trace hop taken now. Hops of one trace may be stamped on different machines whose CLOCK_MONOTONIC are not
// comparable; the frame format wants raised < hop <= raised + 2^32 - 1, so an out-of-range stamp is clamped (too
// early: raised + 1) or left out (too late: 0 = not reached) rather than making the frame invalid.
uint64_t StampHop(const TraceBlock& t) {
  const uint64_t now = MonotonicNanos();
  if (now <= t.raised) return t.raised + 1;
  if (now - t.raised > std::numeric_limits<uint32_t>::max()) return 0;
  return now;
}

uint64_t SizeMask(uint8_t size) { return size >= 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * size)) - 1; }

}  // namespace

VcpuPlacement X2apicVcpu(NodeId node, ApicId id) {
  VcpuPlacement p;
  p.node = node;
  p.apic.id = id;
  p.apic.x2apic = true;
  p.apic.ldr = irqchip::X2apicLdrFromId(id);
  p.apic.enabled = true;
  return p;
}

uint64_t RedirectionEntry(Vector vector, DeliveryMode mode, DestMode dest_mode, TriggerMode trigger,
                          uint8_t destination, bool masked) {
  using irqchip::IoApic;
  uint64_t e = vector.value();
  e |= static_cast<uint64_t>(mode) << IoApic::kRteDeliveryModeShift;
  if (dest_mode == DestMode::kLogical) e |= IoApic::kRteDestLogical;
  if (trigger == TriggerMode::kLevel) e |= IoApic::kRteLevel;
  if (masked) e |= IoApic::kRteMask;
  e |= static_cast<uint64_t>(destination) << IoApic::kRteDestShift;
  return e;
}

// The IoApic's side effects: a pin fired -> route it. Synchronous, on the data-plane thread.
class GlobalController::BusSink final : public irqchip::InterruptSink {
 public:
  explicit BusSink(GlobalController* c) : c_(c) {}
  void SendMessage(const InterruptMessage& message, std::optional<Gsi> gsi) override {
    NodeId source = c_->ctx_.source;
    if (gsi) {
      const uint32_t pin = gsi->value() - c_->ioapic_->gsi_base().value();
      if (pin < c_->pin_source_.size()) source = c_->pin_source_[pin];
    }
    c_->RouteAndDeliver(message, gsi, source, c_->ctx_.trace, kNoIpiSource);
  }
  // The IoApic only ever calls SendMessage.
  void Deliver(VcpuIndex, NodeId, const InterruptMessage&) override {}
  void BroadcastEoi(Vector) override {}
  void Forward(NodeId, const InterruptMessage&) override {}

 private:
  GlobalController* c_;
};

class GlobalController::DoorbellPort final : public DoorbellTarget {
 public:
  explicit DoorbellPort(GlobalController* c) : c_(c) {}
  absl::Status RaiseOnNode(NodeId node, Gsi gsi, TriggerMode trigger, bool asserted, bool traced,
                           RingTrain train) override {
    return c_->RaiseOnNode(node, gsi, trigger, asserted, traced, train);
  }

 private:
  GlobalController* c_;
};

struct GlobalController::CommandState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  absl::Status status;
};

GlobalController::GlobalController(GlobalControllerConfig config, transport::Transport* transport)
    : config_(std::move(config)), transport_(transport) {}

GlobalController::~GlobalController() {
  std::deque<Command> left;
  {
    std::lock_guard<std::mutex> l(command_mu_);
    left.swap(commands_);
  }
  for (auto& c : left) {
    std::lock_guard<std::mutex> l(c.state->mu);
    c.state->done = true;
    c.state->status = absl::CancelledError("the global controller was destroyed before running the command");
    c.state->cv.notify_all();
  }
}

absl::StatusOr<std::unique_ptr<GlobalController>> GlobalController::Create(GlobalControllerConfig config,
                                                                          transport::Transport* transport) {
  if (transport == nullptr) return absl::InvalidArgumentError("global controller: transport is null");
  std::unique_ptr<GlobalController> c(new GlobalController(std::move(config), transport));
  if (auto s = c->Init(); !s.ok()) return s;
  return c;
}

absl::Status GlobalController::Init() {
  if (config_.nodes.empty()) {
    return absl::InvalidArgumentError("global controller: no nodes; list the agent nodes of the VM");
  }
  if (config_.nodes.size() > 1024) {
    return absl::InvalidArgumentError(fmt::format("global controller: {} nodes, at most 1024", config_.nodes.size()));
  }
  node_index_.assign(size_t{1} << 16, -1);
  for (size_t i = 0; i < config_.nodes.size(); ++i) {
    const NodeId n = config_.nodes[i];
    if (n == transport_->self()) {
      return absl::InvalidArgumentError(
          fmt::format("global controller: node {} is the master itself; list only agent nodes", n));
    }
    if (node_index_[n.value()] >= 0) {
      return absl::InvalidArgumentError(fmt::format("global controller: node {} is listed twice", n));
    }
    node_index_[n.value()] = static_cast<int16_t>(i);
  }
  node_lost_ = std::make_unique<std::atomic<bool>[]>(config_.nodes.size());
  for (size_t i = 0; i < config_.nodes.size(); ++i) node_lost_[i].store(false);

  vcpus_ = config_.vcpus;
  std::vector<irqchip::VcpuInfo> infos;
  infos.reserve(vcpus_.size());
  for (size_t i = 0; i < vcpus_.size(); ++i) {
    if (NodeIndex(vcpus_[i].node) < 0) {
      return absl::InvalidArgumentError(fmt::format(
          "global controller: vcpus[{}] is placed on node {}, which is not in the node list", i, vcpus_[i].node));
    }
    infos.push_back(irqchip::VcpuInfo{vcpus_[i].node, vcpus_[i].apic, 0});
  }
  auto router = irqchip::Router::Create(std::move(infos), config_.router);
  if (!router.ok()) {
    return absl::InvalidArgumentError(
        fmt::format("global controller: bad topology: {}", std::string(router.status().message())));
  }
  router_.emplace(*std::move(router));
  deliveries_.resize(vcpus_.size());

  bus_sink_ = std::make_unique<BusSink>(this);
  auto ioapic = irqchip::IoApic::Create(config_.ioapic, bus_sink_.get());
  if (!ioapic.ok()) {
    return absl::InvalidArgumentError(fmt::format("global controller: bad ioapic config: {}",
                                                  std::string(ioapic.status().message())));
  }
  ioapic_.emplace(*std::move(ioapic));
  pin_source_.assign(ioapic_->pins(), config_.nodes.front());
  if (config_.ioapic.gsi_base.value() + ioapic_->pins() > transport::kMaxGsi) {
    return absl::InvalidArgumentError(fmt::format("global controller: ioapic GSIs {}..{} pass the wire limit {}",
                                                  config_.ioapic.gsi_base, config_.ioapic.gsi_base.value() +
                                                  ioapic_->pins() - 1, transport::kMaxGsi));
  }
  for (const PinProgram& p : config_.pins) {
    if (auto s = ProgramPinNow(p); !s.ok()) return s;
  }

  uart_ = std::make_unique<ConsoleUart>(static_cast<uint32_t>(vcpus_.size()), config_.console, config_.console_base);
  doorbell_port_ = std::make_unique<DoorbellPort>(this);
  doorbell_ = std::make_unique<Doorbell>(doorbell_port_.get(), config_.doorbell_base);
  if (auto s = pio_.Add(uart_.get()); !s.ok()) return s;
  if (auto s = pio_.Add(doorbell_.get()); !s.ok()) return s;
  return absl::OkStatus();
}

NodeId GlobalController::self() const { return transport_->self(); }

bool GlobalController::node_lost(NodeId node) const {
  const int i = NodeIndex(node);
  return i >= 0 && node_lost_[i].load(std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------------------------
// Commands from other threads.

absl::Status GlobalController::Execute(std::function<absl::Status()> fn, absl::Duration timeout) {
  if (poll_thread_.load(std::memory_order_relaxed) == std::this_thread::get_id()) return fn();
  auto state = std::make_shared<CommandState>();
  {
    std::lock_guard<std::mutex> l(command_mu_);
    commands_.push_back(Command{std::move(fn), state});
    has_commands_.store(true, std::memory_order_release);
  }
  // Event mode: the data-plane thread may be asleep in Wait (without a timeout by default); the command wakes it.
  transport_->Wake();
  std::unique_lock<std::mutex> l(state->mu);
  if (!state->cv.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return state->done; })) {
    return absl::DeadlineExceededError(
        fmt::format("the master's data-plane thread did not run the command within {}; is the global controller's "
                    "Run() (or PollOnce loop) running?", absl::FormatDuration(timeout)));
  }
  return state->status;
}

void GlobalController::RunCommands() {
  if (!has_commands_.load(std::memory_order_acquire)) return;
  std::deque<Command> cmds;
  {
    std::lock_guard<std::mutex> l(command_mu_);
    cmds.swap(commands_);
    has_commands_.store(false, std::memory_order_relaxed);
  }
  for (auto& c : cmds) {
    absl::Status s = c.fn();
    std::lock_guard<std::mutex> l(c.state->mu);
    c.state->status = std::move(s);
    c.state->done = true;
    c.state->cv.notify_all();
  }
}

absl::Status GlobalController::Ring(NodeId node, Gsi gsi, TriggerMode trigger, bool asserted, bool traced,
                                    absl::Duration timeout, RingTrain train) {
  return Execute([this, node, gsi, trigger, asserted, traced, train] {
    return doorbell_->Ring(node, gsi, trigger, asserted, traced, train);
  }, timeout);
}

absl::Status GlobalController::SetRoutingPolicy(irqchip::RoutingPolicy policy, absl::Duration timeout) {
  return Execute([this, policy] {
    irqchip::RouterConfig c = router_->config();
    c.policy = policy;
    return RebuildRouter(c);
  }, timeout);
}

absl::Status GlobalController::ProgramPin(PinProgram pin, absl::Duration timeout) {
  return Execute([this, pin] { return ProgramPinNow(pin); }, timeout);
}

absl::Status GlobalController::ProgramPinNow(PinProgram pin) {
  if (pin.pin >= ioapic_->pins()) {
    return absl::InvalidArgumentError(
        fmt::format("ioapic pin {} does not exist (the ioapic has {} pins)", pin.pin, ioapic_->pins()));
  }
  if ((pin.entry & irqchip::IoApic::kRteReserved) != 0 || (pin.entry & irqchip::IoApic::kRteReadOnly) != 0) {
    return absl::InvalidArgumentError(fmt::format(
        "ioapic pin {}: redirection entry {:#x} sets reserved or read-only bits", pin.pin, pin.entry));
  }
  const uint32_t mode = (pin.entry >> irqchip::IoApic::kRteDeliveryModeShift) & 7;
  if (mode == 3 || mode == 6) {
    return absl::InvalidArgumentError(
        fmt::format("ioapic pin {}: delivery mode {} is reserved for redirection entries", pin.pin, mode));
  }
  const auto index = static_cast<uint8_t>(irqchip::IoApic::kRegRedirectionBase + 2 * pin.pin);
  // High dword (destination) first, so the pin is never unmasked with a stale destination.
  ctx_.source = pin_source_[pin.pin];
  ioapic_->WriteRegister(static_cast<uint8_t>(index + 1), static_cast<uint32_t>(pin.entry >> 32));
  ioapic_->WriteRegister(index, static_cast<uint32_t>(pin.entry));
  ctx_ = {};
  return absl::OkStatus();
}

absl::Status GlobalController::SetVcpuPriority(VcpuIndex vcpu, uint8_t priority, absl::Duration timeout) {
  return Execute([this, vcpu, priority] { return router_->UpdatePriority(vcpu, priority); }, timeout);
}

absl::Status GlobalController::PinVector(Vector vector, std::optional<VcpuIndex> vcpu, absl::Duration timeout) {
  return Execute([this, vector, vcpu] {
    if (auto s = router_->PinVector(vector, vcpu); !s.ok()) return s;
    std::erase_if(vector_pins_, [&](const auto& p) { return p.first == vector; });
    if (vcpu) vector_pins_.emplace_back(vector, *vcpu);
    return absl::OkStatus();
  }, timeout);
}

absl::Status GlobalController::PinGsi(Gsi gsi, std::optional<VcpuIndex> vcpu, absl::Duration timeout) {
  return Execute([this, gsi, vcpu] {
    if (auto s = router_->PinGsi(gsi, vcpu); !s.ok()) return s;
    std::erase_if(gsi_pins_, [&](const auto& p) { return p.first == gsi; });
    if (vcpu) gsi_pins_.emplace_back(gsi, *vcpu);
    return absl::OkStatus();
  }, timeout);
}

absl::StatusOr<RoutingTable> GlobalController::GetRoutingTable(absl::Duration timeout) {
  auto table = std::make_shared<RoutingTable>();
  absl::Status s = Execute([this, table] {
    using irqchip::IoApic;
    table->policy = router_->config().policy;
    table->focus_processor = router_->config().focus_processor;
    for (uint32_t pin = 0; pin < ioapic_->pins(); ++pin) {
      const uint64_t e = ioapic_->redirection_entry(pin);
      RoutingTablePin p;
      p.pin = pin;
      p.gsi = Gsi(ioapic_->gsi_base().value() + pin);
      p.entry = e;
      p.vector = Vector(static_cast<uint8_t>(e & IoApic::kRteVector));
      p.mode = static_cast<DeliveryMode>((e >> IoApic::kRteDeliveryModeShift) & 7);
      p.dest_mode = (e & IoApic::kRteDestLogical) ? DestMode::kLogical : DestMode::kPhysical;
      p.trigger = (e & IoApic::kRteLevel) ? TriggerMode::kLevel : TriggerMode::kEdge;
      p.destination = static_cast<uint8_t>(e >> IoApic::kRteDestShift);
      p.masked = (e & IoApic::kRteMask) != 0;
      p.remote_irr = (e & IoApic::kRteRemoteIrr) != 0;
      p.input = ioapic_->input(pin);
      table->pins.push_back(p);
    }
    table->vector_pins = vector_pins_;
    table->gsi_pins = gsi_pins_;
    return absl::OkStatus();
  }, timeout);
  if (!s.ok()) return s;
  return std::move(*table);
}

absl::Status GlobalController::FlushConsole(absl::Duration timeout) {
  return Execute([this] {
    uart_->Flush();
    return absl::OkStatus();
  }, timeout);
}

absl::Status GlobalController::RebuildRouter(irqchip::RouterConfig config) {
  // The Router's policy is fixed at creation: build a new one from the current per-vCPU state (node, addressing,
  // priority) and re-apply the static pins. Focus-processor state (vectors pending per vCPU) starts empty.
  std::vector<irqchip::VcpuInfo> infos;
  infos.reserve(router_->vcpu_count());
  for (uint32_t i = 0; i < router_->vcpu_count(); ++i) infos.push_back(router_->vcpu(VcpuIndex(i)));
  auto r = irqchip::Router::Create(std::move(infos), config);
  if (!r.ok()) return r.status();
  for (const auto& [v, cpu] : vector_pins_) {
    if (auto s = r->PinVector(v, cpu); !s.ok()) return s;
  }
  for (const auto& [g, cpu] : gsi_pins_) {
    if (auto s = r->PinGsi(g, cpu); !s.ok()) return s;
  }
  router_.emplace(*std::move(r));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------------------------
// The data plane.

absl::StatusOr<size_t> GlobalController::PollOnce() {
  poll_thread_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  RunCommands();
  return Handle(transport_->Poll(batch_));
}

absl::Status GlobalController::Run(std::stop_token stop) {
  poll_thread_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  const std::stop_callback wake_on_stop(stop, [this] { transport_->Wake(); });  // the wait may have no timeout
  absl::Status result;
  while (!stop.stop_requested()) {
    RunCommands();
    auto n = config_.wait_mode == transport::WaitMode::kBusyPoll ? transport_->Poll(batch_)
                                                                  : transport_->Wait(batch_, config_.idle_wait);
    auto handled = Handle(std::move(n));
    if (!handled.ok()) {
      result = handled.status();
      break;
    }
  }
  RunCommands();
  poll_thread_.store(std::thread::id(), std::memory_order_relaxed);
  return result;
}

absl::StatusOr<size_t> GlobalController::Handle(absl::StatusOr<size_t> polled) {
  if (!polled.ok()) {
    if (polled.status().code() == absl::StatusCode::kUnavailable) {
      FindLostNodes();
      return size_t{0};
    }
    return polled.status();
  }
  for (size_t i = 0; i < *polled; ++i) HandleFrame(batch_[i]);
  return *polled;
}

void GlobalController::HandleFrame(transport::ReceivedFrame& rf) {
  counters_.frames_received.Add();
  const NodeId from = rf.from;
  if (NodeIndex(from) < 0) {
    counters_.dropped_unknown_node.Add();
    return;
  }
  // The batch is ours: the trace block is stamped in place and travels on in the deliveries.
  Frame& f = rf.frame;
  TraceBlock* trace = nullptr;
  if (f.traced()) {
    f.trace.master_received = StampHop(f.trace);
    trace = &f.trace;
  }
  switch (f.type) {
    case FrameType::kInterrupt:
      if (const auto* p = std::get_if<InterruptPayload>(&f.payload)) return HandleInterrupt(from, *p, trace);
      break;
    case FrameType::kIpi:
      if (const auto* p = std::get_if<IpiPayload>(&f.payload)) return HandleIpi(from, *p, trace);
      break;
    case FrameType::kEoi:
      if (const auto* p = std::get_if<EoiPayload>(&f.payload)) return HandleEoi(from, *p);
      break;
    case FrameType::kIoRequest:
      if (const auto* p = std::get_if<IoRequestPayload>(&f.payload)) return HandleIo(from, *p);
      break;
    case FrameType::kControl:
      if (const auto* p = std::get_if<ControlPayload>(&f.payload)) {
        if (p->op == ControlPayload::Op::kPing || p->op == ControlPayload::Op::kPong) {
          counters_.pings.Add();
          return;
        }
        if (p->op == ControlPayload::Op::kPriority) {
          // The decoder checked arg0 < 1024 and arg1 <= 255; the vCPU must exist and run on the sender.
          if (p->arg0 >= router_->vcpu_count()) {
            counters_.dropped_unknown_vcpu.Add();
          } else if (router_->vcpu(VcpuIndex(static_cast<uint32_t>(p->arg0))).node != from) {
            counters_.dropped_wrong_node.Add();
          } else {
            (void)router_->UpdatePriority(VcpuIndex(static_cast<uint32_t>(p->arg0)), static_cast<uint8_t>(p->arg1));
            counters_.priorities.Add();
          }
          return;
        }
        if (p->op == ControlPayload::Op::kGoodbye) {
          NodeLost(from, absl::UnavailableError(fmt::format("node {} said goodbye on the data plane", from)));
          return;
        }
      }
      break;
    case FrameType::kDeliver:
    case FrameType::kIoResponse:
      break;
  }
  counters_.dropped_unexpected_type.Add();
}

void GlobalController::HandleInterrupt(NodeId from, const InterruptPayload& p, TraceBlock* trace) {
  if (p.kind == InterruptPayload::Kind::kMsi) {
    const irqchip::MsiDecodeResult r = irqchip::DecodeMsiRaw(p.msi_address, p.msi_data, config_.msi);
    if (!r.ok()) {
      counters_.dropped_bad_msi.Add();
      return;
    }
    counters_.msis.Add();
    RouteAndDeliver(r.message, std::nullopt, from, trace, kNoIpiSource);
    return;
  }
  const uint32_t base = ioapic_->gsi_base().value();
  if (p.gsi.value() < base || p.gsi.value() - base >= ioapic_->pins()) {
    counters_.dropped_unknown_gsi.Add();
    return;
  }
  const uint32_t pin = p.gsi.value() - base;
  counters_.gsi_changes.Add();
  pin_source_[pin] = from;
  ctx_ = Context{from, trace};
  if (p.level == InterruptPayload::kLevelEdge) {
    // One rising edge (82093AA 3.2.4: an edge-triggered pin fires on the rising edge; a level-triggered pin sees a
    // short pulse, delivered once as a level interrupt).
    ioapic_->SetPinLevel(pin, true);  // may call BusSink::SendMessage -> RouteAndDeliver
    ctx_.trace = nullptr;
    ioapic_->SetPinLevel(pin, false);
  } else {
    ioapic_->SetPinLevel(pin, p.level != 0);
  }
  ctx_ = {};
}

void GlobalController::HandleIpi(NodeId from, const IpiPayload& p, TraceBlock* trace) {
  if (p.mode == irqchip::DeliveryMode::kInit && p.level == 0 && p.trigger_level != 0) {
    // INIT level de-assert: no effect (SDM vol. 3, 11.6.1); a kDeliver carries no level bit and would become an INIT.
    counters_.init_deasserts.Add();
    return;
  }
  const uint32_t src = p.source_vcpu.value();
  if (src == transport::kIpiSourceProxyResolved) {
    // Caught by a proxy vCPU on `from` (docs/proxy.md): the node's KVM already resolved the destination to this one
    // APIC ID, and the sender is unknown. The decoder let it through only as physical without shorthand; checked
    // again here because the Router would otherwise read `source` for a shorthand.
    if (p.dest_logical != 0 || p.shorthand != 0) {
      counters_.dropped_unknown_vcpu.Add();
      return;
    }
    InterruptMessage m;
    m.vector = p.vector;
    m.mode = p.mode;
    m.dest_mode = DestMode::kPhysical;
    m.trigger = p.trigger_level ? TriggerMode::kLevel : TriggerMode::kEdge;
    m.level = p.level != 0;
    m.destination = p.destination;
    m.x2apic_destination = true;  // a full APIC ID, not an 8-bit xAPIC destination field
    counters_.ipis.Add();
    counters_.ipis_proxy_resolved.Add();
    RouteAndDeliver(m, std::nullopt, from, trace, kNoIpiSource);
    return;
  }
  if (src >= router_->vcpu_count()) {
    counters_.dropped_unknown_vcpu.Add();
    return;
  }
  const irqchip::VcpuInfo& sender = router_->vcpu(p.source_vcpu);
  if (sender.node != from) {
    counters_.dropped_wrong_node.Add();
    return;
  }
  InterruptMessage m;
  m.vector = p.vector;
  m.mode = p.mode;
  m.dest_mode = p.dest_logical ? DestMode::kLogical : DestMode::kPhysical;
  m.trigger = p.trigger_level ? TriggerMode::kLevel : TriggerMode::kEdge;
  m.level = p.level != 0;
  m.shorthand = static_cast<irqchip::Shorthand>(p.shorthand);
  m.destination = p.destination;
  m.x2apic_destination = sender.apic.x2apic;
  m.source = sender.apic.id;
  counters_.ipis.Add();
  RouteAndDeliver(m, std::nullopt, from, trace, src);
}

void GlobalController::HandleEoi(NodeId from, const EoiPayload& p) {
  if (p.vcpu.value() >= router_->vcpu_count()) {
    counters_.dropped_unknown_vcpu.Add();
    return;
  }
  if (router_->vcpu(p.vcpu).node != from) {
    counters_.dropped_wrong_node.Add();
    return;
  }
  const uint32_t base = ioapic_->gsi_base().value();
  if (p.gsi.value() < base || p.gsi.value() - base >= ioapic_->pins()) {
    counters_.dropped_unknown_gsi.Add();
    return;
  }
  counters_.eois.Add();
  ctx_ = Context{from, nullptr};
  ioapic_->Eoi(p.vector);  // clears remote IRR; a pin still asserted fires again (BusSink::SendMessage)
  ctx_ = {};
}

void GlobalController::HandleIo(NodeId from, const IoRequestPayload& p) {
  if (p.vcpu.value() >= router_->vcpu_count()) {
    counters_.dropped_unknown_vcpu.Add();
    return;
  }
  if (router_->vcpu(p.vcpu).node != from) {
    counters_.dropped_wrong_node.Add();
    return;
  }
  IoRequestPayload r = p;
  r.status = 0;
  const uint64_t mask = SizeMask(p.size);
  bool found = false;
  if (p.space == IoRequestPayload::Space::kPio) {
    uint16_t offset = 0;
    if (PioDevice* d = pio_.Find(p.address, p.size, &offset)) {
      found = true;
      if (p.is_write) {
        d->Write(p.vcpu, offset, p.size, static_cast<uint32_t>(p.data));
      } else {
        r.data = d->Read(p.vcpu, offset, p.size) & mask;
      }
    }
  } else {
    const uint64_t base = config_.ioapic_mmio_base;
    if (p.address >= base && p.address + p.size <= base + irqchip::IoApic::kMmioSize) {
      found = true;
      ctx_ = Context{from, nullptr};
      if (p.is_write) {
        ioapic_->MmioWrite(p.address - base, p.size, static_cast<uint32_t>(p.data));
      } else {
        r.data = ioapic_->MmioRead(p.address - base, p.size) & mask;
      }
      ctx_ = {};
    }
  }
  if (!found) {
    r.status = 1;
    if (!p.is_write) r.data = mask;
    counters_.io_no_device.Add();
  }
  counters_.io_requests.Add();
  Frame resp;
  resp.type = FrameType::kIoResponse;
  resp.payload = r;
  SendOrCount(from, resp);
}

void GlobalController::RouteAndDeliver(const InterruptMessage& m, std::optional<Gsi> gsi, NodeId source,
                                       TraceBlock* trace, uint32_t ipi_source_vcpu) {
  counters_.raised.Add();
  if ((m.mode == DeliveryMode::kFixed || m.mode == DeliveryMode::kLowestPriority) && m.vector.value() < 16) {
    counters_.dropped_illegal_vector.Add();
    return;
  }
  const irqchip::InterruptRequest req{source, m, gsi};
  const irqchip::RouteResult r = router_->Route(req, deliveries_);
  if (r.count == 0) {
    counters_.dropped_no_destination.Add();
    return;
  }
  counters_.routed.Add();
  Frame f;
  f.type = FrameType::kDeliver;
  if (trace != nullptr) {
    trace->master_decided = StampHop(*trace);
    f.flags = transport::kFlagTraced;
    f.trace = *trace;
  }
  // Level-triggered IOAPIC interrupts carry their pin so the handling node's EOI finds it (remote IRR). A level MSI
  // has no IOAPIC pin to EOI: it goes out as a plain delivery.
  const bool level = m.trigger == TriggerMode::kLevel && gsi.has_value();
  DeliverPayload d;
  d.vector = m.vector;
  // The Router's arbitration is final: the owner injects into exactly the vCPU chosen here.
  d.mode = m.mode == DeliveryMode::kLowestPriority ? DeliveryMode::kFixed : m.mode;
  d.level_triggered = level ? 1 : 0;
  d.gsi = level ? *gsi : Gsi(0);
  d.ipi_source_vcpu = ipi_source_vcpu;
  for (uint32_t i = 0; i < r.count; ++i) {
    d.vcpu = deliveries_[i].vcpu;
    f.payload = d;
    SendOrCount(deliveries_[i].node, f);
  }
}

void GlobalController::SendOrCount(NodeId to, Frame& f) {
  f.sequence = 0;
  const absl::Status s = transport_->Send(to, f);
  if (s.ok()) {
    if (f.type == FrameType::kDeliver) {
      counters_.delivered.Add();
      if (const auto* d = std::get_if<DeliverPayload>(&f.payload); d != nullptr && d->level_triggered) {
        counters_.level_delivered.Add();
      }
    }
    return;
  }
  counters_.dropped_send_failed.Add();
  if (s.code() == absl::StatusCode::kUnavailable) NodeLost(to, s);
}

absl::Status GlobalController::RaiseOnNode(NodeId node, Gsi gsi, TriggerMode trigger, bool asserted, bool traced,
                                           RingTrain train) {
  const int idx = NodeIndex(node);
  if (idx < 0) {
    return absl::InvalidArgumentError(fmt::format("doorbell: node {} is not a node of this VM", node));
  }
  if (node_lost_[idx].load(std::memory_order_relaxed)) {
    return absl::UnavailableError(fmt::format("doorbell: node {} is lost; cannot raise GSI {} there", node, gsi));
  }
  Frame f;
  f.type = FrameType::kControl;
  ControlPayload c;
  c.op = ControlPayload::Op::kRaiseGsi;
  c.arg0 = gsi.value();
  c.arg1 = (trigger == TriggerMode::kLevel ? ControlPayload::kRaiseLevel : 0) |
           (asserted ? ControlPayload::kRaiseAssert : 0) | (traced ? ControlPayload::kRaiseTraced : 0) |
           ControlPayload::TrainBits(train.count, train.interval_us);
  f.payload = c;
  const absl::Status s = transport_->Send(node, f);
  if (!s.ok()) {
    if (s.code() == absl::StatusCode::kUnavailable) NodeLost(node, s);
    return absl::Status(s.code(), fmt::format("doorbell: cannot ask node {} to raise GSI {}: {}", node, gsi,
                                              std::string(s.message())));
  }
  counters_.rings.Add();
  return absl::OkStatus();
}

void GlobalController::NodeLost(NodeId node, const absl::Status& why) {
  const int idx = NodeIndex(node);
  if (idx < 0 || node_lost_[idx].exchange(true)) return;
  counters_.nodes_lost.Add();
  if (config_.on_node_lost) config_.on_node_lost(node, why);
}

void GlobalController::FindLostNodes() {
  for (size_t i = 0; i < config_.nodes.size(); ++i) {
    if (node_lost_[i].load(std::memory_order_relaxed)) continue;
    Frame ping;
    ping.type = FrameType::kControl;
    ping.payload = ControlPayload{.op = ControlPayload::Op::kPing, .arg0 = 0, .arg1 = 0};
    const absl::Status s = transport_->Send(config_.nodes[i], ping);
    if (s.code() == absl::StatusCode::kUnavailable) NodeLost(config_.nodes[i], s);
  }
}

}  // namespace aggvm::master
