#include "irqchip/ioapic.h"

#include "absl/status/status.h"
#include "fmt/format.h"

namespace aggvm::irqchip {
namespace {
constexpr uint32_t kIdShift = 24;
constexpr uint32_t kIdMask = 0xFu << kIdShift;
}  // namespace

absl::StatusOr<IoApic> IoApic::Create(const IoApicConfig& config, InterruptSink* sink) {
  if (config.pins == 0 || config.pins > kMaxPins) {
    return absl::InvalidArgumentError(fmt::format(
        "IOAPIC pin count {} out of range: must be 1..{} (IOREGSEL is 8 bits wide, 82093AA 3.1)", config.pins,
        kMaxPins));
  }
  if (config.id > 0xF) {
    return absl::InvalidArgumentError(fmt::format("IOAPIC id {} does not fit IOAPICID bits 27:24 (0..15)", config.id));
  }
  if (sink == nullptr) return absl::InvalidArgumentError("IOAPIC needs an interrupt sink, got null");
  if (static_cast<uint64_t>(config.gsi_base.value()) + config.pins > (1ull << 32)) {
    return absl::InvalidArgumentError(fmt::format("IOAPIC GSI base {} + {} pins overflows", config.gsi_base, config.pins));
  }
  return IoApic(config, sink);
}

IoApic::IoApic(const IoApicConfig& config, InterruptSink* sink)
    : config_(config), sink_(sink), id_(config.id), arbitration_id_(config.id),
      rte_(config.pins, kRteMask), input_(config.pins, 0) {}

uint32_t IoApic::MmioRead(uint64_t offset, uint32_t size) {
  if (offset == kIoRegSel && (size == 1 || size == 2 || size == 4)) return ioregsel_;
  if (offset == kIoWin && size == 4) return ReadRegister(ioregsel_);
  ++counters_.bad_mmio_accesses;
  return 0;
}

void IoApic::MmioWrite(uint64_t offset, uint32_t size, uint32_t value) {
  if (offset == kIoRegSel && (size == 1 || size == 2 || size == 4)) {
    if (size > 1 && (value >> 8) != 0) ++counters_.reserved_bit_writes;
    ioregsel_ = static_cast<uint8_t>(value);
    return;
  }
  if (offset == kIoWin && size == 4) {
    WriteRegister(ioregsel_, value);
    return;
  }
  if (offset == kEoiRegister && size == 4 && config_.version >= 0x20) {
    if ((value >> 8) != 0) ++counters_.reserved_bit_writes;
    Eoi(Vector(static_cast<uint8_t>(value)));
    return;
  }
  ++counters_.bad_mmio_accesses;
}

uint32_t IoApic::ReadRegister(uint8_t index) {
  switch (index) {
    case kRegId: return static_cast<uint32_t>(id_) << kIdShift;
    case kRegVersion: return config_.version | ((pins() - 1) << 16);
    case kRegArbitration: return static_cast<uint32_t>(arbitration_id_) << kIdShift;
    default: break;
  }
  if (index >= kRegRedirectionBase) {
    const uint32_t pin = (index - kRegRedirectionBase) / 2;
    if (pin < pins()) {
      const bool high = (index & 1) != 0;
      return static_cast<uint32_t>(high ? rte_[pin] >> 32 : rte_[pin]);
    }
  }
  ++counters_.bad_register_accesses;
  return 0;
}

void IoApic::WriteRegister(uint8_t index, uint32_t value) {
  switch (index) {
    case kRegId:
      if (value & ~kIdMask) ++counters_.reserved_bit_writes;
      id_ = static_cast<uint8_t>((value & kIdMask) >> kIdShift);
      arbitration_id_ = id_;  // 82093AA 3.2.3: IOAPICARB is loaded when IOAPICID is written
      return;
    case kRegVersion:
    case kRegArbitration:
      ++counters_.read_only_writes;
      return;
    default: break;
  }
  if (index >= kRegRedirectionBase) {
    const uint32_t pin = (index - kRegRedirectionBase) / 2;
    if (pin < pins()) {
      WriteRteHalf(pin, (index & 1) != 0, value);
      return;
    }
  }
  ++counters_.bad_register_accesses;
}

void IoApic::WriteRteHalf(uint32_t pin, bool high, uint32_t value) {
  const uint64_t old = rte_[pin];
  const uint64_t half_mask = high ? 0xFFFFFFFF00000000ull : 0x00000000FFFFFFFFull;
  const uint64_t incoming = high ? static_cast<uint64_t>(value) << 32 : value;
  if (incoming & kRteReserved & half_mask) ++counters_.reserved_bit_writes;
  // Read-modify-write of an entry rewrites the read-only bits with what was read: count only real attempts to change.
  if ((incoming ^ old) & kRteReadOnly & half_mask) ++counters_.read_only_writes;
  uint64_t next = (old & ~(kRteWritable & half_mask)) | (incoming & kRteWritable & half_mask);
  if (!(next & kRteLevel)) next &= ~kRteRemoteIrr;  // an edge pin has no remote IRR (as KVM's ioapic.c)
  rte_[pin] = next;
  // A level pin that is asserted fires when it becomes unmasked, or when it becomes level-triggered while asserted.
  if ((next & kRteLevel) && input_[pin]) ServiceLevel(pin);
}

void IoApic::SetPinLevel(uint32_t pin, bool asserted) {
  if (pin >= pins()) {
    ++counters_.bad_pins;
    return;
  }
  const bool was = input_[pin] != 0;
  input_[pin] = asserted ? 1 : 0;
  const uint64_t e = rte_[pin];
  if (e & kRteLevel) {
    if (asserted) ServiceLevel(pin);
    return;
  }
  if (!asserted || was) return;  // edge: only a rising edge counts
  if (e & kRteMask) {
    ++counters_.masked_edges_lost;
    return;
  }
  Send(pin);
}

void IoApic::ServiceLevel(uint32_t pin) {
  uint64_t& e = rte_[pin];
  if ((e & kRteMask) || (e & kRteRemoteIrr) || !input_[pin]) return;
  const auto dm = (e >> kRteDeliveryModeShift) & 7;
  if (dm == 3 || dm == 6) {  // reserved: nothing is sent, and remote IRR stays clear
    ++counters_.reserved_delivery_mode;
    return;
  }
  e |= kRteRemoteIrr;
  Send(pin);
}

void IoApic::Send(uint32_t pin) {
  const uint64_t e = rte_[pin];
  const auto dm = static_cast<uint32_t>((e >> kRteDeliveryModeShift) & 7);
  if (dm == 3 || dm == 6) {
    ++counters_.reserved_delivery_mode;
    return;
  }
  InterruptMessage m;
  m.vector = Vector(static_cast<uint8_t>(e & kRteVector));
  m.mode = static_cast<DeliveryMode>(dm);
  m.dest_mode = (e & kRteDestLogical) ? DestMode::kLogical : DestMode::kPhysical;
  m.trigger = (e & kRteLevel) ? TriggerMode::kLevel : TriggerMode::kEdge;
  m.level = true;
  m.shorthand = Shorthand::kNone;
  m.destination = static_cast<uint32_t>(e >> kRteDestShift);
  m.x2apic_destination = false;
  m.redirection_hint = false;
  ++counters_.messages_sent;
  sink_->SendMessage(m, Gsi(config_.gsi_base.value() + pin));
}

void IoApic::Eoi(Vector vector) {
  ++counters_.eois;
  for (uint32_t pin = 0; pin < pins(); ++pin) {
    uint64_t& e = rte_[pin];
    if ((e & kRteVector) != vector.value() || !(e & kRteRemoteIrr)) continue;
    e &= ~kRteRemoteIrr;
    ++counters_.remote_irr_cleared;
    // 82093AA 3.2.4 / SDM 11.8.5: a level input still asserted after the EOI is a new interrupt.
    ServiceLevel(pin);
    if (e & kRteRemoteIrr) ++counters_.level_redelivered;
  }
}

}  // namespace aggvm::irqchip
