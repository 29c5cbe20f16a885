// A node's local interrupt controller: the node end of the device-interrupt data path.
//
//   device on this node raises GSI  -> kInterrupt (gsi level) to the master; trace hops raised, local_controller
//       edge:  one frame, level kLevelEdge (the master asserts and deasserts the pin: one rising edge)
//       level: assert, held until the device deasserts (the master re-delivers after each EOI while it is held)
//   device MSI                      -> kInterrupt (msi address/data) to the master
//   kDeliver for a vCPU owned here  -> VmPort::Inject; trace hops target_received, injected; a level-triggered
//                                      delivery is remembered per (vCPU, vector) with its GSI
//   guest EOI of such a vector      -> OnGuestEoi (the agent calls it from KVM_EXIT_IOAPIC_EOI) -> kEoi to the master
//   kControl raise-gsi from master  -> raise as above (the doorbell, master/devices/doorbell.h); a train of edges
//                                      is raised by this node's RaiseTrain thread on its own clock (raise_train.h)
//   kIoResponse                     -> the attached IoForwarder (io_forwarder.h)
// A kDeliver for a vCPU this node does not own, a frame of a type the node does not take, a frame from a node
// other than the master (kDeliver excepted: direct IPIs come from the VM's other nodes), a bad raise-gsi: counted and
// dropped.
//
// Guest IPIs towards vCPUs on other nodes (issue 6, docs/proxy.md):
//   ForwardIpi (kernel irqchip: a proxy vCPU caught it; KVM already resolved the destination to one APIC ID, the
//   sender is unknown) and ForwardIcr (user irqchip: the sender's ICR message, the sender known) choose by route mode:
//     via-master  kIpi to the master (ForwardIpi: source transport::kIpiSourceProxyResolved), whose Router decides
//                 and sends kDeliver to the owner(s);
//     direct      an IPI with ONE physical destination (every ForwardIpi; ForwardIcr when physical, no shorthand,
//                 not lowest priority, not broadcast, not an INIT level de-assert) goes as kDeliver straight to the
//                 node that owns that vCPU; everything else still goes to the master.
//   An APIC ID that no vCPU of the VM has is counted in ipis_to_nowhere (direct) or by the master
//   (dropped_no_destination). The trace block is filled from `raised` when trace_ipis is set.
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
#include "node-agent/raise_train.h"
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
  /// Run(): kBusyPoll spins on Poll; kEvent sleeps in Wait for at most `idle_wait` at a time (by default without a
  /// timeout: a frame, a lost peer or the stop request wakes it; no timer is armed around each frame).
  transport::WaitMode wait_mode = transport::WaitMode::kEvent;
  absl::Duration idle_wait = absl::InfiniteDuration();
  /// A traced delivery was injected: its trace block, every hop filled (data-plane thread). May be empty.
  std::function<void(const transport::TraceBlock&)> on_trace;
  /// Per vCPU index of the VM: the node that runs it and its APIC ID. Needed by ForwardIpi / ForwardIcr and by the
  /// check that a kDeliver comes from the master or a node of the VM; may stay empty when neither is used.
  std::vector<NodeId> vcpu_node;
  std::vector<ApicId> apic_ids;
  /// Route mode `direct` (else via-master): see the top of this file.
  bool direct_ipis = false;
  /// Forwarded IPIs carry a trace block (raised = when ForwardIpi / ForwardIcr was called).
  bool trace_ipis = false;
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
  Counter trains;             // kControl raise-gsi trains started (each replaces a running one)
  Counter train_raises;       // edges a train raised (sent, or failed and counted in send_failed)
  Counter io_responses;       // kIoResponse handed to the IoForwarder
  Counter pings;
  Counter inject_failed;      // VmPort::Inject returned an error
  Counter send_failed;        // a frame to the master could not be sent
  Counter master_lost;
  Counter init_deasserts_dropped;  // user-mode INIT level de-asserts (no effect, SDM vol. 3, 11.6.1): not forwarded
  // Drops, by reason.
  Counter dropped_not_owned;       // kDeliver for a vCPU this node does not run
  Counter dropped_unknown_vcpu;    // names a vCPU index the VM does not have
  Counter dropped_bad_control;     // raise-gsi that this node refuses, or an unknown control op
  Counter dropped_unexpected;      // a frame type (or sender) the node does not take
  Counter dropped_no_forwarder;    // kIoResponse without an attached IoForwarder
  // Guest IPIs to remote vCPUs (ForwardIpi / ForwardIcr) and what arrived from peers.
  Counter ipis_via_master;         // kIpi sent to the master
  Counter ipis_direct;             // kDeliver sent straight to the owner node
  Counter ipis_to_nowhere;         // an APIC ID no vCPU of the VM has: dropped here (direct / nowhere proxies)
  Counter ipis_send_failed;        // of the above, the send failed (also counted in send_failed)
  Counter direct_received;         // kDeliver from a peer node (direct route mode) injected or dropped here
  Counter dropped_unknown_peer;    // kDeliver from a node that runs no vCPU of this VM
  Counter delivered_nmi;           // of `delivered`, by delivery mode
  Counter delivered_init;
  Counter delivered_sipi;
  Counter priorities_sent;         // kControl priority frames (ReportPriority)
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
  /// One rising edge of `gsi`: one frame, level kLevelEdge (the master asserts and deasserts the pin).
  absl::Status RaiseEdge(Gsi gsi, bool traced = false);
  /// Sets a level-triggered `gsi`'s input level; nothing is sent when it already has that level.
  absl::Status SetLevel(Gsi gsi, bool asserted, bool traced = false);
  /// A device MSI (SDM vol. 3, 11.11): routed by the master.
  absl::Status SignalMsi(uint64_t address, uint32_t data, bool traced = false);

  // --- guest IPIs to remote vCPUs, any thread (proxy threads, vCPU threads); no allocation, no lock but the send
  // spinlock of the destination peer ---
  /// A proxy vCPU accepted an interrupt for `target` (kernel irqchip). `mode` fixed, lowest priority (KVM already
  /// arbitrated: delivered as fixed), NMI, INIT or startup (`vector` = the SIPI vector).
  void ForwardIpi(ApicId target, irqchip::DeliveryMode mode, Vector vector);
  /// The user irqchip handed over an ICR message of local vCPU `source` that may name remote vCPUs.
  void ForwardIcr(VcpuIndex source, const irqchip::InterruptMessage& message);
  /// An interrupt for an APIC ID that no vCPU has (the agent's "nowhere" proxies): counted in ipis_to_nowhere.
  void CountNowhere() { counters_.ipis_to_nowhere.Add(); }
  /// Local vCPU `vcpu`'s processor priority changed to `ppr` (user irqchip): kControl priority to the master, whose
  /// Router uses it for lowest-priority arbitration. Callers send changes only.
  void ReportPriority(VcpuIndex vcpu, uint8_t ppr);

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
  /// The doorbell train's wake-ups more than one interval behind a deadline (late) and the edges dropped because of
  /// them (skipped: a device that stalled raises once and goes on on schedule).
  [[nodiscard]] uint64_t train_late() const { return train_.late(); }
  [[nodiscard]] uint64_t train_skipped() const { return train_.skipped(); }
  [[nodiscard]] bool train_running() const { return train_.running(); }

 private:
  LocalController(LocalControllerConfig config, transport::Transport* transport, VmPort* vm);
  absl::StatusOr<size_t> Handle(absl::StatusOr<size_t> polled);
  void HandleFrame(transport::ReceivedFrame& rf);
  void HandleDeliver(const transport::DeliverPayload& p, transport::Frame& f);
  void HandleControl(const transport::ControlPayload& p);
  /// `level`: 0, 1 or InterruptPayload::kLevelEdge. Caller holds send_lock_.
  absl::Status SendGsiLevel(Gsi gsi, uint8_t level, bool traced, uint64_t raised_ns);
  void MasterLost(const absl::Status& why);
  /// Sends to a peer node (not the master) under that peer's send spinlock.
  absl::Status SendToPeer(NodeId node, transport::Frame& frame);
  /// The vCPU with APIC ID `id`, or -1.
  [[nodiscard]] int64_t VcpuOfApic(uint32_t id) const {
    return id < vcpu_of_apic_.size() ? vcpu_of_apic_[id] : -1;
  }
  /// Sends a kDeliver of an IPI straight to the owner of `vcpu` (direct route mode).
  void SendDirect(VcpuIndex vcpu, irqchip::DeliveryMode mode, Vector vector, uint32_t source, uint64_t raised);
  void SendIpiToMaster(transport::IpiPayload& p, uint64_t raised);

  LocalControllerConfig config_;
  transport::Transport* transport_;
  VmPort* vm_;
  IoForwarder* io_forwarder_ = nullptr;
  std::vector<uint8_t> owned_;  // per vCPU index: 1 if this node runs it
  // Per owned-or-not vCPU, per vector: GSI + 1 of the pending level-triggered delivery, 0 if none.
  std::unique_ptr<std::array<std::atomic<uint32_t>, 256>[]> pending_;
  std::unique_ptr<std::atomic<uint8_t>[]> gsi_level_;  // per GSI (< kMaxGsi): the input level as last sent
  std::atomic_flag send_lock_ = ATOMIC_FLAG_INIT;
  std::unique_ptr<std::atomic_flag[]> peer_locks_;  // per NodeId value up to the VM's highest node id
  size_t peer_lock_count_ = 0;
  std::vector<uint8_t> is_peer_;                    // per NodeId value: 1 if it runs vCPUs of this VM
  std::vector<int32_t> vcpu_of_apic_;               // per APIC ID value: vCPU index, -1 if none
  std::atomic<uint32_t> next_trace_id_{1};
  std::atomic<bool> master_lost_{false};
  std::array<transport::ReceivedFrame, kBatch> batch_{};
  LocalControllerCounters counters_;
  RaiseTrain train_;  // last: its thread (which raises through this controller) is joined before anything else goes
};

}  // namespace aggvm::agent
