// Frame codec: explicit byte-wise little-endian (de)serialisation of the 64-byte wire frame (layout in frame.h).
//
// Payload layouts (offsets in the frame; every byte not listed is padding and must be zero):
//   kInterrupt   10 kind u8 | 11 level u8 | 12 gsi u32 | 16 msi_address u64 | 24 msi_data u32
//   kDeliver     10 vcpu u32 | 14 vector u8 | 15 mode u8 | 16 level_triggered u8 | 18 gsi u32 | 22 ipi_source u32
//   kIpi         10 source_vcpu u32 | 14 destination u32 | 18 vector u8 | 19 mode u8 | 20 dest_logical u8
//                | 21 shorthand u8 | 22 level u8 | 23 trigger_level u8
//   kEoi         10 vcpu u32 | 14 vector u8 | 16 gsi u32
//   kIo*         10 access u8 (bit 0 space, bit 1 write, bits 3:2 log2 size) | 11 status u8 | 12 vcpu u32
//                | 16 address u64 | 24 data u64
//   kControl     10 op u8 | 12 arg0 u64 | 20 arg1 u64   (op 4 raise-gsi: arg0 GSI, arg1 ControlPayload::kRaise* bits)
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

absl::Status Bad(std::string_view type, std::string_view field, uint64_t value, std::string_view rule) {
  return absl::InvalidArgumentError(
      fmt::format("invalid {} frame: field '{}' = {:#x} ({}); frame dropped", type, field, value, rule));
}

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

absl::Status ValidateInterrupt(const InterruptPayload& p) {
  constexpr std::string_view kT = "interrupt";
  switch (p.kind) {
    case InterruptPayload::Kind::kGsiLevel:
      if (p.level > 1) return Bad(kT, "level", p.level, "must be 0 or 1");
      if (p.gsi.value() >= kMaxGsi) return Bad(kT, "gsi", p.gsi.value(), "must be below kMaxGsi 4096");
      if (p.msi_address != 0) return Bad(kT, "msi_address", p.msi_address, "must be 0 for a GSI level change");
      if (p.msi_data != 0) return Bad(kT, "msi_data", p.msi_data, "must be 0 for a GSI level change");
      return absl::OkStatus();
    case InterruptPayload::Kind::kMsi:
      // MSI address bits 31:20 are 0xFEE; data bits 31:16 are reserved (SDM vol. 3, 11.11.1 and 11.11.2).
      if (((p.msi_address >> 20) & 0xfff) != 0xfee) {
        return Bad(kT, "msi_address", p.msi_address, "bits 31:20 must be 0xfee");
      }
      if ((p.msi_data >> 16) != 0) return Bad(kT, "msi_data", p.msi_data, "bits 31:16 are reserved, must be 0");
      if (p.level != 0) return Bad(kT, "level", p.level, "must be 0 for an MSI");
      if (p.gsi.value() != 0) return Bad(kT, "gsi", p.gsi.value(), "must be 0 for an MSI");
      return absl::OkStatus();
  }
  return Bad(kT, "kind", static_cast<uint8_t>(p.kind), "must be 0 (gsi level) or 1 (msi)");
}

absl::Status ValidateDeliver(const DeliverPayload& p) {
  constexpr std::string_view kT = "deliver";
  const auto mode = static_cast<uint8_t>(p.mode);
  if (!ValidDeliveryMode(mode)) return Bad(kT, "mode", mode, "reserved delivery mode");
  if (NeedsLegalVector(p.mode) && p.vector.value() < 16) {
    return Bad(kT, "vector", p.vector.value(), "vectors 0..15 are illegal for fixed/lowest-priority delivery");
  }
  if (p.level_triggered > 1) return Bad(kT, "level_triggered", p.level_triggered, "must be 0 or 1");
  if (p.gsi.value() >= kMaxGsi) return Bad(kT, "gsi", p.gsi.value(), "must be below kMaxGsi 4096");
  if (p.level_triggered == 0 && p.gsi.value() != 0) {
    return Bad(kT, "gsi", p.gsi.value(), "must be 0 for an edge-triggered delivery");
  }
  return absl::OkStatus();
}

absl::Status ValidateIpi(const IpiPayload& p) {
  constexpr std::string_view kT = "ipi";
  const auto mode = static_cast<uint8_t>(p.mode);
  if (!ValidDeliveryMode(mode)) return Bad(kT, "mode", mode, "reserved delivery mode");
  if (NeedsLegalVector(p.mode) && p.vector.value() < 16) {
    return Bad(kT, "vector", p.vector.value(), "vectors 0..15 are illegal for fixed/lowest-priority delivery");
  }
  if (p.dest_logical > 1) return Bad(kT, "dest_logical", p.dest_logical, "must be 0 or 1");
  if (p.shorthand > 3) return Bad(kT, "shorthand", p.shorthand, "must be 0..3 (ICR bits 19:18)");
  if (p.level > 1) return Bad(kT, "level", p.level, "must be 0 or 1");
  if (p.trigger_level > 1) return Bad(kT, "trigger_level", p.trigger_level, "must be 0 or 1");
  return absl::OkStatus();
}

absl::Status ValidateEoi(const EoiPayload& p) {
  constexpr std::string_view kT = "eoi";
  if (p.vector.value() < 16) return Bad(kT, "vector", p.vector.value(), "vectors 0..15 cannot be level-triggered");
  if (p.gsi.value() >= kMaxGsi) return Bad(kT, "gsi", p.gsi.value(), "must be below kMaxGsi 4096");
  return absl::OkStatus();
}

absl::Status ValidateIo(FrameType type, const IoRequestPayload& p) {
  const std::string_view kT = type == FrameType::kIoRequest ? "io_request" : "io_response";
  const auto space = static_cast<uint8_t>(p.space);
  if (space > 1) return Bad(kT, "space", space, "must be 0 (pio) or 1 (mmio)");
  if (p.is_write > 1) return Bad(kT, "is_write", p.is_write, "must be 0 or 1");
  if (p.size != 1 && p.size != 2 && p.size != 4 && p.size != 8) return Bad(kT, "size", p.size, "must be 1, 2, 4 or 8");
  if (p.space == IoRequestPayload::Space::kPio && p.size == 8) return Bad(kT, "size", p.size, "pio is at most 4 bytes");
  if (p.space == IoRequestPayload::Space::kPio && p.address >= 0x10000) {
    return Bad(kT, "address", p.address, "pio port must be below 0x10000");
  }
  if (p.space == IoRequestPayload::Space::kMmio && p.address > std::numeric_limits<uint64_t>::max() - (p.size - 1)) {
    return Bad(kT, "address", p.address, "mmio access wraps around the address space");
  }
  if (type == FrameType::kIoRequest) {
    if (p.status != 0) return Bad(kT, "status", p.status, "must be 0 in a request");
    if (p.is_write == 0 && p.data != 0) return Bad(kT, "data", p.data, "must be 0 in a read request");
  } else if (p.status > 1) {
    return Bad(kT, "status", p.status, "must be 0 (ok) or 1 (no device)");
  }
  if (p.size < 8 && (p.data >> (8 * p.size)) != 0) {
    return Bad(kT, "data", p.data, fmt::format("does not fit in size {} bytes", p.size));
  }
  return absl::OkStatus();
}

absl::Status ValidateControl(const ControlPayload& p) {
  const auto op = static_cast<uint8_t>(p.op);
  if (op > 4) return Bad("control", "op", op, "must be 0 hello, 1 ping, 2 pong, 3 goodbye or 4 raise-gsi");
  if (p.op == ControlPayload::Op::kRaiseGsi) {
    if (p.arg0 >= kMaxGsi) return Bad("control", "arg0", p.arg0, "raise-gsi: the GSI must be below kMaxGsi 4096");
    if ((p.arg1 & ~ControlPayload::kRaiseKnown) != 0) {
      return Bad("control", "arg1", p.arg1, "raise-gsi: only bits 0 level, 1 assert, 2 traced may be set");
    }
    if ((p.arg1 & ControlPayload::kRaiseLevel) == 0 && (p.arg1 & ControlPayload::kRaiseAssert) == 0) {
      return Bad("control", "arg1", p.arg1, "raise-gsi: an edge is always an assertion (bit 1 must be set)");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateTrace(const TraceBlock& t) {
  constexpr std::string_view kT = "traced";
  if (t.raised == 0) return Bad(kT, "trace.raised", 0, "must be non-zero when the traced flag is set");
  const std::pair<std::string_view, uint64_t> hops[] = {
      {"trace.local_controller", t.local_controller}, {"trace.master_received", t.master_received},
      {"trace.master_decided", t.master_decided},     {"trace.target_received", t.target_received},
      {"trace.injected", t.injected}};
  for (const auto& [name, ts] : hops) {
    if (ts == 0) continue;  // hop not reached
    if (ts <= t.raised || ts - t.raised > std::numeric_limits<uint32_t>::max()) {
      return Bad(kT, name, ts,
                 fmt::format("must be within (raised, raised + 2^32 ns], raised = {:#x}", t.raised));
    }
  }
  return absl::OkStatus();
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

absl::Status ValidateFrame(const Frame& f) {
  const auto type = static_cast<uint8_t>(f.type);
  if (!KnownType(type)) return Bad("unknown", "type", type, "must be 1..7");
  if (f.payload.index() != PayloadIndexFor(f.type)) {
    return Bad(FrameTypeName(f.type), "payload", f.payload.index(), "payload alternative does not match the type");
  }
  if (f.sequence == 0) return Bad(FrameTypeName(f.type), "sequence", 0, "sequence numbers start at 1");
  if ((f.flags & ~kFlagsKnown) != 0) return Bad(FrameTypeName(f.type), "flags", f.flags, "unknown flag bits set");
  if (f.traced()) {
    if (auto s = ValidateTrace(f.trace); !s.ok()) return s;
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
  return absl::OkStatus();
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

absl::StatusOr<Frame> DecodeFrame(const uint8_t* d, size_t size) {
  if (d == nullptr || size != kFrameSize) {
    return absl::InvalidArgumentError(
        fmt::format("invalid frame: size {} bytes, expected exactly {}; frame dropped", size, kFrameSize));
  }
  if (d[kOffVersion] != kFrameVersion) {
    return absl::FailedPreconditionError(
        fmt::format("invalid frame: field 'version' = {} but this build speaks version {}; peers must run the same "
                    "aggvm release", d[kOffVersion], kFrameVersion));
  }
  const uint8_t type = d[kOffType];
  if (!KnownType(type)) return Bad("unknown", "type", type, "must be 1..7");
  Frame f;
  f.type = static_cast<FrameType>(type);
  const std::string_view tname = FrameTypeName(f.type);
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
      if (kind > 1) return Bad(tname, "kind", kind, "must be 0 (gsi level) or 1 (msi)");
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
      if ((access & 0xf0) != 0) return Bad(tname, "access", access, "bits 7:4 are reserved, must be 0");
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
      if (op > 4) return Bad(tname, "op", op, "must be 0 hello, 1 ping, 2 pong, 3 goodbye or 4 raise-gsi");
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
      return Bad(tname, fmt::format("padding byte {}", P + i), d[P + i], "unused payload bytes must be zero");
    }
  }

  if ((f.flags & kFlagTraced) != 0) {
    TraceBlock& t = f.trace;
    t.trace_id = Get32(d, kOffTrace);
    t.raised = Get64(d, kOffTrace + 4);
    if (t.raised > std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint32_t>::max()) {
      return Bad(tname, "trace.raised", t.raised, "too large: raised + delta would overflow");
    }
    uint64_t* hops[] = {&t.local_controller, &t.master_received, &t.master_decided, &t.target_received, &t.injected};
    for (size_t i = 0; i < 5; ++i) {
      const uint32_t delta = Get32(d, kOffTrace + 12 + 4 * i);
      *hops[i] = delta == 0 ? 0 : t.raised + delta;
    }
  } else {
    for (size_t i = kOffTrace; i < kFrameSize; ++i) {
      if (d[i] != 0) {
        return Bad(tname, fmt::format("trace byte {}", i), d[i], "the trace block must be zero when not traced");
      }
    }
  }
  if (auto s = ValidateFrame(f); !s.ok()) return s;
  return f;
}

}  // namespace aggvm::transport
