// The master's global interrupt controller: the data-plane end of every interrupt signal of the VM.
//
// It owns the VM's I/O APIC (24 pins by default), the Router (policy switchable at run time), the topology
// (vCPU -> node, APIC addressing) and the master devices (console UART, doorbell), and talks to the nodes through a
// Transport. Frame flow (docs/dataplane.md has the full picture):
//
//   kInterrupt gsi level  -> IoApic pin (gsi - gsi_base) -> on an edge / an asserted level with remote IRR clear the
//                            pin's redirection entry becomes a message -> Router -> one kDeliver per delivery to the
//                            node owning the chosen vCPU (level-triggered: level_triggered = 1 and the gsi)
//   kInterrupt msi        -> irqchip::DecodeMsiRaw -> Router -> kDeliver
//   kIpi                  -> message (source = the sending vCPU's APIC) -> Router -> kDeliver (ipi_source_vcpu set);
//                            source kIpiSourceProxyResolved (a node's proxy vCPU caught it): physical destination
//                            only, no sender check, ipi_source_vcpu all ones
//   kEoi                  -> IoApic::Eoi(vector): remote IRR cleared; a pin still asserted fires again
//   kIoRequest            -> PIO: PioBus (UART 0x3F8, doorbell 0x0A70); MMIO: the IOAPIC window -> kIoResponse
//                            (no device: status 1, reads all ones)
//   kControl ping         -> counted (nodes ignore pings too; the master pings to find a lost node)
// The Router's arbitration is final: a lowest-priority message is delivered as FIXED to the one vCPU it chose.
// Frames that name an unknown node, vCPU or GSI, or a vCPU that the sending node does not own, are counted and
// dropped. A traced frame gets the hops master_received and master_decided; they travel on in each kDeliver.
//
// Threads: all state belongs to ONE data-plane thread, the one calling PollOnce() / Run(). It alone sends, so the
// Transport's per-peer send serialisation holds without a lock. The per-frame path allocates nothing, takes no lock
// and logs nothing. Operator calls (Ring, SetRoutingPolicy, ProgramPin, GetRoutingTable, ...) may come from any
// thread: they are queued (mutex + one relaxed flag the data-plane thread checks per batch), executed on the
// data-plane thread between batches, and waited for with a bound; called on the data-plane thread itself they run
// inline. Counters are relaxed atomics readable from any thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/counter.h"
#include "common/types.h"
#include "irqchip/interrupt.h"
#include "irqchip/ioapic.h"
#include "irqchip/msi.h"
#include "irqchip/router.h"
#include "master/devices/console_uart.h"
#include "master/devices/doorbell.h"
#include "master/devices/pio_device.h"
#include "transport/transport.h"

namespace aggvm::master {

/// Where one vCPU runs and how its local APIC is addressed (index in GlobalControllerConfig::vcpus = VcpuIndex).
struct VcpuPlacement {
  NodeId node{};
  irqchip::ApicAddressing apic{};
};

/// An x2APIC-mode vCPU with APIC ID `id` (LDR derived from the ID, SDM vol. 3, 11.12.10.2).
VcpuPlacement X2apicVcpu(NodeId node, ApicId id);

/// A redirection entry (82093AA 3.2.4) from its fields; `destination` is the 8-bit RTE destination (bits 63:56).
uint64_t RedirectionEntry(Vector vector, irqchip::DeliveryMode mode, irqchip::DestMode dest_mode,
                          irqchip::TriggerMode trigger, uint8_t destination, bool masked = false);

struct PinProgram {
  uint32_t pin = 0;
  uint64_t entry = 0;  // RedirectionEntry(...)
};

struct GlobalControllerConfig {
  /// The agent nodes of the VM (the master's own id is the transport's self()). Frames from others are dropped.
  std::vector<NodeId> nodes;
  std::vector<VcpuPlacement> vcpus;
  irqchip::IoApicConfig ioapic{};
  /// Redirection entries programmed at creation (pins start masked otherwise, as at reset).
  std::vector<PinProgram> pins;
  irqchip::RouterConfig router{};
  irqchip::MsiDecodeOptions msi{};
  /// Guest MMIO forwarded to [ioapic_mmio_base, + 0x100) reaches the IoApic's registers.
  uint64_t ioapic_mmio_base = 0xFEC00000;
  uint16_t console_base = ConsoleUart::kCom1Base;
  uint16_t doorbell_base = Doorbell::kDefaultBase;
  /// Run(): kBusyPoll spins on Poll; kEvent sleeps in Wait for at most `idle_wait` (by default without a timeout:
  /// a frame, an operator command (Transport::Wake), a lost node or the stop request wakes it, so an idle data
  /// plane neither wakes up nor arms a timer around each frame).
  transport::WaitMode wait_mode = transport::WaitMode::kEvent;
  absl::Duration idle_wait = absl::InfiniteDuration();
  /// Console lines of the VM (data-plane thread). May be empty.
  ConsoleSink console;
  /// A node's data-plane connection was lost (data-plane thread, once per node). May be empty.
  std::function<void(NodeId, const absl::Status&)> on_node_lost;
};

struct GlobalControllerCounters {
  Counter frames_received;
  Counter gsi_changes;       // accepted kInterrupt GSI level frames
  Counter msis;              // accepted kInterrupt MSI frames
  Counter ipis;              // accepted kIpi frames
  Counter ipis_proxy_resolved;  // of which caught by a proxy vCPU (source unknown, one physical APIC ID)
  Counter raised;            // messages put on the bus: IOAPIC pin fired, MSI decoded, IPI
  Counter routed;            // Router decisions naming >= 1 vCPU
  Counter delivered;         // kDeliver frames sent
  Counter level_delivered;   // of which level-triggered (the owner node owes a kEoi)
  Counter eois;              // accepted kEoi frames
  Counter io_requests;       // accepted kIoRequest frames (answered)
  Counter io_no_device;      // of which answered "no device" (status 1)
  Counter rings;             // kRaiseGsi frames sent (doorbell)
  Counter pings;             // kControl ping frames received
  Counter priorities;        // kControl priority frames applied to the Router (a vCPU's PPR, lowest priority)
  Counter nodes_lost;
  Counter init_deasserts;    // kIpi INIT level de-asserts: ignored as CPUs do (SDM vol. 3, 11.6.1)
  // Drops, by reason.
  Counter dropped_unknown_node;     // from a node that is not part of the VM
  Counter dropped_unknown_vcpu;     // names a vCPU index the VM does not have
  Counter dropped_wrong_node;       // names a vCPU the sending node does not own
  Counter dropped_unknown_gsi;      // a GSI outside the IOAPIC's pins
  Counter dropped_bad_msi;          // DecodeMsi refused the address/data
  Counter dropped_no_destination;   // the Router found no vCPU (or a message the bus cannot carry)
  Counter dropped_illegal_vector;   // fixed/lowest-priority with vector < 16 (SDM vol. 3, 11.5.3)
  Counter dropped_unexpected_type;  // kDeliver, kIoResponse, other control ops: not for the master
  Counter dropped_send_failed;      // a kDeliver / kIoResponse could not be sent (node lost or queue full)
};

/// One IOAPIC pin as GetRoutingTable shows it.
struct RoutingTablePin {
  uint32_t pin = 0;
  Gsi gsi{};
  uint64_t entry = 0;  // the raw redirection entry; the fields below are decoded from it
  Vector vector{};
  irqchip::DeliveryMode mode = irqchip::DeliveryMode::kFixed;
  irqchip::DestMode dest_mode = irqchip::DestMode::kPhysical;
  irqchip::TriggerMode trigger = irqchip::TriggerMode::kEdge;
  uint8_t destination = 0;
  bool masked = true;
  bool remote_irr = false;
  bool input = false;  // the pin's current (logical) input level
};

struct RoutingTable {
  irqchip::RoutingPolicy policy = irqchip::RoutingPolicy::kSdm;
  bool focus_processor = false;
  std::vector<RoutingTablePin> pins;
  std::vector<std::pair<Vector, VcpuIndex>> vector_pins;  // static-policy pins
  std::vector<std::pair<Gsi, VcpuIndex>> gsi_pins;
};

class GlobalController {
 public:
  static constexpr size_t kBatch = 32;

  /// Validates the topology (Router rules; every vCPU's node listed in `nodes`), the IOAPIC config and the pin
  /// programs. `transport` must be connected to the nodes and outlive the controller.
  static absl::StatusOr<std::unique_ptr<GlobalController>> Create(GlobalControllerConfig config,
                                                                 transport::Transport* transport);
  ~GlobalController();
  GlobalController(const GlobalController&) = delete;
  GlobalController& operator=(const GlobalController&) = delete;

  // --- data-plane thread ---
  /// Runs queued commands, then handles the frames already received (up to kBatch); never blocks. Returns the
  /// number of frames handled. A lost node is handled (counted, reported through on_node_lost), not an error.
  absl::StatusOr<size_t> PollOnce();
  /// PollOnce / Wait per wait_mode until `stop`. Returns the first error that is not a node loss (e.g. the
  /// transport was closed).
  absl::Status Run(std::stop_token stop);

  // --- any thread: executed on the data-plane thread (inline when called there), waited for up to `timeout` ---
  /// Doorbell: has node `node` raise `gsi` (see master/devices/doorbell.h).
  absl::Status Ring(NodeId node, Gsi gsi, irqchip::TriggerMode trigger, bool asserted, bool traced = false,
                    absl::Duration timeout = absl::Seconds(2), RingTrain train = {});
  absl::Status SetRoutingPolicy(irqchip::RoutingPolicy policy, absl::Duration timeout = absl::Seconds(2));
  absl::Status ProgramPin(PinProgram pin, absl::Duration timeout = absl::Seconds(2));
  /// Feeds the Router a vCPU's priority (PPR), as its node reports it.
  absl::Status SetVcpuPriority(VcpuIndex vcpu, uint8_t priority, absl::Duration timeout = absl::Seconds(2));
  /// Static-policy pins (nullopt unpins).
  absl::Status PinVector(Vector vector, std::optional<VcpuIndex> vcpu, absl::Duration timeout = absl::Seconds(2));
  absl::Status PinGsi(Gsi gsi, std::optional<VcpuIndex> vcpu, absl::Duration timeout = absl::Seconds(2));
  absl::StatusOr<RoutingTable> GetRoutingTable(absl::Duration timeout = absl::Seconds(2));
  /// Hands over the console's unfinished lines.
  absl::Status FlushConsole(absl::Duration timeout = absl::Seconds(2));

  // --- any thread ---
  [[nodiscard]] GlobalControllerCounters counters() const { return counters_; }
  [[nodiscard]] bool node_lost(NodeId node) const;
  [[nodiscard]] size_t vcpu_count() const { return vcpus_.size(); }
  /// The master's own node id.
  [[nodiscard]] NodeId self() const;

 private:
  class BusSink;
  class DoorbellPort;
  struct CommandState;
  struct Command {
    std::function<absl::Status()> fn;
    std::shared_ptr<CommandState> state;
  };
  // The context of the frame being handled, for the IoApic's synchronous SendMessage callback.
  struct Context {
    NodeId source{};
    transport::TraceBlock* trace = nullptr;  // non-null when the frame is traced
  };

  GlobalController(GlobalControllerConfig config, transport::Transport* transport);
  absl::Status Init();
  absl::Status Execute(std::function<absl::Status()> fn, absl::Duration timeout);
  void RunCommands();
  absl::StatusOr<size_t> Handle(absl::StatusOr<size_t> polled);
  void HandleFrame(transport::ReceivedFrame& rf);
  void HandleInterrupt(NodeId from, const transport::InterruptPayload& p, transport::TraceBlock* trace);
  void HandleIpi(NodeId from, const transport::IpiPayload& p, transport::TraceBlock* trace);
  void HandleEoi(NodeId from, const transport::EoiPayload& p);
  void HandleIo(NodeId from, const transport::IoRequestPayload& p);
  /// The message is on the bus: route it and send the deliveries.
  void RouteAndDeliver(const irqchip::InterruptMessage& m, std::optional<Gsi> gsi, NodeId source,
                       transport::TraceBlock* trace, uint32_t ipi_source_vcpu);
  absl::Status RaiseOnNode(NodeId node, Gsi gsi, irqchip::TriggerMode trigger, bool asserted, bool traced,
                           RingTrain train);
  void SendOrCount(NodeId to, transport::Frame& f);
  void NodeLost(NodeId node, const absl::Status& why);
  /// After Poll reported a loss (UNAVAILABLE, which does not name the node as a value): pings every live node; those
  /// the transport refuses are lost, reported with the transport's own message.
  void FindLostNodes();
  absl::Status ProgramPinNow(PinProgram pin);
  /// Index of `node` in nodes_, -1 if not a node of the VM.
  [[nodiscard]] int NodeIndex(NodeId node) const {
    return node_index_[node.value()];
  }
  absl::Status RebuildRouter(irqchip::RouterConfig config);

  GlobalControllerConfig config_;
  transport::Transport* transport_;
  std::vector<VcpuPlacement> vcpus_;
  std::vector<int16_t> node_index_;                  // NodeId value -> index in config_.nodes, -1 otherwise
  std::unique_ptr<std::atomic<bool>[]> node_lost_;   // per node index
  std::unique_ptr<BusSink> bus_sink_;
  std::unique_ptr<DoorbellPort> doorbell_port_;
  std::optional<irqchip::IoApic> ioapic_;
  std::optional<irqchip::Router> router_;
  std::vector<irqchip::Delivery> deliveries_;        // Route's output buffer, sized once
  std::vector<NodeId> pin_source_;                   // per pin: the node that last changed its level
  std::vector<std::pair<Vector, VcpuIndex>> vector_pins_;
  std::vector<std::pair<Gsi, VcpuIndex>> gsi_pins_;
  PioBus pio_;
  std::unique_ptr<ConsoleUart> uart_;
  std::unique_ptr<Doorbell> doorbell_;
  Context ctx_;
  std::array<transport::ReceivedFrame, kBatch> batch_{};

  std::mutex command_mu_;
  std::deque<Command> commands_;                     // guarded by command_mu_
  std::atomic<bool> has_commands_{false};
  std::atomic<std::thread::id> poll_thread_{};

  GlobalControllerCounters counters_;
};

}  // namespace aggvm::master
