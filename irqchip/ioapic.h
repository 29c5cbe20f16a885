// The I/O APIC, after the Intel 82093AA datasheet (sections 3.0-3.2) and SDM vol. 3, 11.8.5 (EOI of level
// interrupts). Pure logic: an interrupt message leaves through InterruptSink::SendMessage, nothing else happens.
//
// MMIO window (offsets from the base, normally 0xFEC00000):
//   0x00 IOREGSEL  bits 7:0 select the register seen through IOWIN (31:8 reserved)      -- 1, 2 or 4 byte access
//   0x10 IOWIN     the selected 32-bit register                                           -- 4 byte access only
//   0x40 EOI       write a vector = EOI for it (only when version >= 0x20, as in later IOAPICs and KVM)
// Registers (index written to IOREGSEL):
//   0x00 IOAPICID   bits 27:24 ID (R/W), others reserved
//   0x01 IOAPICVER  bits 7:0 version, 23:16 maximum redirection entry = pins - 1 (read only)
//   0x02 IOAPICARB  bits 27:24 arbitration ID (read only; loaded from the ID when the ID is written)
//   0x10 + 2n       redirection entry n, low dword; 0x11 + 2n high dword. Bits: 7:0 vector, 10:8 delivery mode,
//                   11 destination mode, 12 delivery status (RO), 13 polarity, 14 remote IRR (RO), 15 trigger (1
//                   level), 16 mask, 55:17 reserved, 63:56 destination.
// Writes to read-only fields and non-zero reserved bits are ignored and counted; so are accesses to registers that
// do not exist. Because IOREGSEL is 8 bits wide, at most 120 redirection entries are addressable.
//
// Pins: SetPinLevel takes the LOGICAL assertion state of the input (1 = asserted), as KVM_IRQ_LINE does; the
// polarity bit is stored and read back but not applied (KVM and cloud-hypervisor do the same; devices here are
// virtual and report assertion). Delivery status always reads 0: delivery is immediate.
//   edge   a message on each rising edge of the input while unmasked; an edge on a masked pin is lost (datasheet
//          3.2.4 "Interrupt Mask") and counted.
//   level  a message while the input is asserted, unmasked and remote IRR is clear; sending sets remote IRR. An EOI
//          for the vector clears remote IRR; if the input is still asserted the pin fires again. Unmasking an
//          asserted level pin fires it. Switching a pin to edge clears its remote IRR.
// A redirection entry with a reserved delivery mode (3 or 6) sends nothing; the attempt is counted.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/types.h"
#include "irqchip/interrupt.h"
#include "irqchip/sink.h"

namespace aggvm::irqchip {

struct IoApicConfig {
  uint32_t pins = 24;       // 1..120
  uint8_t id = 0;           // 0..15 (IOAPICID bits 27:24)
  uint8_t version = 0x11;   // 0x11 = 82093AA; >= 0x20 adds the EOI register at 0x40
  Gsi gsi_base{0};          // GSI of pin 0
};

struct IoApicCounters {
  uint64_t messages_sent = 0;
  uint64_t eois = 0;                    // EOI calls (register or broadcast)
  uint64_t remote_irr_cleared = 0;
  uint64_t level_redelivered = 0;       // a still-asserted level pin fired again after EOI
  uint64_t masked_edges_lost = 0;
  uint64_t reserved_delivery_mode = 0;  // a pin fired with delivery mode 3 or 6: nothing sent
  uint64_t read_only_writes = 0;        // IOAPICVER, IOAPICARB, delivery status, remote IRR
  uint64_t reserved_bit_writes = 0;     // non-zero reserved bits written (IOREGSEL 31:8, ID, entry 55:17)
  uint64_t bad_register_accesses = 0;   // an IOREGSEL index that selects nothing
  uint64_t bad_mmio_accesses = 0;       // wrong offset or size
  uint64_t bad_pins = 0;                // SetPinLevel for a pin that does not exist
};

class IoApic {
 public:
  static constexpr uint64_t kIoRegSel = 0x00;
  static constexpr uint64_t kIoWin = 0x10;
  static constexpr uint64_t kEoiRegister = 0x40;
  static constexpr uint64_t kMmioSize = 0x100;
  static constexpr uint32_t kMaxPins = 120;
  static constexpr uint8_t kRegId = 0x00;
  static constexpr uint8_t kRegVersion = 0x01;
  static constexpr uint8_t kRegArbitration = 0x02;
  static constexpr uint8_t kRegRedirectionBase = 0x10;

  // Redirection entry fields (82093AA 3.2.4).
  static constexpr uint64_t kRteVector = 0xFF;
  static constexpr uint64_t kRteDeliveryModeShift = 8;
  static constexpr uint64_t kRteDestLogical = 1ull << 11;
  static constexpr uint64_t kRteDeliveryStatus = 1ull << 12;
  static constexpr uint64_t kRtePolarityLow = 1ull << 13;
  static constexpr uint64_t kRteRemoteIrr = 1ull << 14;
  static constexpr uint64_t kRteLevel = 1ull << 15;
  static constexpr uint64_t kRteMask = 1ull << 16;
  static constexpr uint64_t kRteDestShift = 56;
  static constexpr uint64_t kRteWritable = kRteVector | (7ull << kRteDeliveryModeShift) | kRteDestLogical |
                                           kRtePolarityLow | kRteLevel | kRteMask | (0xFFull << kRteDestShift);
  static constexpr uint64_t kRteReadOnly = kRteDeliveryStatus | kRteRemoteIrr;
  static constexpr uint64_t kRteReserved = ~(kRteWritable | kRteReadOnly);

  /// All pins start masked, edge, vector 0 (datasheet: mask is set at reset). `sink` must outlive the IoApic.
  static absl::StatusOr<IoApic> Create(const IoApicConfig& config, InterruptSink* sink);

  /// MMIO access at `offset` from the base (size 1, 2, 4 or 8). Bad accesses are counted; reads of them return 0.
  uint32_t MmioRead(uint64_t offset, uint32_t size);
  void MmioWrite(uint64_t offset, uint32_t size, uint32_t value);

  /// Register access through IOREGSEL/IOWIN in one call (what the MMIO path does).
  uint32_t ReadRegister(uint8_t index);
  void WriteRegister(uint8_t index, uint32_t value);

  /// Sets the logical input level of `pin` (0-based). Unknown pins are counted and ignored.
  void SetPinLevel(uint32_t pin, bool asserted);
  /// End of interrupt for `vector` (EOI broadcast from a local APIC, or the EOI register).
  void Eoi(Vector vector);

  [[nodiscard]] uint32_t pins() const { return static_cast<uint32_t>(rte_.size()); }
  [[nodiscard]] Gsi gsi_base() const { return config_.gsi_base; }
  [[nodiscard]] uint64_t redirection_entry(uint32_t pin) const { return pin < pins() ? rte_[pin] : 0; }
  [[nodiscard]] bool remote_irr(uint32_t pin) const { return (redirection_entry(pin) & kRteRemoteIrr) != 0; }
  [[nodiscard]] bool input(uint32_t pin) const { return pin < pins() && input_[pin]; }
  [[nodiscard]] uint8_t ioregsel() const { return ioregsel_; }
  [[nodiscard]] const IoApicCounters& counters() const { return counters_; }

 private:
  IoApic(const IoApicConfig& config, InterruptSink* sink);
  void WriteRteHalf(uint32_t pin, bool high, uint32_t value);
  /// Sends pin's message if the level rules allow it (level pins only).
  void ServiceLevel(uint32_t pin);
  void Send(uint32_t pin);

  IoApicConfig config_;
  InterruptSink* sink_;
  uint8_t ioregsel_ = 0;
  uint8_t id_ = 0;
  uint8_t arbitration_id_ = 0;
  std::vector<uint64_t> rte_;
  std::vector<uint8_t> input_;  // logical input level per pin
  IoApicCounters counters_;
};

}  // namespace aggvm::irqchip
