// The data-plane frame: what crosses the network between nodes for every interrupt signal.
//
// Wire format (version 1): exactly 64 bytes, little-endian, so one frame fits an inline RDMA send and one cache line.
//
//   off size  field
//     0    1  version            kFrameVersion
//     1    1  type               FrameType
//     2    2  source node        NodeId of the sender
//     4    4  sequence number    per (sender, receiver) pair, starts at 1, +1 per frame
//     8    2  flags              FrameFlags (kTraced: the trace block is filled)
//    10   22  payload            per type, see the structs below; unused bytes are zero
//    32   32  trace block        trace id u32, raised ns u64, then five u32 deltas in ns from raised:
//                                local controller, master received, master decided, target received, injected
//
// One decoder (DecodeFrame) validates everything — version, type, flags, field ranges, zero padding — and returns a
// checked `Frame`; the rest of the code never reads wire bytes. Encoding cannot fail for a Frame that passed
// ValidateFrame. The per-type payload byte layouts are listed at the top of frame.cc and in docs/transport.md;
// golden-byte tests (transport/frame_test.cc) pin them.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <variant>

#include "absl/status/statusor.h"
#include "common/types.h"
#include "irqchip/interrupt.h"

namespace aggvm::transport {

inline constexpr size_t kFrameSize = 64;
inline constexpr uint8_t kFrameVersion = 1;
using WireFrame = std::array<uint8_t, kFrameSize>;
/// GSIs on the wire are below this bound (KVM_MAX_IRQ_ROUTES on x86, include/linux/kvm_host.h).
inline constexpr uint32_t kMaxGsi = 4096;

enum class FrameType : uint8_t {
  kInterrupt = 1,   // a device interrupt signal raised on a node (GSI level change or MSI), node -> master
  kDeliver = 2,     // an interrupt to inject into one vCPU (master -> owner node, or direct IPI node -> node)
  kIpi = 3,         // an IPI sent by a guest vCPU towards remote vCPUs, node -> master (or owner)
  kEoi = 4,         // end of interrupt for a level-triggered vector, node -> master
  kIoRequest = 5,   // PIO/MMIO access by a vCPU to a device on another node
  kIoResponse = 6,  // the answer to kIoRequest
  kControl = 7,     // small control messages (hello, ping, pong, goodbye)
};
std::string_view FrameTypeName(FrameType t);

enum FrameFlags : uint16_t {
  kFlagTraced = 1u << 0,
  kFlagsKnown = kFlagTraced,
};

using irqchip::DeliveryMode;

struct InterruptPayload {        // FrameType::kInterrupt
  enum class Kind : uint8_t { kGsiLevel = 0, kMsi = 1 } kind = Kind::kGsiLevel;
  uint8_t level = 0;             // kGsiLevel: 1 asserted, 0 deasserted (edge sources send 1 then 0)
  Gsi gsi{};                     // kGsiLevel: the pin / GSI
  uint64_t msi_address = 0;      // kMsi
  uint32_t msi_data = 0;         // kMsi
};
struct DeliverPayload {          // FrameType::kDeliver
  VcpuIndex vcpu{};              // target vCPU (must be owned by the receiving node)
  Vector vector{};
  DeliveryMode mode = DeliveryMode::kFixed;
  uint8_t level_triggered = 0;   // 1: the receiving node must send kEoi when the guest EOIs `vector`
  Gsi gsi{};                     // for level-triggered: the source pin (echoed in kEoi)
  uint32_t ipi_source_vcpu = 0xffffffff;  // for IPIs: the sending vCPU, else all ones
};
struct IpiPayload {              // FrameType::kIpi
  VcpuIndex source_vcpu{};
  uint32_t destination = 0;      // ICR destination field (x2APIC: 32 bits; xAPIC: bits 63:56 of ICR)
  Vector vector{};
  DeliveryMode mode = DeliveryMode::kFixed;
  uint8_t dest_logical = 0;      // ICR bit 11
  uint8_t shorthand = 0;         // ICR bits 19:18
  uint8_t level = 1;             // ICR bit 14
  uint8_t trigger_level = 0;     // ICR bit 15
};
struct EoiPayload {              // FrameType::kEoi
  VcpuIndex vcpu{};
  Vector vector{};
  Gsi gsi{};
};
struct IoRequestPayload {        // FrameType::kIoRequest / kIoResponse
  // On the wire space, is_write and log2(size) share one byte (bit 0 space, bit 1 write, bits 3:2 log2 size).
  enum class Space : uint8_t { kPio = 0, kMmio = 1 } space = Space::kPio;
  uint8_t is_write = 0;
  uint8_t size = 1;              // 1, 2, 4 or 8
  uint8_t status = 0;            // kIoResponse: 0 ok, 1 no device there (reads then return all ones)
  VcpuIndex vcpu{};
  uint64_t address = 0;          // kPio: < 0x10000
  uint64_t data = 0;             // write data, or read result in kIoResponse
};
struct ControlPayload {          // FrameType::kControl
  // kRaiseGsi (master -> node): raise GSI arg0 (< kMaxGsi) on the receiving node's local interrupt controller, as if
  // a device there had signalled it; the node then sends kInterrupt to the master. arg1 holds kRaise* bits only.
  enum class Op : uint8_t { kHello = 0, kPing = 1, kPong = 2, kGoodbye = 3, kRaiseGsi = 4 } op = Op::kHello;
  uint64_t arg0 = 0;
  uint64_t arg1 = 0;

  static constexpr uint64_t kRaiseLevel = 1u << 0;   // level-triggered source: hold the level (else an edge)
  static constexpr uint64_t kRaiseAssert = 1u << 1;  // level: the new input level (1 assert, 0 deassert); edge: 1
  static constexpr uint64_t kRaiseTraced = 1u << 2;  // the node fills a trace block from `raised` on
  static constexpr uint64_t kRaiseKnown = kRaiseLevel | kRaiseAssert | kRaiseTraced;
};

/// Per-hop timestamps in CLOCK_MONOTONIC ns (absolute; the wire carries deltas from `raised`). 0 = not reached.
struct TraceBlock {
  uint32_t trace_id = 0;
  uint64_t raised = 0;
  uint64_t local_controller = 0;
  uint64_t master_received = 0;
  uint64_t master_decided = 0;
  uint64_t target_received = 0;
  uint64_t injected = 0;
};

using Payload = std::variant<InterruptPayload, DeliverPayload, IpiPayload, EoiPayload, IoRequestPayload,
                             ControlPayload>;

/// A decoded, validated frame.
struct Frame {
  FrameType type = FrameType::kControl;
  NodeId source{};
  uint32_t sequence = 0;
  uint16_t flags = 0;
  Payload payload = ControlPayload{};
  TraceBlock trace{};  // meaningful only when flags & kFlagTraced

  [[nodiscard]] bool traced() const { return (flags & kFlagTraced) != 0; }
};

/// Checks a Frame built in memory (payload alternative matches type, field ranges). Same rules as DecodeFrame.
absl::Status ValidateFrame(const Frame& f);
/// Encodes a valid frame. Precondition: ValidateFrame(f).ok().
void EncodeFrame(const Frame& f, WireFrame& out);
/// Decodes and validates wire bytes; InvalidArgument / FailedPrecondition with a message naming the bad field.
absl::StatusOr<Frame> DecodeFrame(const uint8_t* data, size_t size);

}  // namespace aggvm::transport
