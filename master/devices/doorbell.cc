#include "master/devices/doorbell.h"

#include <string_view>

#include <fmt/format.h>

#include "transport/frame.h"

namespace aggvm::master {
namespace {

// A 1- or 2-byte access to the u16 register at `reg` (0 or 2), at `offset`.
bool U16Access(uint16_t offset, uint8_t size, uint16_t reg) {
  return (size == 2 && offset == reg) || (size == 1 && (offset == reg || offset == reg + 1));
}

}  // namespace

absl::Status Doorbell::Ring(NodeId node, Gsi gsi, irqchip::TriggerMode trigger, bool asserted, bool traced,
                           RingTrain train) {
  if (gsi.value() >= transport::kMaxGsi) {
    counters_.refused.Add();
    return absl::InvalidArgumentError(
        fmt::format("doorbell: GSI {} is out of range (must be below {})", gsi, transport::kMaxGsi));
  }
  if (trigger == irqchip::TriggerMode::kEdge && !asserted) {
    counters_.refused.Add();
    return absl::InvalidArgumentError(
        fmt::format("doorbell: an edge on GSI {} is always an assertion; deassert only a level interrupt", gsi));
  }
  if (train.count != 0 || train.interval_us != 0) {
    const std::string_view why = trigger != irqchip::TriggerMode::kEdge
                                     ? std::string_view("a train is edges only")
                                     : transport::ControlPayload::TrainProblem(train.count, train.interval_us);
    if (!why.empty()) {
      counters_.refused.Add();
      return absl::InvalidArgumentError(
          fmt::format("doorbell: train on GSI {} (count {}, interval {} µs = {} s): {}", gsi, train.count,
                      train.interval_us, uint64_t{train.count} * train.interval_us / 1'000'000, why));
    }
  }
  absl::Status s = target_->RaiseOnNode(node, gsi, trigger, asserted, traced, train);
  if (s.ok()) {
    counters_.rings.Add();
  } else {
    counters_.refused.Add();
  }
  return s;
}

uint32_t Doorbell::Read(VcpuIndex vcpu, uint16_t offset, uint8_t size) {
  (void)vcpu;
  if (U16Access(offset, size, 0)) return size == 2 ? node_ : (node_ >> (8 * (offset - 0))) & 0xFF;
  if (U16Access(offset, size, 2)) return size == 2 ? gsi_ : (gsi_ >> (8 * (offset - 2))) & 0xFF;
  if (offset == 4 && size == 1) return last_status_;
  if (offset >= 5 && size == 1) return 0;
  counters_.ignored.Add();
  return 0xFFFFFFFFu;
}

void Doorbell::Write(VcpuIndex vcpu, uint16_t offset, uint8_t size, uint32_t value) {
  (void)vcpu;
  auto put16 = [&](uint16_t& reg, uint16_t base_off) {
    if (size == 2) {
      reg = static_cast<uint16_t>(value);
    } else {
      const unsigned shift = 8 * (offset - base_off);
      reg = static_cast<uint16_t>((reg & ~(0xFFu << shift)) | ((value & 0xFFu) << shift));
    }
  };
  if (U16Access(offset, size, 0)) {
    put16(node_, 0);
  } else if (U16Access(offset, size, 2)) {
    put16(gsi_, 2);
  } else if (offset == 4 && size == 1) {
    if ((value & ~uint32_t{kRingLevel | kRingAssert | kRingTraced}) != 0) {
      counters_.ignored.Add();
      last_status_ = 1;
      return;
    }
    const bool level = (value & kRingLevel) != 0;
    const bool asserted = !level || (value & kRingAssert) != 0;
    const absl::Status s = Ring(NodeId(node_), Gsi(gsi_), level ? irqchip::TriggerMode::kLevel
                                                                : irqchip::TriggerMode::kEdge,
                                asserted, (value & kRingTraced) != 0);
    last_status_ = s.ok() ? 0 : 1;
    if (s.ok()) counters_.guest_rings.Add();
  } else {
    counters_.ignored.Add();
  }
}

}  // namespace aggvm::master
