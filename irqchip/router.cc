#include "irqchip/router.h"

#include <algorithm>
#include <bit>

#include "fmt/format.h"
#include "irqchip/destination.h"

namespace aggvm::irqchip {

std::string_view RoutingPolicyName(RoutingPolicy p) {
  switch (p) {
    case RoutingPolicy::kSdm: return "sdm";
    case RoutingPolicy::kRoundRobin: return "round-robin";
    case RoutingPolicy::kNodeLocalFirst: return "node-local-first";
    case RoutingPolicy::kStatic: return "static";
  }
  return "unknown";
}

absl::StatusOr<RoutingPolicy> ParseRoutingPolicy(std::string_view name) {
  for (auto p : {RoutingPolicy::kSdm, RoutingPolicy::kRoundRobin, RoutingPolicy::kNodeLocalFirst,
                 RoutingPolicy::kStatic}) {
    if (name == RoutingPolicyName(p)) return p;
  }
  return absl::InvalidArgumentError(fmt::format(
      "unknown routing policy '{}': use sdm, round-robin, node-local-first or static", name));
}

absl::Status Router::ValidateTopology(const std::vector<VcpuInfo>& vcpus) {
  if (vcpus.empty() || vcpus.size() > kMaxVcpus) {
    return absl::InvalidArgumentError(
        fmt::format("router topology has {} vCPUs: must be 1..{}", vcpus.size(), kMaxVcpus));
  }
  std::vector<std::pair<uint32_t, size_t>> ids;
  ids.reserve(vcpus.size());
  for (size_t i = 0; i < vcpus.size(); ++i) {
    const ApicAddressing& a = vcpus[i].apic;
    if (!a.x2apic && a.id.value() >= kXapicBroadcast) {
      return absl::InvalidArgumentError(fmt::format(
          "vCPU {}: xAPIC ID {} out of range: must be below 0xFF, the broadcast ID (SDM vol. 3, 11.6.2.1)", i, a.id));
    }
    if (a.x2apic && a.id.value() == kX2apicBroadcast) {
      return absl::InvalidArgumentError(fmt::format("vCPU {}: x2APIC ID 0xFFFFFFFF is the broadcast ID", i));
    }
    ids.emplace_back(a.id.value(), i);
  }
  std::sort(ids.begin(), ids.end());
  for (size_t i = 1; i < ids.size(); ++i) {
    if (ids[i].first == ids[i - 1].first) {
      return absl::InvalidArgumentError(fmt::format("vCPUs {} and {} share APIC ID {}: APIC IDs must be unique",
                                                    ids[i - 1].second, ids[i].second, ids[i].first));
    }
  }
  return absl::OkStatus();
}

absl::Status Router::CheckEntry(const ApicAddressing& a) const {
  // No allocation: the statuses are built once per router (a guest can repeat a bad write as often as it likes).
  if (!a.x2apic && a.id.value() >= kXapicBroadcast) return bad_xapic_id_;
  if (a.x2apic && a.id.value() == kX2apicBroadcast) return bad_x2apic_id_;
  return absl::OkStatus();
}

absl::StatusOr<Router> Router::Create(std::vector<VcpuInfo> vcpus, RouterConfig config) {
  if (auto s = ValidateTopology(vcpus); !s.ok()) return s;
  return Router(std::move(vcpus), config);
}

Router::Router(std::vector<VcpuInfo> vcpus, RouterConfig config)
    : config_(config),
      vcpus_(std::move(vcpus)),
      active_(vcpus_.size(), VectorSet{}),
      scratch_(vcpus_.size()),
      bad_xapic_id_(absl::InvalidArgumentError(
          "guest APIC update refused: xAPIC ID 0xFF or above (0xFF is the broadcast ID, SDM vol. 3, 11.6.2.1); the "
          "router keeps the vCPU's previous addressing")),
      bad_x2apic_id_(absl::InvalidArgumentError(
          "guest APIC update refused: x2APIC ID 0xFFFFFFFF is the broadcast ID; the router keeps the vCPU's previous "
          "addressing")) {
  large_id_.reserve(vcpus_.size());  // RebuildIndex never allocates after this
  // The first arbitration of a vector starts the rotation at index 0 (the index after ~0u).
  last_winner_.fill(~0u);
  vector_pin_.fill(kNone);
  arb_base_.resize(vcpus_.size());
  node_.resize(vcpus_.size());
  for (size_t i = 0; i < vcpus_.size(); ++i) {
    RefreshArbitration(static_cast<uint32_t>(i));
    node_[i] = vcpus_[i].node.value();
  }
  RebuildIndex();
}

void Router::RebuildIndex() {
  small_id_.fill(kNone);
  large_id_.clear();
  all_x2apic_ = true;
  shared_ids_ = 0;
  for (size_t i = 0; i < vcpus_.size(); ++i) {
    const uint32_t id = vcpus_[i].apic.id.value();
    if (id < small_id_.size()) {
      int32_t& slot = small_id_[id];
      if (slot >= 0) ++shared_ids_;  // the second holder of this ID (a third one is not counted again)
      slot = slot == kNone ? static_cast<int32_t>(i) : kShared;
    } else {
      large_id_.emplace_back(id, static_cast<uint32_t>(i));
    }
    all_x2apic_ = all_x2apic_ && vcpus_[i].apic.x2apic;
  }
  std::sort(large_id_.begin(), large_id_.end());
  for (size_t k = 1; k < large_id_.size(); ++k) {
    if (large_id_[k].first == large_id_[k - 1].first && (k < 2 || large_id_[k - 2].first != large_id_[k].first)) {
      ++shared_ids_;
    }
  }
}

void Router::RefreshArbitration(uint32_t i) {
  arb_base_[i] = (vcpus_[i].apic.enabled ? 0 : kDisabledBit) | (static_cast<uint64_t>(vcpus_[i].priority) << 32);
}

template <typename F>
void Router::ForEachWithId(uint32_t id, F&& visit) const {
  if (id < small_id_.size()) {
    const int32_t i = small_id_[id];
    if (i >= 0) {
      visit(static_cast<uint32_t>(i));
    } else if (i == kShared) {  // rare: the guest gave two APICs this ID
      for (uint32_t k = 0; k < vcpus_.size(); ++k) {
        if (vcpus_[k].apic.id.value() == id) visit(k);
      }
    }
    return;
  }
  auto it = std::lower_bound(large_id_.begin(), large_id_.end(), std::make_pair(id, uint32_t{0}));
  for (; it != large_id_.end() && it->first == id; ++it) visit(it->second);
}

bool Router::IdShared(uint32_t id) const {
  if (id < small_id_.size()) return small_id_[id] == kShared;
  auto it = std::lower_bound(large_id_.begin(), large_id_.end(), std::make_pair(id, uint32_t{0}));
  return it != large_id_.end() && it->first == id && it + 1 != large_id_.end() && (it + 1)->first == id;
}

// Calls visit(index) once for every vCPU whose APIC `m` addresses (SDM 11.6.2), without regard to enable state.
// Fast paths give the same set as the reference scan (checked by the property test in router_test.cc).
template <typename F>
void Router::ForEachMatch(const InterruptMessage& m, F&& visit) const {
  const auto n = static_cast<uint32_t>(vcpus_.size());
  switch (m.shorthand) {
    case Shorthand::kSelf:
      // The message names its sender by APIC ID only: if the guest gave two APICs that ID, both get it.
      ForEachWithId(m.source.value(), visit);
      return;
    case Shorthand::kAllIncludingSelf:
      for (uint32_t i = 0; i < n; ++i) visit(i);
      return;
    case Shorthand::kAllExcludingSelf:
      for (uint32_t i = 0; i < n; ++i) {
        if (vcpus_[i].apic.id != m.source) visit(i);
      }
      return;
    case Shorthand::kNone: break;
  }
  const uint32_t dest = m.destination;
  // A broadcast for every target, whatever its mode.
  if (dest == kX2apicBroadcast || (dest == kXapicBroadcast && !m.x2apic_destination)) {
    for (uint32_t i = 0; i < n; ++i) visit(i);
    return;
  }
  if (dest != kXapicBroadcast) {
    if (m.dest_mode == DestMode::kPhysical) {
      // Every APIC whose ID equals the destination accepts (SDM 11.6.2.1): one, or several if the guest gave two
      // APICs the same ID.
      ForEachWithId(dest, visit);
      return;
    }
    if (all_x2apic_) {
      // x2APIC logical: the LDR is derived from the ID, so each set bit b of dest[15:0] names exactly the APIC
      // with ID (dest[31:16] << 4) | b (SDM 11.12.10.2).
      const uint32_t cluster_base = (dest >> 16) << 4;
      for (uint32_t bits = dest & 0xFFFF; bits != 0; bits &= bits - 1) {
        ForEachWithId(cluster_base | static_cast<uint32_t>(std::countr_zero(bits)), visit);
      }
      return;
    }
  }
  for (uint32_t i = 0; i < n; ++i) {
    if (MatchesDestinationField(m, vcpus_[i].apic)) visit(i);
  }
}

int32_t Router::StaticPin(const InterruptRequest& request) const {
  if (request.gsi) {
    const uint32_t g = request.gsi->value();
    auto it = std::lower_bound(gsi_pin_.begin(), gsi_pin_.end(), std::make_pair(g, uint32_t{0}));
    if (it != gsi_pin_.end() && it->first == g) return static_cast<int32_t>(it->second);
  }
  return vector_pin_[request.message.vector.value()];
}

RouteResult Router::Route(const InterruptRequest& request, std::span<Delivery> out) {
  ++counters_.decisions;
  const InterruptMessage& m = request.message;
  const auto mode_bits = static_cast<uint8_t>(m.mode);
  if (mode_bits == 3 || mode_bits > 7) {
    ++counters_.bad_message;
    return {0, RouteOutcome::kBadMessage};
  }
  const bool needs_enabled = !AcceptedWhileDisabled(m.mode);
  RouteResult result{0, RouteOutcome::kDelivered};

  if (!IsArbitrated(m)) {
    ForEachMatch(m, [&](uint32_t i) {
      const VcpuInfo& v = vcpus_[i];
      if (needs_enabled && !v.apic.enabled) {
        ++counters_.disabled_skipped;
        return;
      }
      if (result.count < out.size()) {
        out[result.count++] = Delivery{VcpuIndex(i), v.node};
      } else {
        result.outcome = RouteOutcome::kTruncated;
      }
    });
  } else {
    // Arbitration (SDM 11.6.2.4) as one minimum over 64-bit keys, branch-free per candidate. Lower key wins:
    //   bit 42  the APIC is disabled (never wins)         bit 41  not on the source node (node-local-first only)
    //   bit 40  not a focus processor (focus option only)  39:32  priority (0 under round-robin)
    //   31:0    cyclic distance after the vector's last winner: ties rotate (LowestPriorityArbiter's rule)
    const uint8_t vec = m.vector.value();
    const uint32_t rot = last_winner_[vec] + 1u;
    const bool focus = config_.focus_processor && config_.policy != RoutingPolicy::kStatic;
    const uint64_t prio_mask = config_.policy == RoutingPolicy::kRoundRobin ? kDisabledBit : ~uint64_t{0};
    const uint64_t local_bit = config_.policy == RoutingPolicy::kNodeLocalFirst ? kNotLocalBit : 0;
    const uint16_t src = request.source_node.value();
    const uint32_t vec_word = vec >> 6;
    const uint32_t vec_shift = vec & 63;
    const int32_t pinned = config_.policy == RoutingPolicy::kStatic ? StaticPin(request) : kNone;
    const uint64_t* base = arb_base_.data();
    const uint16_t* node = node_.data();
    uint64_t best = ~uint64_t{0};
    uint32_t disabled = 0;
    bool pinned_seen = false;
    auto offer = [&](uint32_t i) {
      uint64_t key = (base[i] & prio_mask) | (static_cast<uint64_t>(node[i] != src) * local_bit) |
                     static_cast<uint32_t>(i - rot);
      if (focus) key |= (((active_[i][vec_word] >> vec_shift) & 1) ^ 1) << 40;
      else key |= kNotFocusBit;
      disabled += static_cast<uint32_t>(base[i] >> 42);
      pinned_seen |= static_cast<int32_t>(i) == pinned;
      best = key < best ? key : best;
    };
    const bool all_candidates =
        m.shorthand == Shorthand::kAllIncludingSelf ||
        (m.shorthand == Shorthand::kNone &&
         (m.destination == kX2apicBroadcast || (m.destination == kXapicBroadcast && !m.x2apic_destination)));
    if (all_candidates && !focus && pinned == kNone) {
      // The common "any vCPU" case (lowest priority to a broadcast): the same keys, two independent minimum chains
      // so that the compare/select latency of one hides behind the other.
      const auto n = static_cast<uint32_t>(arb_base_.size());
      uint64_t best1 = best;
      uint32_t i = 0;
      auto key_of = [&](uint32_t k) {
        return (base[k] & prio_mask) | (static_cast<uint64_t>(node[k] != src) * local_bit) | kNotFocusBit |
               static_cast<uint32_t>(k - rot);
      };
      for (; i + 1 < n; i += 2) {
        const uint64_t k0 = key_of(i);
        const uint64_t k1 = key_of(i + 1);
        disabled += static_cast<uint32_t>((base[i] >> 42) + (base[i + 1] >> 42));
        best = k0 < best ? k0 : best;
        best1 = k1 < best1 ? k1 : best1;
      }
      if (i < n) {
        best1 = std::min(best1, key_of(i));
        disabled += static_cast<uint32_t>(base[i] >> 42);
      }
      best = std::min(best, best1);
    } else {
      ForEachMatch(m, offer);
    }
    counters_.disabled_skipped += disabled;
    if (best < kDisabledBit) {
      ++counters_.arbitrated;
      auto winner = static_cast<uint32_t>(best) + rot;  // undo the rotation: distance + last + 1
      if (local_bit) {
        ++(best & kNotLocalBit ? counters_.node_local_fallbacks : counters_.node_local_wins);
      }
      if (focus && !(best & kNotFocusBit)) ++counters_.focus_wins;
      if (config_.policy == RoutingPolicy::kStatic) {
        if (pinned_seen && vcpus_[static_cast<uint32_t>(pinned)].apic.enabled) {
          winner = static_cast<uint32_t>(pinned);
          ++counters_.static_pinned;
        } else {
          ++counters_.static_fallbacks;
        }
      }
      last_winner_[vec] = winner;
      if (!out.empty()) {
        out[0] = Delivery{VcpuIndex(winner), vcpus_[winner].node};
        result.count = 1;
      } else {
        result.outcome = RouteOutcome::kTruncated;
      }
    }
  }

  if (result.outcome == RouteOutcome::kTruncated) {
    ++counters_.truncated;
  } else if (result.count == 0) {
    result.outcome = RouteOutcome::kNoDestination;
    ++counters_.no_destination;
  }
  counters_.deliveries += result.count;
  return result;
}

RouteResult Router::Dispatch(const InterruptRequest& request, InterruptSink& sink) {
  const RouteResult r = Route(request, std::span<Delivery>(scratch_));
  for (uint32_t i = 0; i < r.count; ++i) sink.Deliver(scratch_[i].vcpu, scratch_[i].node, request.message);
  return r;
}

namespace {
absl::Status BadVcpu(VcpuIndex vcpu, size_t n) {
  return absl::OutOfRangeError(fmt::format("vCPU {} does not exist: the VM has {} vCPUs", vcpu, n));
}
}  // namespace

absl::Status Router::UpdateAddressing(VcpuIndex vcpu, const ApicAddressing& apic) {
  if (vcpu.value() >= vcpus_.size()) return BadVcpu(vcpu, vcpus_.size());
  // Only the changed entry is checked, and nothing is allocated: the guest triggers this with every ID/LDR/DFR write.
  if (absl::Status s = CheckEntry(apic); !s.ok()) {
    ++counters_.addressing_refused;
    return s;
  }
  const ApicId old_id = vcpus_[vcpu.value()].apic.id;
  vcpus_[vcpu.value()].apic = apic;
  RefreshArbitration(vcpu.value());
  RebuildIndex();  // O(n), no allocation (large_id_ keeps its capacity)
  // Two APICs with one ID: the router follows the guest, as hardware does (see router.h), and counts it.
  if (apic.id != old_id && IdShared(apic.id.value())) ++counters_.apic_id_conflicts;
  return absl::OkStatus();
}

absl::Status Router::UpdatePriority(VcpuIndex vcpu, uint8_t priority) {
  if (vcpu.value() >= vcpus_.size()) return BadVcpu(vcpu, vcpus_.size());
  vcpus_[vcpu.value()].priority = priority;
  RefreshArbitration(vcpu.value());
  return absl::OkStatus();
}

absl::Status Router::SetVectorActive(VcpuIndex vcpu, Vector vector, bool active) {
  if (vcpu.value() >= vcpus_.size()) return BadVcpu(vcpu, vcpus_.size());
  uint64_t& word = active_[vcpu.value()][vector.value() >> 6];
  const uint64_t bit = 1ull << (vector.value() & 63);
  word = active ? (word | bit) : (word & ~bit);
  return absl::OkStatus();
}

absl::Status Router::UpdateNode(VcpuIndex vcpu, NodeId node) {
  if (vcpu.value() >= vcpus_.size()) return BadVcpu(vcpu, vcpus_.size());
  vcpus_[vcpu.value()].node = node;
  node_[vcpu.value()] = node.value();
  return absl::OkStatus();
}

absl::Status Router::PinVector(Vector vector, std::optional<VcpuIndex> vcpu) {
  if (vcpu && vcpu->value() >= vcpus_.size()) return BadVcpu(*vcpu, vcpus_.size());
  vector_pin_[vector.value()] = vcpu ? static_cast<int32_t>(vcpu->value()) : kNone;
  return absl::OkStatus();
}

absl::Status Router::PinGsi(Gsi gsi, std::optional<VcpuIndex> vcpu) {
  if (vcpu && vcpu->value() >= vcpus_.size()) return BadVcpu(*vcpu, vcpus_.size());
  auto it = std::lower_bound(gsi_pin_.begin(), gsi_pin_.end(), std::make_pair(gsi.value(), uint32_t{0}));
  const bool present = it != gsi_pin_.end() && it->first == gsi.value();
  if (!vcpu) {
    if (present) gsi_pin_.erase(it);
  } else if (present) {
    it->second = vcpu->value();
  } else {
    gsi_pin_.insert(it, {gsi.value(), vcpu->value()});
  }
  return absl::OkStatus();
}

}  // namespace aggvm::irqchip
