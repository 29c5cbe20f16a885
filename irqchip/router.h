// The master's routing decision: which vCPUs (on which nodes) receive an interrupt message.
//
// Input: the message (from an IOAPIC entry, a decoded MSI or an ICR write), the node that raised it, the source GSI
// if any, and the VM's topology kept inside the Router (per vCPU: owning node, APIC addressing, last reported
// priority, and -- for the focus-processor rule -- the vectors last reported pending or in service).
// Output: deliveries (vCPU, node) written into a caller-provided buffer. Route() never allocates, never locks,
// never logs; it is deterministic for given inputs and state (the only state it changes is the per-vector rotation
// cursor of arbitrated deliveries and the counters). One Router per thread: it is not synchronised.
//
// Which vCPUs match follows SDM vol. 3, 11.6.2 (see destination.h). What the SDM leaves to the platform -- the
// choice of ONE target for lowest-priority delivery (11.6.2.4) and for a redirectable fixed MSI (RH = 1, 11.11.1)
// -- is the pluggable policy:
//   sdm               the candidate of lowest reported priority; ties rotate from the vector's previous winner.
//   round-robin       priority ignored: the next candidate after the vector's previous winner (cyclic index order).
//   node-local-first  the lowest-priority candidate on the node that raised the interrupt; if none runs there, the
//                     lowest-priority candidate overall (ties rotate as in sdm).
//   static            the operator-pinned vCPU of the source GSI (if pinned), else of the vector (if pinned) --
//                     used only when that vCPU is a candidate (the guest's destination is never overridden);
//                     otherwise as sdm, counted in static_fallbacks.
// With focus_processor (off by default, as in KVM; the SDM makes it model specific), a candidate that already has the
// vector pending or in service wins first, under every policy but static.
//
// Guest-changed addressing (UpdateAddressing) is followed as the guest wrote it, like hardware, which lets software
// give two local APICs the same ID. The router then stays in step with the guest: a physical destination, a self
// IPI (the message names its sender by APIC ID only) and an x2APIC logical bit naming that ID reach EVERY vCPU that
// holds it — each APIC compares the destination with its own ID (SDM vol. 3, 11.6.2.1); an all-excluding-self IPI
// skips all of them; a lowest-priority message arbitrates among all of them. Such an update is counted in
// apic_id_conflicts and shared_apic_ids() says how many IDs are shared now. Only an ID that can never be one APIC's
// (the broadcast IDs) is refused. Create, which takes the operator's topology, still requires unique IDs.
//
// Delivery to a software-disabled APIC: only NMI, SMI, INIT and SIPI are delivered (SDM 11.4.7.2); other modes skip
// it (counted) and it never wins an arbitration. A message that reaches no vCPU is not an error: it is counted in
// no_destination and yields zero deliveries (hardware drops it too).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/types.h"
#include "irqchip/interrupt.h"
#include "irqchip/sink.h"

namespace aggvm::irqchip {

enum class RoutingPolicy : uint8_t { kSdm, kRoundRobin, kNodeLocalFirst, kStatic };
/// "sdm", "round-robin", "node-local-first", "static".
std::string_view RoutingPolicyName(RoutingPolicy p);
absl::StatusOr<RoutingPolicy> ParseRoutingPolicy(std::string_view name);

/// One vCPU of the VM as the master knows it. Its VcpuIndex is its position in the topology.
struct VcpuInfo {
  NodeId node{};
  ApicAddressing apic{};
  uint8_t priority = 0;  // last reported PPR (or TPR), SDM 11.8.3.1
};

struct RouterConfig {
  RoutingPolicy policy = RoutingPolicy::kSdm;
  bool focus_processor = false;
};

struct InterruptRequest {
  NodeId source_node{};
  InterruptMessage message{};
  std::optional<Gsi> gsi;  // the IOAPIC pin for GSI interrupts (static pins by GSI), none for MSIs and IPIs
};

struct Delivery {
  VcpuIndex vcpu{};
  NodeId node{};
  friend bool operator==(const Delivery&, const Delivery&) = default;
};

enum class RouteOutcome : uint8_t {
  kDelivered,      // count >= 1 deliveries written
  kNoDestination,  // the message names no existing (accepting) vCPU: nothing to do
  kTruncated,      // more deliveries than the buffer holds: the first out.size() were written
  kBadMessage,     // a delivery mode the bus cannot carry (3): dropped
};

struct RouteResult {
  uint32_t count = 0;
  RouteOutcome outcome = RouteOutcome::kNoDestination;
};

struct RouterCounters {
  uint64_t decisions = 0;
  uint64_t deliveries = 0;
  uint64_t no_destination = 0;
  uint64_t truncated = 0;
  uint64_t bad_message = 0;
  uint64_t disabled_skipped = 0;  // a matching vCPU whose APIC is software-disabled, for a mode it does not accept
  uint64_t arbitrated = 0;        // decisions that picked one of several candidates (lowest priority / RH)
  uint64_t focus_wins = 0;
  uint64_t node_local_wins = 0;
  uint64_t node_local_fallbacks = 0;  // node-local-first found no candidate on the source node
  uint64_t static_pinned = 0;
  uint64_t static_fallbacks = 0;
  uint64_t apic_id_conflicts = 0;   // guest updates that gave a vCPU an APIC ID another vCPU already has (followed)
  uint64_t addressing_refused = 0;  // guest updates refused: a broadcast ID (the router keeps the previous state)
};

class Router {
 public:
  static constexpr size_t kMaxVcpus = 1024;

  /// Validates the topology: 1..kMaxVcpus vCPUs, unique APIC IDs, xAPIC IDs below 0xFF (0xFF is the broadcast),
  /// x2APIC IDs below 0xFFFFFFFF.
  static absl::StatusOr<Router> Create(std::vector<VcpuInfo> vcpus, RouterConfig config = {});

  /// Decides the deliveries of `request` into `out` (which should hold vcpu_count() entries for broadcasts).
  RouteResult Route(const InterruptRequest& request, std::span<Delivery> out);

  /// Route() into an internal buffer, then sink.Deliver(vcpu, node, message) for each delivery.
  RouteResult Dispatch(const InterruptRequest& request, InterruptSink& sink);

  /// The guest changed the vCPU's APIC ID, LDR, DFR, mode or enable state. Checks only this entry and allocates
  /// nothing. An ID another vCPU already has is accepted and counted (apic_id_conflicts; delivery as described at the
  /// top); a broadcast ID (xAPIC >= 0xFF, x2APIC 0xFFFFFFFF) is refused with INVALID_ARGUMENT, counted in
  /// addressing_refused, and the previous addressing kept. OUT_OF_RANGE for a vCPU that does not exist.
  absl::Status UpdateAddressing(VcpuIndex vcpu, const ApicAddressing& apic);
  /// The vCPU's node reported its current priority (PPR).
  absl::Status UpdatePriority(VcpuIndex vcpu, uint8_t priority);
  /// The vCPU's node reported `vector` pending or in service (true) or no longer (false); feeds the focus rule.
  absl::Status SetVectorActive(VcpuIndex vcpu, Vector vector, bool active);
  /// The vCPU moved to another node.
  absl::Status UpdateNode(VcpuIndex vcpu, NodeId node);

  /// Operator pins for the static policy. Unpin with std::nullopt.
  absl::Status PinVector(Vector vector, std::optional<VcpuIndex> vcpu);
  absl::Status PinGsi(Gsi gsi, std::optional<VcpuIndex> vcpu);

  [[nodiscard]] size_t vcpu_count() const { return vcpus_.size(); }
  [[nodiscard]] const VcpuInfo& vcpu(VcpuIndex i) const { return vcpus_[i.value()]; }
  [[nodiscard]] const RouterConfig& config() const { return config_; }
  [[nodiscard]] const RouterCounters& counters() const { return counters_; }
  /// How many APIC ID values are held by more than one vCPU right now (0 unless the guest made it so).
  [[nodiscard]] size_t shared_apic_ids() const { return shared_ids_; }

 private:
  static constexpr int32_t kNone = -1;
  static constexpr int32_t kShared = -2;  // small_id_: several vCPUs hold this ID
  static constexpr uint64_t kDisabledBit = 1ull << 42;
  static constexpr uint64_t kNotLocalBit = 1ull << 41;
  static constexpr uint64_t kNotFocusBit = 1ull << 40;
  using VectorSet = std::array<uint64_t, 4>;

  Router(std::vector<VcpuInfo> vcpus, RouterConfig config);
  static absl::Status ValidateTopology(const std::vector<VcpuInfo>& vcpus);
  [[nodiscard]] absl::Status CheckEntry(const ApicAddressing& apic) const;
  void RebuildIndex();
  void RefreshArbitration(uint32_t i);
  template <typename F>
  void ForEachWithId(uint32_t id, F&& visit) const;  // every vCPU holding APIC ID `id` (usually one)
  [[nodiscard]] bool IdShared(uint32_t id) const;
  [[nodiscard]] int32_t StaticPin(const InterruptRequest& request) const;
  template <typename F>
  void ForEachMatch(const InterruptMessage& m, F&& visit) const;

  RouterConfig config_;
  std::vector<VcpuInfo> vcpus_;
  std::vector<uint64_t> arb_base_;                         // per vCPU: disabled bit 42 | priority << 32
  std::vector<uint16_t> node_;                             // per vCPU: owning node (hot copy of vcpus_[i].node)
  std::vector<VectorSet> active_;                          // per vCPU: vectors pending or in service (focus)
  std::array<int32_t, 256> small_id_{};                    // APIC ID < 256 -> vCPU index, kNone or kShared
  std::vector<std::pair<uint32_t, uint32_t>> large_id_;    // sorted (APIC ID >= 256, vCPU index); may repeat an ID
  size_t shared_ids_ = 0;                                  // ID values held by more than one vCPU
  bool all_x2apic_ = false;
  std::array<uint32_t, 256> last_winner_{};                // per vector: the previous arbitration winner
  std::array<int32_t, 256> vector_pin_{};
  std::vector<std::pair<uint32_t, uint32_t>> gsi_pin_;     // sorted (GSI, vCPU index)
  std::vector<Delivery> scratch_;                          // Dispatch's buffer, sized once
  RouterCounters counters_;
  absl::Status bad_xapic_id_;                              // prebuilt refusals: returning a copy does not allocate
  absl::Status bad_x2apic_id_;
};

}  // namespace aggvm::irqchip
