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
// One decoder (DecodeFrameRaw; DecodeFrame wraps it) validates everything — version, type, flags, field ranges,
// zero padding — and returns a checked `Frame`; the rest of the code never reads wire bytes. Encoding cannot fail
// for a Frame that passed ValidateFrame. The per-type payload byte layouts are listed at the top of frame.cc and in
// docs/transport.md; golden-byte tests (transport/frame_test.cc) pin them.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
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
  // kGsiLevel: 1 asserted, 0 deasserted (level sources), kLevelEdge one rising edge: the pin asserted then
  // deasserted at the master, in one frame (edge sources; a level-triggered pin takes it as a short pulse).
  uint8_t level = 0;
  static constexpr uint8_t kLevelEdge = 2;
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
/// IpiPayload::source_vcpu of an IPI whose sender is unknown and whose destination was already resolved to one APIC
/// ID by the sending node's KVM (a proxy vCPU caught it, docs/proxy.md): only a physical destination without
/// shorthand may carry it (the decoder refuses anything else), and the master routes it without a sender check.
inline constexpr uint32_t kIpiSourceProxyResolved = 0xffffffffu;

struct IpiPayload {              // FrameType::kIpi
  VcpuIndex source_vcpu{};       // the sending vCPU, or kIpiSourceProxyResolved
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
  // a device there had signalled it; the node then sends kInterrupt to the master. arg1 holds kRaise* bits and,
  // for a train of edges, a count and an interval (TrainBits below).
  // kPriority (node -> master): vCPU arg0 (< kMaxPriorityVcpus, run by the sending node) now has processor priority
  // arg1 (PPR, 0..255, SDM vol. 3, 11.8.3.1), for the Router's lowest-priority arbitration. Sent on change only.
  enum class Op : uint8_t { kHello = 0, kPing = 1, kPong = 2, kGoodbye = 3, kRaiseGsi = 4, kPriority = 5 } op = Op::kHello;
  uint64_t arg0 = 0;
  uint64_t arg1 = 0;

  static constexpr uint64_t kRaiseLevel = 1u << 0;   // level-triggered source: hold the level (else an edge)
  static constexpr uint64_t kRaiseAssert = 1u << 1;  // level: the new input level (1 assert, 0 deassert); edge: 1
  static constexpr uint64_t kRaiseTraced = 1u << 2;  // the node fills a trace block from `raised` on
  static constexpr uint64_t kRaiseKnown = kRaiseLevel | kRaiseAssert | kRaiseTraced;
  static constexpr uint64_t kMaxPriorityVcpus = 1024;

  // A raise-gsi train: arg1 bits 8..31 hold a count, bits 32..63 an interval in µs. Count 0 (and interval 0) is the
  // single raise above. Count >= 1 with an interval is a train: `count` edges of the GSI, one every `interval` µs
  // from the moment the node receives the frame, timed by the node's own clock — what a device on that node
  // raising interrupts at a set rate does, with nothing else (no RPC, no master) in the path of each raise. A new
  // train replaces a running one; count 1 with an interval thus stops one. Edges only.
  static constexpr unsigned kTrainCountShift = 8;
  static constexpr unsigned kTrainIntervalShift = 32;
  static constexpr uint64_t kTrainCountMask = 0xFFFFFFull << kTrainCountShift;
  static constexpr uint32_t kMaxTrainCount = 1'000'000;
  static constexpr uint32_t kMinTrainIntervalUs = 10;
  static constexpr uint32_t kMaxTrainIntervalUs = 1'000'000;
  static constexpr uint64_t kMaxTrainSpanUs = 600'000'000;  // count x interval: 10 minutes at most
  static_assert(kMaxTrainCount <= (kTrainCountMask >> kTrainCountShift));
  static_assert((kRaiseKnown & kTrainCountMask) == 0 && kTrainIntervalShift >= 8 + 24);

  static constexpr uint64_t TrainBits(uint32_t count, uint32_t interval_us) {
    return (uint64_t{count} << kTrainCountShift) | (uint64_t{interval_us} << kTrainIntervalShift);
  }
  static constexpr uint32_t TrainCount(uint64_t arg1) {
    return static_cast<uint32_t>((arg1 & kTrainCountMask) >> kTrainCountShift);
  }
  static constexpr uint32_t TrainIntervalUs(uint64_t arg1) { return static_cast<uint32_t>(arg1 >> kTrainIntervalShift); }
  /// The one rule for a train's count and interval (frame decoder, master doorbell, experiment files): "" when they
  /// are acceptable, else what is wrong (a string literal: NUL-terminated, no allocation). A train of levels is
  /// refused by the callers, which know the trigger.
  static constexpr std::string_view TrainProblem(uint32_t count, uint32_t interval_us) {
    if (count == 0 || count > kMaxTrainCount) return "the count must be 1..1000000";
    if (interval_us < kMinTrainIntervalUs || interval_us > kMaxTrainIntervalUs) {
      return "the interval must be 10..1000000 µs";
    }
    if (uint64_t{count} * interval_us > kMaxTrainSpanUs) return "count x interval must be at most 600 s";
    return {};
  }
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

/// Why a frame was refused, as plain values: building one never allocates, so a receive path can keep it for every
/// bad frame a peer sends and render a message (DescribeFrameError) only when someone asks.
enum class FrameErrorCode : uint8_t {
  kOk = 0,
  kSize,           // not exactly kFrameSize bytes; value = the size
  kVersion,        // version byte is not kFrameVersion; value = the version seen
  kInvalidField,   // a field breaks its rule (field, value, rule); includes unknown type and non-zero padding
  kWrongSource,    // (transports) a valid frame that claims another source node than the connection's; value = it
  kNotASend,       // (rdma) a receive completion that is not a SEND (e.g. RDMA write with immediate); value = opcode
};

/// The field an error names. kPaddingByte / kTraceByte carry the byte offset in FrameError::offset.
enum class FrameField : uint8_t {
  kNone = 0, kSize, kVersion, kType, kSource, kSequence, kFlags, kPayload,
  kKind, kLevel, kGsi, kMsiAddress, kMsiData,
  kMode, kVector, kLevelTriggered,
  kDestLogical, kShorthand, kTriggerLevel,
  kAccess, kSpace, kIsWrite, kIoSize, kStatus, kAddress, kData,
  kOp, kArg0, kArg1,
  kTraceRaised, kTraceLocalController, kTraceMasterReceived, kTraceMasterDecided, kTraceTargetReceived,
  kTraceInjected,
  kPaddingByte, kTraceByte,
  kDestination,
};
/// The field's name as messages spell it ("msi_address", "trace.raised", "padding byte" without the offset, ...).
std::string_view FrameFieldName(FrameField f);

struct FrameError {
  FrameErrorCode code = FrameErrorCode::kOk;
  FrameField field = FrameField::kNone;
  uint8_t type = 0;          // the raw type byte of the frame (0 when refused before the type was read)
  uint8_t offset = 0;        // byte offset in the frame, for kPaddingByte / kTraceByte
  bool trace_rule = false;   // a trace-block rule of ValidateFrame (messages say "traced frame")
  uint64_t value = 0;        // the offending value
  uint64_t context = 0;      // the other value a rule refers to: access size for kData, `raised` for trace hops
  const char* rule = "";     // static text of the broken rule

  [[nodiscard]] bool ok() const { return code == FrameErrorCode::kOk; }
};

/// Renders the message of an error (allocates; call it off the per-frame path), e.g.
/// "invalid eoi frame: field 'vector' = 0x8 (vectors 0..15 cannot be level-triggered); frame dropped".
std::string DescribeFrameError(const FrameError& e);
/// The error as a status: FailedPrecondition for kVersion, InvalidArgument otherwise, with DescribeFrameError's text.
/// OK for an ok() error.
absl::Status FrameErrorStatus(const FrameError& e);

/// Checks a Frame built in memory (payload alternative matches type, field ranges). Same rules as DecodeFrame.
absl::Status ValidateFrame(const Frame& f);
/// Encodes a valid frame. Precondition: ValidateFrame(f).ok().
void EncodeFrame(const Frame& f, WireFrame& out);
/// Decodes and validates wire bytes into `out` without allocating: the receive paths use this. On error `out` holds
/// whatever was decoded so far and must not be used.
FrameError DecodeFrameRaw(const uint8_t* data, size_t size, Frame& out);
/// Decodes and validates wire bytes; InvalidArgument / FailedPrecondition with a message naming the bad field.
/// (DecodeFrameRaw + FrameErrorStatus: allocates a message for a bad frame.)
absl::StatusOr<Frame> DecodeFrame(const uint8_t* data, size_t size);

/// Sequence numbers: per (sender, receiver) pair, 1, 2, ..., 0xffffffff, then 1 again (0 is never valid).
constexpr uint32_t NextSequence(uint32_t s) { return s == 0xffffffffu ? 1 : s + 1; }

/// The receiver's side of sequence checking, one per peer. A frame out of order (gap, reorder or duplicate) is
/// reported so the transport can count it; the frame is still delivered and the expectation resynchronises on it.
class SequenceChecker {
 public:
  explicit SequenceChecker(uint32_t first_expected = 1) : expected_(first_expected) {}
  /// True if `sequence` is the expected next one. Either way the next expected is NextSequence(sequence).
  bool Accept(uint32_t sequence) {
    const bool in_order = sequence == expected_;
    expected_ = NextSequence(sequence);
    return in_order;
  }
  [[nodiscard]] uint32_t expected() const { return expected_; }

 private:
  uint32_t expected_;
};

}  // namespace aggvm::transport
