// The doorbell: a test device on the master that makes an interrupt ORIGINATE on a chosen node, so that the whole
// device-interrupt path (node A raises -> master routes -> node B injects) runs as it would for a real device on A.
//
// Ring(node, gsi, trigger, asserted) asks node `node`'s local controller to raise `gsi` (a kControl/kRaiseGsi frame,
// transport/frame.h); the node then signals the GSI to the master with kInterrupt frames, exactly as for a device of
// its own:
//   edge    the node sends assert then deassert (one rising edge); `asserted` must be true.
//   level   the node sets its input to `asserted` and holds it until told otherwise.
// Operators and tests call Ring through GlobalController::Ring (any thread). A guest can ring it with port I/O:
//
//   PIO window (default base 0x0A70, 8 ports):
//     +0  NODE   u16 read/write   target node id
//     +2  GSI    u16 read/write   GSI to raise (refused at ring time unless < 4096)
//     +4  RING   u8 write         bit 0 level (else edge), bit 1 assert (an edge always asserts), bit 2 traced:
//                                 rings NODE/GSI. Read: status of the last ring, 0 ok, 1 refused.
//     +5..+7     reserved: read 0, writes ignored (counted)
//   NODE and GSI take 1- or 2-byte accesses (a 1-byte access at +0/+2 sets the low byte, at +1/+3 the high byte);
//   other widths are ignored (counted) and read as all ones.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "common/counter.h"
#include "common/types.h"
#include "irqchip/interrupt.h"
#include "master/devices/pio_device.h"

namespace aggvm::master {

/// A train of edges: `count` rings, one every `interval_us`, timed by the raising node itself (kControl raise-gsi
/// with a count, transport/frame.h). count 0 = one ring, as without a train.
struct RingTrain {
  uint32_t count = 0;
  uint32_t interval_us = 0;
};

/// Where the doorbell's rings go: the GlobalController, which sends the kRaiseGsi frame.
class DoorbellTarget {
 public:
  virtual ~DoorbellTarget() = default;
  /// INVALID_ARGUMENT for a node that is not part of the VM, UNAVAILABLE if it is lost.
  virtual absl::Status RaiseOnNode(NodeId node, Gsi gsi, irqchip::TriggerMode trigger, bool asserted, bool traced,
                                   RingTrain train) = 0;
};

struct DoorbellCounters {
  Counter rings;          // accepted rings (operator and guest)
  Counter guest_rings;    // of which from a guest's RING write
  Counter refused;        // bad GSI, edge deassert, unknown or lost node
  Counter ignored;        // reserved registers, bad widths
};

class Doorbell final : public PioDevice {
 public:
  static constexpr uint16_t kDefaultBase = 0x0A70;
  static constexpr uint8_t kRingLevel = 1u << 0;
  static constexpr uint8_t kRingAssert = 1u << 1;
  static constexpr uint8_t kRingTraced = 1u << 2;

  explicit Doorbell(DoorbellTarget* target, uint16_t base = kDefaultBase) : target_(target), base_(base) {}

  /// Operator/test ring. Data-plane thread only (GlobalController::Ring gets it there).
  /// A train (train.count > 0) must be edges, count <= 1000000, interval 10..1000000 µs, count x interval <= 600 s.
  absl::Status Ring(NodeId node, Gsi gsi, irqchip::TriggerMode trigger, bool asserted, bool traced = false,
                    RingTrain train = {});

  [[nodiscard]] std::string_view name() const override { return "doorbell"; }
  [[nodiscard]] uint16_t base() const override { return base_; }
  [[nodiscard]] uint16_t size() const override { return 8; }
  uint32_t Read(VcpuIndex vcpu, uint16_t offset, uint8_t size) override;
  void Write(VcpuIndex vcpu, uint16_t offset, uint8_t size, uint32_t value) override;

  [[nodiscard]] const DoorbellCounters& counters() const { return counters_; }

 private:
  DoorbellTarget* target_;
  const uint16_t base_;
  uint16_t node_ = 0;
  uint16_t gsi_ = 0;
  uint8_t last_status_ = 0;
  DoorbellCounters counters_;
};

}  // namespace aggvm::master
