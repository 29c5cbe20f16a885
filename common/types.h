// Strong types for the numbers that are easy to mix up in an interrupt path.
//
// A vector, an APIC ID, a vCPU index, a node id and a GSI are all small integers; passing one where another is
// expected is the classic bug of interrupt code. Each is its own type here: construction is explicit, comparison
// works, arithmetic does not. GuestAddress (after vm-memory's) only offers checked offsetting.
#pragma once

#include <compare>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>

#include <fmt/format.h>

namespace aggvm {

template <typename Tag, typename Rep>
class StrongId {
 public:
  using rep_type = Rep;
  constexpr StrongId() = default;
  constexpr explicit StrongId(Rep v) : v_(v) {}
  [[nodiscard]] constexpr Rep value() const { return v_; }
  friend constexpr auto operator<=>(StrongId, StrongId) = default;
  friend constexpr bool operator==(StrongId, StrongId) = default;

 private:
  Rep v_{};
};

/// An interrupt vector (0..255). Vectors 0..15 are reserved by the SDM (vol. 3, 6.2) and illegal for fixed delivery.
using Vector = StrongId<struct VectorTag, uint8_t>;
/// A local APIC ID: 8 bits in xAPIC mode, 32 bits in x2APIC mode (SDM vol. 3, 11.4.6 / 11.12.5.1).
using ApicId = StrongId<struct ApicIdTag, uint32_t>;
/// The index of a vCPU in the VM (0..n-1), independent of the node it runs on.
using VcpuIndex = StrongId<struct VcpuIndexTag, uint32_t>;
/// A node of the cluster (master or agent).
using NodeId = StrongId<struct NodeIdTag, uint16_t>;
/// A global system interrupt (IOAPIC pin or KVM routing entry).
using Gsi = StrongId<struct GsiTag, uint32_t>;

/// A guest physical address. No arithmetic operators on purpose: use checked_add.
class GuestAddress {
 public:
  constexpr GuestAddress() = default;
  constexpr explicit GuestAddress(uint64_t raw) : raw_(raw) {}
  [[nodiscard]] constexpr uint64_t raw() const { return raw_; }
  /// this + off, or nullopt on overflow.
  [[nodiscard]] constexpr std::optional<GuestAddress> checked_add(uint64_t off) const {
    if (off > std::numeric_limits<uint64_t>::max() - raw_) return std::nullopt;
    return GuestAddress(raw_ + off);
  }
  friend constexpr auto operator<=>(GuestAddress, GuestAddress) = default;
  friend constexpr bool operator==(GuestAddress, GuestAddress) = default;

 private:
  uint64_t raw_ = 0;
};

}  // namespace aggvm

template <typename Tag, typename Rep>
struct std::hash<aggvm::StrongId<Tag, Rep>> {
  size_t operator()(aggvm::StrongId<Tag, Rep> id) const noexcept { return std::hash<Rep>{}(id.value()); }
};

template <typename Tag, typename Rep>
struct fmt::formatter<aggvm::StrongId<Tag, Rep>> : fmt::formatter<uint64_t> {
  auto format(aggvm::StrongId<Tag, Rep> id, fmt::format_context& ctx) const {
    return fmt::formatter<uint64_t>::format(static_cast<uint64_t>(id.value()), ctx);
  }
};

template <>
struct fmt::formatter<aggvm::GuestAddress> : fmt::formatter<uint64_t> {
  auto format(aggvm::GuestAddress a, fmt::format_context& ctx) const {
    return fmt::format_to(ctx.out(), "{:#x}", a.raw());
  }
};
