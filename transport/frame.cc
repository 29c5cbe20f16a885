// Frame codec: explicit byte-wise little-endian (de)serialisation of the 64-byte wire frame (layout in frame.h).
//
// Payload layouts (offsets in the frame; every byte not listed is padding and must be zero):
//   kInterrupt   10 kind u8 | 11 level u8 (0, 1, 2 = one edge) | 12 gsi u32 | 16 msi_address u64 | 24 msi_data u32
//   kDeliver     10 vcpu u32 | 14 vector u8 | 15 mode u8 | 16 level_triggered u8 | 18 gsi u32 | 22 ipi_source u32
//   kIpi         10 source_vcpu u32 (0xffffffff: proxy-resolved, physical only) | 14 destination u32 | 18 vector u8 | 19 mode u8 | 20 dest_logical u8
//                | 21 shorthand u8 | 22 level u8 | 23 trigger_level u8
//   kEoi         10 vcpu u32 | 14 vector u8 | 16 gsi u32
//   kIo*         10 access u8 (bit 0 space, bit 1 write, bits 3:2 log2 size) | 11 status u8 | 12 vcpu u32
//                | 16 address u64 | 24 data u64
//   kControl     10 op u8 | 12 arg0 u64 | 20 arg1 u64   (op 4 raise-gsi: arg0 GSI, arg1 ControlPayload::kRaise* bits
//                in 0..7, a train's count in 8..31 and interval µs in 32..63; op 5 priority: arg0 vCPU, arg1 PPR)
// Trace block: 32 trace_id u32 | 36 raised u64 | 44..63 five u32 deltas from raised (0 = hop not reached).
#include "transport/frame.h"

#include <fmt/format.h>

#include <limits>

#include "absl/status/status.h"

namespace aggvm::transport {
namespace {

constexpr size_t kOffVersion = 0;
constexpr size_t kOffType = 1;
constexpr size_t kOffSource = 2;
constexpr size_t kOffSequence = 4;
constexpr size_t kOffFlags = 8;
constexpr size_t kOffPayload = 10;
constexpr size_t kOffTrace = 32;
constexpr size_t kPayloadSize = kOffTrace - kOffPayload;
static_assert(kPayloadSize == 22);
static_assert(kOffTrace + 4 + 8 + 5 * 4 == kFrameSize, "trace block must end the frame");

void Put8(WireFrame& b, size_t off, uint8_t v) { b[off] = v; }
void Put16(WireFrame& b, size_t off, uint16_t v) {
  b[off] = static_cast<uint8_t>(v);
  b[off + 1] = static_cast<uint8_t>(v >> 8);
}
void Put32(WireFrame& b, size_t off, uint32_t v) {
  for (size_t i = 0; i < 4; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
}
void Put64(WireFrame& b, size_t off, uint64_t v) {
  for (size_t i = 0; i < 8; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
}
uint8_t Get8(const uint8_t* b, size_t off) { return b[off]; }
uint16_t Get16(const uint8_t* b, size_t off) {
  return static_cast<uint16_t>(b[off] | (static_cast<uint16_t>(b[off + 1]) << 8));
}
uint32_t Get32(const uint8_t* b, size_t off) {
  uint32_t v = 0;
  for (size_t i = 0; i < 4; ++i) v |= static_cast<uint32_t>(b[off + i]) << (8 * i);
  return v;
}
uint64_t Get64(const uint8_t* b, size_t off) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v |= static_cast<uint64_t>(b[off + i]) << (8 * i);
  return v;
}

constexpr char kRuleDataFits[] = "does not fit in the access size";
constexpr char kRuleTraceWindow[] = "must be within (raised, raised + 2^32 ns]";

FrameError Bad(uint8_t type, FrameField field, uint64_t value, const char* rule) {
  FrameError e;
  e.code = FrameErrorCode::kInvalidField;
  e.type = type;
  e.field = field;
  e.value = value;
  e.rule = rule;
  return e;
}
FrameError Bad(FrameType type, FrameField field, uint64_t value, const char* rule) {
  return Bad(static_cast<uint8_t>(type), field, value, rule);
}
constexpr FrameError kOk{};

bool ValidDeliveryMode(uint8_t m) { return m <= 7 && m != 3; }
// Fixed and lowest-priority interrupts with vectors 0..15 are illegal (SDM vol. 3, 11.5.3 "illegal vector").
bool NeedsLegalVector(DeliveryMode m) { return m == DeliveryMode::kFixed || m == DeliveryMode::kLowestPriority; }

// Index of the Payload alternative that each frame type carries.
constexpr size_t PayloadIndexFor(FrameType t) {
  switch (t) {
    case FrameType::kInterrupt: return 0;
    case FrameType::kDeliver: return 1;
    case FrameType::kIpi: return 2;
    case FrameType::kEoi: return 3;
    case FrameType::kIoRequest:
    case FrameType::kIoResponse: return 4;
    case FrameType::kControl: return 5;
  }
  return std::variant_npos;
}
bool KnownType(uint8_t t) { return t >= 1 && t <= 7; }

FrameError ValidateInterrupt(const InterruptPayload& p) {
  constexpr FrameType kT = FrameType::kInterrupt;
  switch (p.kind) {
    case InterruptPayload::Kind::kGsiLevel:
      if (p.level > InterruptPayload::kLevelEdge) {
        return Bad(kT, FrameField::kLevel, p.level, "must be 0 (deassert), 1 (assert) or 2 (edge)");
      }
      if (p.gsi.value() >= kMaxGsi) return Bad(kT, FrameField::kGsi, p.gsi.value(), "must be below kMaxGsi 4096");
      if (p.msi_address != 0) {
        return Bad(kT, FrameField::kMsiAddress, p.msi_address, "must be 0 for a GSI level change");
      }
      if (p.msi_data != 0) return Bad(kT, FrameField::kMsiData, p.msi_data, "must be 0 for a GSI level change");
      return kOk;
    case InterruptPayload::Kind::kMsi:
      // MSI address bits 31:20 are 0xFEE; data bits 31:16 are reserved (SDM vol. 3, 11.11.1 and 11.11.2).
      if (((p.msi_address >> 20) & 0xfff) != 0xfee) {
        return Bad(kT, FrameField::kMsiAddress, p.msi_address, "bits 31:20 must be 0xfee");
      }
      if ((p.msi_data >> 16) != 0) {
        return Bad(kT, FrameField::kMsiData, p.msi_data, "bits 31:16 are reserved, must be 0");
      }
      if (p.level != 0) return Bad(kT, FrameField::kLevel, p.level, "must be 0 for an MSI");
      if (p.gsi.value() != 0) return Bad(kT, FrameField::kGsi, p.gsi.value(), "must be 0 for an MSI");
      return kOk;
  }
  return Bad(kT, FrameField::kKind, static_cast<uint8_t>(p.kind), "must be 0 (gsi level) or 1 (msi)");
}

FrameError ValidateDeliver(const DeliverPayload& p) {
  constexpr FrameType kT = FrameType::kDeliver;
  const auto mode = static_cast<uint8_t>(p.mode);
  if (!ValidDeliveryMode(mode)) return Bad(kT, FrameField::kMode, mode, "reserved delivery mode");
  if (NeedsLegalVector(p.mode) && p.vector.value() < 16) {
    return Bad(kT, FrameField::kVector, p.vector.value(),
               "vectors 0..15 are illegal for fixed/lowest-priority delivery");
  }
  if (p.level_triggered > 1) return Bad(kT, FrameField::kLevelTriggered, p.level_triggered, "must be 0 or 1");
  if (p.gsi.value() >= kMaxGsi) return Bad(kT, FrameField::kGsi, p.gsi.value(), "must be below kMaxGsi 4096");
  if (p.level_triggered == 0 && p.gsi.value() != 0) {
    return Bad(kT, FrameField::kGsi, p.gsi.value(), "must be 0 for an edge-triggered delivery");
  }
  return kOk;
}

FrameError ValidateIpi(const IpiPayload& p) {
  constexpr FrameType kT = FrameType::kIpi;
  const auto mode = static_cast<uint8_t>(p.mode);
  if (!ValidDeliveryMode(mode)) return Bad(kT, FrameField::kMode, mode, "reserved delivery mode");
  if (NeedsLegalVector(p.mode) && p.vector.value() < 16) {
    return Bad(kT, FrameField::kVector, p.vector.value(),
               "vectors 0..15 are illegal for fixed/lowest-priority delivery");
  }
  if (p.dest_logical > 1) return Bad(kT, FrameField::kDestLogical, p.dest_logical, "must be 0 or 1");
  if (p.shorthand > 3) return Bad(kT, FrameField::kShorthand, p.shorthand, "must be 0..3 (ICR bits 19:18)");
  if (p.level > 1) return Bad(kT, FrameField::kLevel, p.level, "must be 0 or 1");
  if (p.trigger_level > 1) return Bad(kT, FrameField::kTriggerLevel, p.trigger_level, "must be 0 or 1");
  if (p.source_vcpu.value() == kIpiSourceProxyResolved) {
    // A proxy-resolved IPI names exactly one APIC ID: KVM already applied logical modes and shorthands.
    if (p.dest_logical != 0) {
      return Bad(kT, FrameField::kDestLogical, p.dest_logical,
                 "must be 0 when the source is proxy-resolved (0xffffffff)");
    }
    if (p.shorthand != 0) {
      return Bad(kT, FrameField::kShorthand, p.shorthand, "must be 0 when the source is proxy-resolved (0xffffffff)");
    }
    if (p.destination == 0xffffffffu) {
      return Bad(kT, FrameField::kDestination, p.destination,
                 "a proxy-resolved IPI names one APIC ID, not the broadcast 0xffffffff");
    }
  }
  return kOk;
}

FrameError ValidateEoi(const EoiPayload& p) {
  constexpr FrameType kT = FrameType::kEoi;
  if (p.vector.value() < 16) {
    return Bad(kT, FrameField::kVector, p.vector.value(), "vectors 0..15 cannot be level-triggered");
  }
  if (p.gsi.value() >= kMaxGsi) return Bad(kT, FrameField::kGsi, p.gsi.value(), "must be below kMaxGsi 4096");
  return kOk;
}

FrameError ValidateIo(FrameType kT, const IoRequestPayload& p) {
  const auto space = static_cast<uint8_t>(p.space);
  if (space > 1) return Bad(kT, FrameField::kSpace, space, "must be 0 (pio) or 1 (mmio)");
  if (p.is_write > 1) return Bad(kT, FrameField::kIsWrite, p.is_write, "must be 0 or 1");
  if (p.size != 1 && p.size != 2 && p.size != 4 && p.size != 8) {
    return Bad(kT, FrameField::kIoSize, p.size, "must be 1, 2, 4 or 8");
  }
  if (p.space == IoRequestPayload::Space::kPio && p.size == 8) {
    return Bad(kT, FrameField::kIoSize, p.size, "pio is at most 4 bytes");
  }
  if (p.space == IoRequestPayload::Space::kPio && p.address >= 0x10000) {
    return Bad(kT, FrameField::kAddress, p.address, "pio port must be below 0x10000");
  }
  if (p.space == IoRequestPayload::Space::kMmio && p.address > std::numeric_limits<uint64_t>::max() - (p.size - 1)) {
    return Bad(kT, FrameField::kAddress, p.address, "mmio access wraps around the address space");
  }
  if (kT == FrameType::kIoRequest) {
    if (p.status != 0) return Bad(kT, FrameField::kStatus, p.status, "must be 0 in a request");
    if (p.is_write == 0 && p.data != 0) return Bad(kT, FrameField::kData, p.data, "must be 0 in a read request");
  } else if (p.status > 1) {
    return Bad(kT, FrameField::kStatus, p.status, "must be 0 (ok) or 1 (no device)");
  }
  if (p.size < 8 && (p.data >> (8 * p.size)) != 0) {
    FrameError e = Bad(kT, FrameField::kData, p.data, kRuleDataFits);
    e.context = p.size;
    return e;
  }
  return kOk;
}

FrameError ValidateControl(const ControlPayload& p) {
  constexpr FrameType kT = FrameType::kControl;
  const auto op = static_cast<uint8_t>(p.op);
  if (op > 5) {
    return Bad(kT, FrameField::kOp, op, "must be 0 hello, 1 ping, 2 pong, 3 goodbye, 4 raise-gsi or 5 priority");
  }
  if (p.op == ControlPayload::Op::kPriority) {
    if (p.arg0 >= ControlPayload::kMaxPriorityVcpus) {
      return Bad(kT, FrameField::kArg0, p.arg0, "priority: the vCPU index must be below 1024");
    }
    if (p.arg1 > 0xFF) return Bad(kT, FrameField::kArg1, p.arg1, "priority: a PPR is 0..255");
  }
  if (p.op == ControlPayload::Op::kRaiseGsi) {
    if (p.arg0 >= kMaxGsi) {
      return Bad(kT, FrameField::kArg0, p.arg0, "raise-gsi: the GSI must be below kMaxGsi 4096");
    }
    const uint64_t flags = p.arg1 & 0xFF;
    if ((flags & ~ControlPayload::kRaiseKnown) != 0) {
      return Bad(kT, FrameField::kArg1, p.arg1, "raise-gsi: only bits 0 level, 1 assert, 2 traced may be set");
    }
    if ((p.arg1 & ControlPayload::kRaiseLevel) == 0 && (p.arg1 & ControlPayload::kRaiseAssert) == 0) {
      return Bad(kT, FrameField::kArg1, p.arg1, "raise-gsi: an edge is always an assertion (bit 1 must be set)");
    }
    const uint32_t count = ControlPayload::TrainCount(p.arg1), interval = ControlPayload::TrainIntervalUs(p.arg1);
    if (count != 0 || interval != 0) {
      if ((p.arg1 & ControlPayload::kRaiseLevel) != 0) {
        return Bad(kT, FrameField::kArg1, p.arg1, "raise-gsi train: edges only (bit 0 level must be clear)");
      }
      // Bits 8..31 count, 32..63 interval (ControlPayload::TrainBits).
      if (const std::string_view why = ControlPayload::TrainProblem(count, interval); !why.empty()) {
        return Bad(kT, FrameField::kArg1, p.arg1, why.data());
      }
    }
  }
  return kOk;
}

FrameError ValidateTrace(uint8_t type, const TraceBlock& t) {
  auto bad = [type](FrameField field, uint64_t value, const char* rule) {
    FrameError e = Bad(type, field, value, rule);
    e.trace_rule = true;
    return e;
  };
  if (t.raised == 0) return bad(FrameField::kTraceRaised, 0, "must be non-zero when the traced flag is set");
  const std::pair<FrameField, uint64_t> hops[] = {
      {FrameField::kTraceLocalController, t.local_controller},
      {FrameField::kTraceMasterReceived, t.master_received},
      {FrameField::kTraceMasterDecided, t.master_decided},
      {FrameField::kTraceTargetReceived, t.target_received},
      {FrameField::kTraceInjected, t.injected}};
  for (const auto& [field, ts] : hops) {
    if (ts == 0) continue;  // hop not reached
    if (ts <= t.raised || ts - t.raised > std::numeric_limits<uint32_t>::max()) {
      FrameError e = bad(field, ts, kRuleTraceWindow);
      e.context = t.raised;
      return e;
    }
  }
  return kOk;
}

FrameError ValidateFrameRaw(const Frame& f) {
  const auto type = static_cast<uint8_t>(f.type);
  if (!KnownType(type)) return Bad(type, FrameField::kType, type, "must be 1..7");
  if (f.payload.index() != PayloadIndexFor(f.type)) {
    return Bad(type, FrameField::kPayload, f.payload.index(), "payload alternative does not match the type");
  }
  if (f.sequence == 0) return Bad(type, FrameField::kSequence, 0, "sequence numbers start at 1");
  if ((f.flags & ~kFlagsKnown) != 0) return Bad(type, FrameField::kFlags, f.flags, "unknown flag bits set");
  if (f.traced()) {
    if (FrameError e = ValidateTrace(type, f.trace); !e.ok()) return e;
  }
  switch (f.type) {
    case FrameType::kInterrupt: return ValidateInterrupt(std::get<InterruptPayload>(f.payload));
    case FrameType::kDeliver: return ValidateDeliver(std::get<DeliverPayload>(f.payload));
    case FrameType::kIpi: return ValidateIpi(std::get<IpiPayload>(f.payload));
    case FrameType::kEoi: return ValidateEoi(std::get<EoiPayload>(f.payload));
    case FrameType::kIoRequest:
    case FrameType::kIoResponse: return ValidateIo(f.type, std::get<IoRequestPayload>(f.payload));
    case FrameType::kControl: return ValidateControl(std::get<ControlPayload>(f.payload));
  }
  return kOk;
}

uint32_t Delta(uint64_t ts, uint64_t raised) { return ts == 0 ? 0 : static_cast<uint32_t>(ts - raised); }

}  // namespace

std::string_view FrameTypeName(FrameType t) {
  switch (t) {
    case FrameType::kInterrupt: return "interrupt";
    case FrameType::kDeliver: return "deliver";
    case FrameType::kIpi: return "ipi";
    case FrameType::kEoi: return "eoi";
    case FrameType::kIoRequest: return "io_request";
    case FrameType::kIoResponse: return "io_response";
    case FrameType::kControl: return "control";
  }
  return "unknown";
}

std::string_view FrameFieldName(FrameField f) {
  switch (f) {
    case FrameField::kNone: return "none";
    case FrameField::kSize: return "size";
    case FrameField::kVersion: return "version";
    case FrameField::kType: return "type";
    case FrameField::kSource: return "source";
    case FrameField::kSequence: return "sequence";
    case FrameField::kFlags: return "flags";
    case FrameField::kPayload: return "payload";
    case FrameField::kKind: return "kind";
    case FrameField::kLevel: return "level";
    case FrameField::kGsi: return "gsi";
    case FrameField::kMsiAddress: return "msi_address";
    case FrameField::kMsiData: return "msi_data";
    case FrameField::kMode: return "mode";
    case FrameField::kVector: return "vector";
    case FrameField::kLevelTriggered: return "level_triggered";
    case FrameField::kDestLogical: return "dest_logical";
    case FrameField::kDestination: return "destination";
    case FrameField::kShorthand: return "shorthand";
    case FrameField::kTriggerLevel: return "trigger_level";
    case FrameField::kAccess: return "access";
    case FrameField::kSpace: return "space";
    case FrameField::kIsWrite: return "is_write";
    case FrameField::kIoSize: return "size";
    case FrameField::kStatus: return "status";
    case FrameField::kAddress: return "address";
    case FrameField::kData: return "data";
    case FrameField::kOp: return "op";
    case FrameField::kArg0: return "arg0";
    case FrameField::kArg1: return "arg1";
    case FrameField::kTraceRaised: return "trace.raised";
    case FrameField::kTraceLocalController: return "trace.local_controller";
    case FrameField::kTraceMasterReceived: return "trace.master_received";
    case FrameField::kTraceMasterDecided: return "trace.master_decided";
    case FrameField::kTraceTargetReceived: return "trace.target_received";
    case FrameField::kTraceInjected: return "trace.injected";
    case FrameField::kPaddingByte: return "padding byte";
    case FrameField::kTraceByte: return "trace byte";
  }
  return "unknown";
}

std::string DescribeFrameError(const FrameError& e) {
  switch (e.code) {
    case FrameErrorCode::kOk: return "valid frame";
    case FrameErrorCode::kSize:
      return fmt::format("invalid frame: size {} bytes, expected exactly {}; frame dropped", e.value, kFrameSize);
    case FrameErrorCode::kVersion:
      return fmt::format("invalid frame: field 'version' = {} but this build speaks version {}; peers must run the "
                         "same aggvm release", e.value, kFrameVersion);
    case FrameErrorCode::kWrongSource:
      return fmt::format("invalid {} frame: it claims to come from node {}, not from the node at the other end of the "
                         "connection; frame dropped",
                         KnownType(e.type) ? FrameTypeName(static_cast<FrameType>(e.type)) : "unknown", e.value);
    case FrameErrorCode::kNotASend:
      return fmt::format("invalid frame: the receive completed with opcode {} instead of a SEND (the peer is not an "
                         "aggvm transport); frame dropped", e.value);
    case FrameErrorCode::kInvalidField: break;
  }
  const std::string_view type =
      e.trace_rule ? "traced" : KnownType(e.type) ? FrameTypeName(static_cast<FrameType>(e.type)) : "unknown";
  std::string field(FrameFieldName(e.field));
  if (e.field == FrameField::kPaddingByte || e.field == FrameField::kTraceByte) field += fmt::format(" {}", e.offset);
  std::string rule = e.rule;
  if (e.rule == kRuleDataFits) rule = fmt::format("does not fit in size {} bytes", e.context);
  if (e.rule == kRuleTraceWindow) rule = fmt::format("{}, raised = {:#x}", e.rule, e.context);
  return fmt::format("invalid {} frame: field '{}' = {:#x} ({}); frame dropped", type, field, e.value, rule);
}

absl::Status FrameErrorStatus(const FrameError& e) {
  if (e.ok()) return absl::OkStatus();
  if (e.code == FrameErrorCode::kVersion) return absl::FailedPreconditionError(DescribeFrameError(e));
  return absl::InvalidArgumentError(DescribeFrameError(e));
}

absl::Status ValidateFrame(const Frame& f) {
  const FrameError e = ValidateFrameRaw(f);
  if (e.ok()) return absl::OkStatus();
  return FrameErrorStatus(e);
}

void EncodeFrame(const Frame& f, WireFrame& b) {
  b.fill(0);
  Put8(b, kOffVersion, kFrameVersion);
  Put8(b, kOffType, static_cast<uint8_t>(f.type));
  Put16(b, kOffSource, f.source.value());
  Put32(b, kOffSequence, f.sequence);
  Put16(b, kOffFlags, f.flags);
  constexpr size_t P = kOffPayload;
  switch (f.type) {
    case FrameType::kInterrupt: {
      const auto& p = std::get<InterruptPayload>(f.payload);
      Put8(b, P + 0, static_cast<uint8_t>(p.kind));
      Put8(b, P + 1, p.level);
      Put32(b, P + 2, p.gsi.value());
      Put64(b, P + 6, p.msi_address);
      Put32(b, P + 14, p.msi_data);
      break;
    }
    case FrameType::kDeliver: {
      const auto& p = std::get<DeliverPayload>(f.payload);
      Put32(b, P + 0, p.vcpu.value());
      Put8(b, P + 4, p.vector.value());
      Put8(b, P + 5, static_cast<uint8_t>(p.mode));
      Put8(b, P + 6, p.level_triggered);
      Put32(b, P + 8, p.gsi.value());
      Put32(b, P + 12, p.ipi_source_vcpu);
      break;
    }
    case FrameType::kIpi: {
      const auto& p = std::get<IpiPayload>(f.payload);
      Put32(b, P + 0, p.source_vcpu.value());
      Put32(b, P + 4, p.destination);
      Put8(b, P + 8, p.vector.value());
      Put8(b, P + 9, static_cast<uint8_t>(p.mode));
      Put8(b, P + 10, p.dest_logical);
      Put8(b, P + 11, p.shorthand);
      Put8(b, P + 12, p.level);
      Put8(b, P + 13, p.trigger_level);
      break;
    }
    case FrameType::kEoi: {
      const auto& p = std::get<EoiPayload>(f.payload);
      Put32(b, P + 0, p.vcpu.value());
      Put8(b, P + 4, p.vector.value());
      Put32(b, P + 6, p.gsi.value());
      break;
    }
    case FrameType::kIoRequest:
    case FrameType::kIoResponse: {
      const auto& p = std::get<IoRequestPayload>(f.payload);
      const uint8_t log2 = p.size == 8 ? 3 : p.size == 4 ? 2 : p.size == 2 ? 1 : 0;
      Put8(b, P + 0, static_cast<uint8_t>(static_cast<uint8_t>(p.space) | (p.is_write << 1) | (log2 << 2)));
      Put8(b, P + 1, p.status);
      Put32(b, P + 2, p.vcpu.value());
      Put64(b, P + 6, p.address);
      Put64(b, P + 14, p.data);
      break;
    }
    case FrameType::kControl: {
      const auto& p = std::get<ControlPayload>(f.payload);
      Put8(b, P + 0, static_cast<uint8_t>(p.op));
      Put64(b, P + 2, p.arg0);
      Put64(b, P + 10, p.arg1);
      break;
    }
  }
  if (f.traced()) {
    const TraceBlock& t = f.trace;
    Put32(b, kOffTrace, t.trace_id);
    Put64(b, kOffTrace + 4, t.raised);
    Put32(b, kOffTrace + 12, Delta(t.local_controller, t.raised));
    Put32(b, kOffTrace + 16, Delta(t.master_received, t.raised));
    Put32(b, kOffTrace + 20, Delta(t.master_decided, t.raised));
    Put32(b, kOffTrace + 24, Delta(t.target_received, t.raised));
    Put32(b, kOffTrace + 28, Delta(t.injected, t.raised));
  }
}

FrameError DecodeFrameRaw(const uint8_t* d, size_t size, Frame& f) {
  if (d == nullptr || size != kFrameSize) {
    FrameError e;
    e.code = FrameErrorCode::kSize;
    e.field = FrameField::kSize;
    e.value = size;
    return e;
  }
  if (d[kOffVersion] != kFrameVersion) {
    FrameError e;
    e.code = FrameErrorCode::kVersion;
    e.field = FrameField::kVersion;
    e.value = d[kOffVersion];
    return e;
  }
  const uint8_t type = d[kOffType];
  if (!KnownType(type)) return Bad(type, FrameField::kType, type, "must be 1..7");
  f.type = static_cast<FrameType>(type);
  f.trace = TraceBlock{};
  f.source = NodeId(Get16(d, kOffSource));
  f.sequence = Get32(d, kOffSequence);
  f.flags = Get16(d, kOffFlags);

  // Which payload bytes are used by this type; the rest must be zero.
  uint32_t used = 0;  // bit i: payload byte i is a field
  auto use = [&used](size_t off, size_t n) {
    for (size_t i = 0; i < n; ++i) used |= 1u << (off + i);
  };
  constexpr size_t P = kOffPayload;
  switch (f.type) {
    case FrameType::kInterrupt: {
      InterruptPayload p;
      const uint8_t kind = Get8(d, P + 0);
      if (kind > 1) return Bad(type, FrameField::kKind, kind, "must be 0 (gsi level) or 1 (msi)");
      p.kind = static_cast<InterruptPayload::Kind>(kind);
      p.level = Get8(d, P + 1);
      p.gsi = Gsi(Get32(d, P + 2));
      p.msi_address = Get64(d, P + 6);
      p.msi_data = Get32(d, P + 14);
      use(0, 18);
      f.payload = p;
      break;
    }
    case FrameType::kDeliver: {
      DeliverPayload p;
      p.vcpu = VcpuIndex(Get32(d, P + 0));
      p.vector = Vector(Get8(d, P + 4));
      p.mode = static_cast<DeliveryMode>(Get8(d, P + 5));
      p.level_triggered = Get8(d, P + 6);
      p.gsi = Gsi(Get32(d, P + 8));
      p.ipi_source_vcpu = Get32(d, P + 12);
      use(0, 7);
      use(8, 8);
      f.payload = p;
      break;
    }
    case FrameType::kIpi: {
      IpiPayload p;
      p.source_vcpu = VcpuIndex(Get32(d, P + 0));
      p.destination = Get32(d, P + 4);
      p.vector = Vector(Get8(d, P + 8));
      p.mode = static_cast<DeliveryMode>(Get8(d, P + 9));
      p.dest_logical = Get8(d, P + 10);
      p.shorthand = Get8(d, P + 11);
      p.level = Get8(d, P + 12);
      p.trigger_level = Get8(d, P + 13);
      use(0, 14);
      f.payload = p;
      break;
    }
    case FrameType::kEoi: {
      EoiPayload p;
      p.vcpu = VcpuIndex(Get32(d, P + 0));
      p.vector = Vector(Get8(d, P + 4));
      p.gsi = Gsi(Get32(d, P + 6));
      use(0, 5);
      use(6, 4);
      f.payload = p;
      break;
    }
    case FrameType::kIoRequest:
    case FrameType::kIoResponse: {
      IoRequestPayload p;
      const uint8_t access = Get8(d, P + 0);
      if ((access & 0xf0) != 0) return Bad(type, FrameField::kAccess, access, "bits 7:4 are reserved, must be 0");
      p.space = static_cast<IoRequestPayload::Space>(access & 1);
      p.is_write = (access >> 1) & 1;
      p.size = static_cast<uint8_t>(1u << ((access >> 2) & 3));
      p.status = Get8(d, P + 1);
      p.vcpu = VcpuIndex(Get32(d, P + 2));
      p.address = Get64(d, P + 6);
      p.data = Get64(d, P + 14);
      use(0, 22);
      f.payload = p;
      break;
    }
    case FrameType::kControl: {
      ControlPayload p;
      const uint8_t op = Get8(d, P + 0);
      if (op > 5) {
        return Bad(type, FrameField::kOp, op, "must be 0 hello, 1 ping, 2 pong, 3 goodbye, 4 raise-gsi or 5 priority");
      }
      p.op = static_cast<ControlPayload::Op>(op);
      p.arg0 = Get64(d, P + 2);
      p.arg1 = Get64(d, P + 10);
      use(0, 1);
      use(2, 16);
      f.payload = p;
      break;
    }
  }
  for (size_t i = 0; i < kPayloadSize; ++i) {
    if ((used & (1u << i)) == 0 && d[P + i] != 0) {
      FrameError e = Bad(type, FrameField::kPaddingByte, d[P + i], "unused payload bytes must be zero");
      e.offset = static_cast<uint8_t>(P + i);
      return e;
    }
  }

  if ((f.flags & kFlagTraced) != 0) {
    TraceBlock& t = f.trace;
    t.trace_id = Get32(d, kOffTrace);
    t.raised = Get64(d, kOffTrace + 4);
    if (t.raised > std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint32_t>::max()) {
      return Bad(type, FrameField::kTraceRaised, t.raised, "too large: raised + delta would overflow");
    }
    uint64_t* hops[] = {&t.local_controller, &t.master_received, &t.master_decided, &t.target_received, &t.injected};
    for (size_t i = 0; i < 5; ++i) {
      const uint32_t delta = Get32(d, kOffTrace + 12 + 4 * i);
      *hops[i] = delta == 0 ? 0 : t.raised + delta;
    }
  } else {
    for (size_t i = kOffTrace; i < kFrameSize; ++i) {
      if (d[i] != 0) {
        FrameError e = Bad(type, FrameField::kTraceByte, d[i], "the trace block must be zero when not traced");
        e.offset = static_cast<uint8_t>(i);
        return e;
      }
    }
  }
  return ValidateFrameRaw(f);
}

absl::StatusOr<Frame> DecodeFrame(const uint8_t* data, size_t size) {
  Frame f;
  if (const FrameError e = DecodeFrameRaw(data, size, f); !e.ok()) return FrameErrorStatus(e);
  return f;
}

}  // namespace aggvm::transport
