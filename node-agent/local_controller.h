// A node's local interrupt controller: the node end of the device-interrupt data path.
//
//   device on this node raises GSI  -> kInterrupt (gsi level) to the master; trace hops raised, local_controller
//       edge:  assert + deassert (one rising edge at the master's IOAPIC pin)
//       level: assert, held until the device deasserts (the master re-delivers after each EOI while it is held)
//   device MSI                      -> kInterrupt (msi address/data) to the master
//   kDeliver for a vCPU owned here  -> VmPort::Inject; trace hops target_received, injected; a level-triggered
//                                      delivery is remembered per (vCPU, vector) with its GSI
//   guest EOI of such a vector      -> OnGuestEoi (the agent calls it from KVM_EXIT_IOAPIC_EOI) -> kEoi to the master
//   kControl raise-gsi from master  -> raise as above (the doorbell, master/devices/doorbell.h)
//   kIoResponse                     -> the attached IoForwarder (io_forwarder.h)
// A kDeliver for a vCPU this node does not own, a frame of a type the node does not take, a frame from a node
// other than the master (kDeliver excepted: direct IPIs may come from peers), a bad raise-gsi: counted and dropped.
//
// Threads: ONE data-plane thread calls PollOnce() / Run(); it injects (VmPort::Inject must be callable there).
// RaiseEdge / SetLevel / SignalMsi (device threads) and OnGuestEoi (vCPU threads) may run on any thread
// concurrently. Every send to the master goes through SendToMaster, which serialises senders with a spinlock held
// only around Transport::Send (the Transport contract wants one sender per peer at a time); it is the only
// synchronisation on the path and is uncontended unless two threads signal at the same instant. The pending
// level-triggered table is a fixed array of atomics (release on record, acquire-exchange on EOI). No allocation, no
// log and no mutex per frame; counters are relaxed atomics.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <stop_token>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/counter.h"
#include "common/types.h"
#include "irqchip/interrupt.h"
#include "transport/transport.h"

namespace aggvm::agent {

class IoForwarder;

/// The local vCPUs, as the local controller sees them. The agent implements it with the vcpu layer's
/// InterruptInjector (KVM_SIGNAL_MSI to the vCPU's APIC ID, or the userspace LAPIC): see injector_vm_port.h.
class VmPort {
 public:
  virtual ~VmPort() = default;
  /// Puts `vector` into vCPU `vcpu` (owned by this node). `level_triggered`: the guest's EOI of it must come back
  /// as OnGuestEoi. Called on the data-plane thread.
  virtual absl::Status Inject(VcpuIndex vcpu, Vector vector, irqchip::DeliveryMode mode, bool level_triggered) = 0;
};

struct LocalControllerConfig {
  NodeId master{0};
  /// vCPUs of the whole VM (kDeliver / OnGuestEoi name indexes below this).
  uint32_t num_vcpus = 0;
  /// The vCPUs this node runs.
  std::vector<VcpuIndex> owned;
  /// Run(): kBusyPoll spins on Poll; kEvent sleeps in Wait for at most `idle_wait` at a time.
  transport::WaitMode wait_mode = transport::WaitMode::kEvent;
  absl::Duration idle_wait = absl::Milliseconds(5);
  /// A traced delivery was injected: its trace block, every hop filled (data-plane thread). May be empty.
  std::function<void(const transport::TraceBlock&)> on_trace;
};

struct LocalControllerCounters {
  Counter frames_received;
  Counter raised;             // GSI raises (edge, or a level change) sent to the master
  Counter msis_sent;
  Counter level_unchanged;    // SetLevel to the level the GSI already had: nothing sent
  Counter delivered;          // kDeliver injected
  Counter level_delivered;    // of which level-triggered (an EOI is owed)
  Counter eois_sent;
  Counter eois_unmatched;     // OnGuestEoi for a (vCPU, vector) with no level delivery pending
  Counter control_raises;     // kControl raise-gsi handled
  Counter io_responses;       // kIoResponse handed to the IoForwarder
  Counter pings;
  Counter inject_failed;      // VmPort::Inject returned an error
  Counter send_failed;        // a frame to the master could not be sent
  Counter master_lost;
  // Drops, by reason.
  Counter dropped_not_owned;       // kDeliver for a vCPU this node does not run
  Counter dropped_unknown_vcpu;    // names a vCPU index the VM does not have
  Counter dropped_bad_control;     // raise-gsi that this node refuses, or an unknown control op
  Counter dropped_unexpected;      // a frame type (or sender) the node does not take
  Counter dropped_no_forwarder;    // kIoResponse without an attached IoForwarder
};

class LocalController {
 public:
  static constexpr size_t kBatch = 32;

  /// `transport` connected to the master, `vm` — both must outlive the controller.
  static absl::StatusOr<std::unique_ptr<LocalController>> Create(LocalControllerConfig config,
                                                                transport::Transport* transport, VmPort* vm);
  ~LocalController();
  LocalController(const LocalController&) = delete;
  LocalController& operator=(const LocalController&) = delete;

  // --- device side, any thread ---
  /// One rising edge of `gsi` (assert + deassert).
  absl::Status RaiseEdge(Gsi gsi, bool traced = false);
  /// Sets a level-triggered `gsi`'s input level; nothing is sent when it already has that level.
  absl::Status SetLevel(Gsi gsi, bool asserted, bool traced = false);
  /// A device MSI (SDM vol. 3, 11.11): routed by the master.
  absl::Status SignalMsi(uint64_t address, uint32_t data, bool traced = false);

  // --- vCPU threads ---
  /// The guest EOI'd `vector` on `vcpu` (KVM_EXIT_IOAPIC_EOI / the user irqchip's EOI broadcast). If a
  /// level-triggered delivery of it is pending, sends kEoi with its GSI to the master.
  void OnGuestEoi(VcpuIndex vcpu, Vector vector);

  // --- data-plane thread ---
  /// Handles the frames already received (up to kBatch); never blocks. UNAVAILABLE once the master is lost (also
  /// fails every forwarded I/O in flight).
  absl::StatusOr<size_t> PollOnce();
  /// PollOnce / Wait per wait_mode until `stop` or an error (the master lost: UNAVAILABLE).
  absl::Status Run(std::stop_token stop);

  /// Attaches the forwarder that receives kIoResponse frames. Before the data-plane thread starts.
  void set_io_forwarder(IoForwarder* f) { io_forwarder_ = f; }
  /// Sends one frame to the master; serialised with every other sender of this node. Any thread.
  absl::Status SendToMaster(transport::Frame& frame);

  [[nodiscard]] bool owns(VcpuIndex vcpu) const {
    return vcpu.value() < owned_.size() && owned_[vcpu.value()] != 0;
  }
  [[nodiscard]] bool master_lost() const { return master_lost_.load(std::memory_order_acquire); }
  [[nodiscard]] LocalControllerCounters counters() const { return counters_; }
  [[nodiscard]] const LocalControllerConfig& config() const { return config_; }
  /// The GSI of the level-triggered delivery of `vector` pending an EOI on `vcpu`, if any.
  [[nodiscard]] std::optional<Gsi> pending_level(VcpuIndex vcpu, Vector vector) const;

 private:
  LocalController(LocalControllerConfig config, transport::Transport* transport, VmPort* vm);
  absl::StatusOr<size_t> Handle(absl::StatusOr<size_t> polled);
  void HandleFrame(transport::ReceivedFrame& rf);
  void HandleDeliver(const transport::DeliverPayload& p, transport::Frame& f);
  void HandleControl(const transport::ControlPayload& p);
  absl::Status SendGsiLevel(Gsi gsi, bool level, bool traced, uint64_t raised_ns);
  void MasterLost(const absl::Status& why);

  LocalControllerConfig config_;
  transport::Transport* transport_;
  VmPort* vm_;
  IoForwarder* io_forwarder_ = nullptr;
  std::vector<uint8_t> owned_;  // per vCPU index: 1 if this node runs it
  // Per owned-or-not vCPU, per vector: GSI + 1 of the pending level-triggered delivery, 0 if none.
  std::unique_ptr<std::array<std::atomic<uint32_t>, 256>[]> pending_;
  std::unique_ptr<std::atomic<uint8_t>[]> gsi_level_;  // per GSI (< kMaxGsi): the input level as last sent
  std::atomic_flag send_lock_ = ATOMIC_FLAG_INIT;
  std::atomic<uint32_t> next_trace_id_{1};
  std::atomic<bool> master_lost_{false};
  std::array<transport::ReceivedFrame, kBatch> batch_{};
  LocalControllerCounters counters_;
};

}  // namespace aggvm::agent
