// Destination resolution: which local APICs an interrupt message names, and lowest-priority arbitration among them
// (SDM vol. 3, 11.6.2 "Determining IPI Destination", 11.12.10 x2APIC logical destinations).
//
// Matching interprets the destination field in the format of the RECEIVING APIC, as KVM does
// (kvm_apic_match_dest): a message may come from an xAPIC-format source (IOAPIC entry, 8-bit MSI) while the target
// runs in x2APIC mode.
//   physical (11.6.2.1)   destination == APIC ID; broadcast is 0xFFFFFFFF, and 0xFF for an xAPIC-format message
//                         or an xAPIC target.
//   logical, xAPIC flat   (11.6.2.2, DFR model 0xF): LDR[31:24] & dest[7:0] != 0.
//   logical, xAPIC cluster (DFR model 0x0): dest[7:4] == LDR[31:28] and dest[3:0] & LDR[27:24] != 0; 0xFF matches
//                         every cluster (broadcast).
//   logical, x2APIC       (11.12.10.2): LDR is read-only and derived from the ID: cluster ID[19:4] in LDR[31:16],
//                         bit 1 << ID[3:0] in LDR[15:0]; match when dest[31:16] == LDR[31:16] and dest[15:0] &
//                         LDR[15:0] != 0; 0xFFFFFFFF is broadcast. An xAPIC-format destination is used as is (a
//                         cluster-0 destination).
// For an xAPIC target an x2APIC-format logical destination is truncated to its low 8 bits (KVM does the same).
// Shorthands (ICR bits 19:18, 11.6.1): self = the sender only, all-including-self, all-excluding-self; the
// destination field is then ignored. The sender is identified by message.source (its APIC ID).
#pragma once

#include <cstdint>

#include "common/types.h"
#include "irqchip/interrupt.h"

namespace aggvm::irqchip {

inline constexpr uint32_t kXapicBroadcast = 0xFF;
inline constexpr uint32_t kX2apicBroadcast = 0xFFFFFFFF;
inline constexpr uint8_t kDfrFlat = 0xF;
inline constexpr uint8_t kDfrCluster = 0x0;

/// x2APIC logical ID, derived from the x2APIC ID (SDM vol. 3, 11.12.10.2).
constexpr uint32_t X2apicLdrFromId(ApicId id) {
  return ((id.value() >> 4) << 16) | (1u << (id.value() & 0xF));
}

/// True if the destination field (shorthand ignored) is a broadcast for `target` (SDM 11.6.2.1, 11.12.9).
bool IsBroadcastFor(const InterruptMessage& message, const ApicAddressing& target);

/// True if the destination field and destination mode name `target` (shorthand ignored). Does not look at
/// target.enabled: acceptance of a delivery mode by a disabled APIC is the receiver's business.
bool MatchesDestinationField(const InterruptMessage& message, const ApicAddressing& target);

/// True if `message` is addressed to `target`, shorthand included (SDM 11.6.1 bits 19:18, 11.6.2).
bool MatchesDestination(const InterruptMessage& message, const ApicAddressing& target);

/// True if the delivery mode is arbitrated to ONE target: lowest priority (11.6.2.4), or a redirectable fixed MSI
/// (11.11.1, RH = 1; KVM treats it as lowest priority, kvm_lowest_prio_delivery).
bool IsArbitrated(const InterruptMessage& message);

/// True if a software-disabled local APIC still accepts this delivery mode: NMI, SMI, INIT and SIPI (SDM 11.4.7.2).
bool AcceptedWhileDisabled(DeliveryMode mode);

/// Lowest-priority arbitration (SDM 11.6.2.4), streamed over the candidates so that no list is built.
///
/// The SDM leaves the choice among equal priorities model specific; the rule here is DETERMINISTIC and spreads load:
/// among the candidates of minimum priority the winner is the first index after `last_winner` in cyclic index order
/// (rotation from the previous winner). With the focus-processor option, a candidate that already has the vector
/// pending or in service (the "focus processor", 11.6.2.4) wins over any priority; several focus candidates are
/// broken by the same rotation. Priorities compare as full 8-bit values (PPR class in 7:4, subclass in 3:0).
/// Router applies exactly this ordering with precomputed per-vCPU keys (router.cc); this class is the reference
/// statement of the rule and what other callers (a node's local arbitration) use.
class LowestPriorityArbiter {
 public:
  LowestPriorityArbiter(uint32_t last_winner, bool use_focus) : last_(last_winner), use_focus_(use_focus) {}

  /// Offers candidate `index` (unique per arbitration) with its priority; `focus` = has the vector in IRR/ISR.
  void Offer(uint32_t index, uint8_t priority, bool focus) {
    // Lower key wins: focus first (when enabled), then priority, then cyclic distance after the last winner.
    const uint64_t focus_bit = (use_focus_ && focus) ? 0 : 1;
    const uint64_t key = (focus_bit << 40) | (static_cast<uint64_t>(priority) << 32) | (index - last_ - 1u);
    if (key < best_key_) {
      best_key_ = key;
      best_ = index;
    }
  }
  [[nodiscard]] bool has_winner() const { return best_key_ != kNone; }
  [[nodiscard]] uint32_t winner() const { return best_; }
  /// True if the winner won through the focus rule.
  [[nodiscard]] bool won_by_focus() const { return has_winner() && (best_key_ >> 40) == 0; }

 private:
  static constexpr uint64_t kNone = ~uint64_t{0};
  uint32_t last_;
  bool use_focus_;
  uint64_t best_key_ = kNone;
  uint32_t best_ = 0;
};

}  // namespace aggvm::irqchip
