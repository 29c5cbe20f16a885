#include "transport/frame.h"
#include "tests/support/alloc_counter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <new>
#include <string>


namespace aggvm::transport {
namespace {

using ::testing::HasSubstr;

// "01 02 | 03" -> bytes; spaces and '|' are separators.
WireFrame FromHex(std::string_view hex) {
  WireFrame out{};
  size_t n = 0;
  for (size_t i = 0; i < hex.size();) {
    if (hex[i] == ' ' || hex[i] == '|') {
      ++i;
      continue;
    }
    EXPECT_LT(n, kFrameSize) << "golden string longer than a frame";
    if (n >= kFrameSize) break;
    out[n++] = static_cast<uint8_t>(std::stoul(std::string(hex.substr(i, 2)), nullptr, 16));
    i += 2;
  }
  EXPECT_EQ(n, kFrameSize) << "golden string must hold exactly 64 bytes";
  return out;
}

std::string ToHex(const WireFrame& w) {
  std::string s;
  for (size_t i = 0; i < w.size(); ++i) s += fmt::format("{}{:02x}", i ? " " : "", w[i]);
  return s;
}

Frame Make(FrameType type, Payload p, uint32_t seq = 1, uint16_t source = 1) {
  Frame f;
  f.type = type;
  f.source = NodeId(source);
  f.sequence = seq;
  f.payload = p;
  return f;
}

InterruptPayload GsiLevel() {
  InterruptPayload p;
  p.kind = InterruptPayload::Kind::kGsiLevel;
  p.level = 1;
  p.gsi = Gsi(10);
  return p;
}
InterruptPayload Msi() {
  InterruptPayload p;
  p.kind = InterruptPayload::Kind::kMsi;
  p.msi_address = 0xfee01000;
  p.msi_data = 0x4031;
  return p;
}
DeliverPayload Deliver() {
  DeliverPayload p;
  p.vcpu = VcpuIndex(2);
  p.vector = Vector(0x41);
  p.level_triggered = 1;
  p.gsi = Gsi(9);
  return p;
}
IpiPayload Ipi() {
  IpiPayload p;
  p.source_vcpu = VcpuIndex(1);
  p.destination = 0x300;
  p.vector = Vector(0xf0);
  p.dest_logical = 1;
  return p;
}
// An IPI a proxy vCPU caught (docs/proxy.md): sender unknown, one physical APIC ID, NMI.
IpiPayload ProxyIpi() {
  IpiPayload p;
  p.source_vcpu = VcpuIndex(kIpiSourceProxyResolved);
  p.destination = 5;
  p.vector = Vector(0);
  p.mode = DeliveryMode::kNmi;
  return p;
}
EoiPayload Eoi() {
  EoiPayload p;
  p.vcpu = VcpuIndex(5);
  p.vector = Vector(0x39);
  p.gsi = Gsi(11);
  return p;
}
IoRequestPayload PioWrite() {
  IoRequestPayload p;
  p.space = IoRequestPayload::Space::kPio;
  p.is_write = 1;
  p.size = 2;
  p.vcpu = VcpuIndex(1);
  p.address = 0x3f8;
  p.data = 0xbeef;
  return p;
}
IoRequestPayload MmioReadResult() {
  IoRequestPayload p;
  p.space = IoRequestPayload::Space::kMmio;
  p.size = 8;
  p.vcpu = VcpuIndex(7);
  p.address = 0xfec00000;
  p.data = 0x1122334455667788;
  return p;
}
ControlPayload Hello() {
  ControlPayload p;
  p.op = ControlPayload::Op::kHello;
  p.arg0 = 0x0807060504030201;
  p.arg1 = 2;
  return p;
}

struct Golden {
  const char* name;
  Frame frame;
  const char* hex;  // header (10) | payload (22) | trace (32)
};

std::vector<Golden> Goldens() {
  Frame traced = Make(FrameType::kEoi, Eoi());
  traced.flags = kFlagTraced;
  traced.trace = TraceBlock{.trace_id = 0xaabbccdd, .raised = 1ull << 32, .local_controller = (1ull << 32) + 0x10,
                            .master_received = (1ull << 32) + 0x20, .master_decided = 0,
                            .target_received = (1ull << 32) + 0x40, .injected = (1ull << 32) + 0x50};
  const char* kNoTrace = "| 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00";
  static std::vector<std::string> hex;  // keeps the concatenations alive
  hex = {
      std::string("01 01 03 00 04 03 02 01 00 00 | 00 01 0a 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 ") +
          kNoTrace,
      std::string("01 01 01 00 01 00 00 00 00 00 | 01 00 00 00 00 00 00 10 e0 fe 00 00 00 00 31 40 00 00 00 00 00 00 ") +
          kNoTrace,
      std::string("01 02 01 00 01 00 00 00 00 00 | 02 00 00 00 41 00 01 00 09 00 00 00 ff ff ff ff 00 00 00 00 00 00 ") +
          kNoTrace,
      std::string("01 03 01 00 01 00 00 00 00 00 | 01 00 00 00 00 03 00 00 f0 00 01 00 01 00 00 00 00 00 00 00 00 00 ") +
          kNoTrace,
      std::string("01 04 01 00 01 00 00 00 00 00 | 05 00 00 00 39 00 0b 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 ") +
          kNoTrace,
      std::string("01 05 01 00 01 00 00 00 00 00 | 06 00 01 00 00 00 f8 03 00 00 00 00 00 00 ef be 00 00 00 00 00 00 ") +
          kNoTrace,
      std::string("01 06 01 00 01 00 00 00 00 00 | 0d 00 07 00 00 00 00 00 c0 fe 00 00 00 00 88 77 66 55 44 33 22 11 ") +
          kNoTrace,
      std::string("01 07 02 01 04 03 02 01 00 00 | 00 00 01 02 03 04 05 06 07 08 02 00 00 00 00 00 00 00 00 00 00 00 ") +
          kNoTrace,
      "01 04 01 00 01 00 00 00 01 00 | 05 00 00 00 39 00 0b 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 "
      "| dd cc bb aa 00 00 00 00 01 00 00 00 10 00 00 00 20 00 00 00 00 00 00 00 40 00 00 00 50 00 00 00",
      std::string("01 03 01 00 01 00 00 00 00 00 | ff ff ff ff 05 00 00 00 00 04 00 00 01 00 00 00 00 00 00 00 00 00 ") +
          kNoTrace,
  };
  return {
      {"interrupt_gsi", Make(FrameType::kInterrupt, GsiLevel(), 0x01020304, 3), hex[0].c_str()},
      {"interrupt_msi", Make(FrameType::kInterrupt, Msi()), hex[1].c_str()},
      {"deliver", Make(FrameType::kDeliver, Deliver()), hex[2].c_str()},
      {"ipi", Make(FrameType::kIpi, Ipi()), hex[3].c_str()},
      {"eoi", Make(FrameType::kEoi, Eoi()), hex[4].c_str()},
      {"io_request", Make(FrameType::kIoRequest, PioWrite()), hex[5].c_str()},
      {"io_response", Make(FrameType::kIoResponse, MmioReadResult()), hex[6].c_str()},
      {"control", Make(FrameType::kControl, Hello(), 0x01020304, 0x0102), hex[7].c_str()},
      {"eoi_traced", traced, hex[8].c_str()},
      {"ipi_proxy_resolved", Make(FrameType::kIpi, ProxyIpi()), hex[9].c_str()},
  };
}

void ExpectSameFrame(const Frame& a, const Frame& b) {
  EXPECT_EQ(a.type, b.type);
  EXPECT_EQ(a.source, b.source);
  EXPECT_EQ(a.sequence, b.sequence);
  EXPECT_EQ(a.flags, b.flags);
  EXPECT_EQ(a.payload.index(), b.payload.index());
  WireFrame wa, wb;  // payload structs have no operator==; compare their canonical encodings
  EncodeFrame(a, wa);
  EncodeFrame(b, wb);
  EXPECT_EQ(ToHex(wa), ToHex(wb));
  if (a.traced()) {
    EXPECT_EQ(a.trace.trace_id, b.trace.trace_id);
    EXPECT_EQ(a.trace.raised, b.trace.raised);
    EXPECT_EQ(a.trace.local_controller, b.trace.local_controller);
    EXPECT_EQ(a.trace.master_received, b.trace.master_received);
    EXPECT_EQ(a.trace.master_decided, b.trace.master_decided);
    EXPECT_EQ(a.trace.target_received, b.trace.target_received);
    EXPECT_EQ(a.trace.injected, b.trace.injected);
  }
}

TEST(Frame, GoldenBytesOfEveryType) {
  for (const auto& g : Goldens()) {
    SCOPED_TRACE(g.name);
    ASSERT_TRUE(ValidateFrame(g.frame).ok()) << ValidateFrame(g.frame);
    WireFrame w;
    EncodeFrame(g.frame, w);
    EXPECT_EQ(ToHex(w), ToHex(FromHex(g.hex)));
    const WireFrame golden = FromHex(g.hex);
    auto decoded = DecodeFrame(golden.data(), golden.size());
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    ExpectSameFrame(*decoded, g.frame);
  }
}

TEST(Frame, RoundTripOfEveryTypeTracedAndUntraced) {
  for (const auto& g : Goldens()) {
    for (bool traced : {false, true}) {
      SCOPED_TRACE(fmt::format("{} traced={}", g.name, traced));
      Frame f = g.frame;
      f.flags = traced ? kFlagTraced : 0;
      f.trace = traced ? TraceBlock{.trace_id = 7, .raised = 1'000'000, .local_controller = 1'000'500,
                                    .master_received = 0, .master_decided = 1'003'000,
                                    .target_received = 1'000'000 + 0xffffffffull, .injected = 1'000'001}
                       : TraceBlock{};
      ASSERT_TRUE(ValidateFrame(f).ok()) << ValidateFrame(f);
      WireFrame w;
      EncodeFrame(f, w);
      auto d = DecodeFrame(w.data(), w.size());
      ASSERT_TRUE(d.ok()) << d.status();
      ExpectSameFrame(*d, f);
      EXPECT_EQ(d->traced(), traced);
      if (!traced) {
        for (size_t i = 32; i < kFrameSize; ++i) EXPECT_EQ(w[i], 0) << "byte " << i;
      }
    }
  }
}

TEST(Frame, UntracedFrameIgnoresInMemoryTraceBlock) {
  Frame f = Make(FrameType::kEoi, Eoi());
  f.trace.trace_id = 99;  // not traced: must not reach the wire
  f.trace.raised = 5;
  WireFrame w;
  EncodeFrame(f, w);
  for (size_t i = 32; i < kFrameSize; ++i) EXPECT_EQ(w[i], 0) << "byte " << i;
  auto d = DecodeFrame(w.data(), w.size());
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->trace.trace_id, 0u);
}

TEST(Frame, IoSizesRoundTrip) {
  for (uint8_t size : {1, 2, 4, 8}) {
    IoRequestPayload p = MmioReadResult();
    p.size = size;
    p.data = size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
    Frame f = Make(FrameType::kIoResponse, p);
    ASSERT_TRUE(ValidateFrame(f).ok()) << ValidateFrame(f);
    WireFrame w;
    EncodeFrame(f, w);
    auto d = DecodeFrame(w.data(), w.size());
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(std::get<IoRequestPayload>(d->payload).size, size);
    EXPECT_EQ(std::get<IoRequestPayload>(d->payload).data, p.data);
  }
}

TEST(Frame, RaiseGsiControlRoundTrips) {
  for (uint64_t flags : {ControlPayload::kRaiseAssert, ControlPayload::kRaiseLevel,
                         ControlPayload::kRaiseLevel | ControlPayload::kRaiseAssert | ControlPayload::kRaiseTraced,
                         // trains of edges: the largest count and interval, and a one-edge train (stops a running one)
                         ControlPayload::kRaiseAssert | ControlPayload::kRaiseTraced |
                             ControlPayload::TrainBits(ControlPayload::kMaxTrainCount, 600),
                         ControlPayload::kRaiseAssert | ControlPayload::TrainBits(600, ControlPayload::kMaxTrainIntervalUs),
                         ControlPayload::kRaiseAssert | ControlPayload::TrainBits(1, ControlPayload::kMinTrainIntervalUs)}) {
    ControlPayload p;
    p.op = ControlPayload::Op::kRaiseGsi;
    p.arg0 = kMaxGsi - 1;
    p.arg1 = flags;
    const Frame f = Make(FrameType::kControl, p);
    ASSERT_TRUE(ValidateFrame(f).ok()) << ValidateFrame(f);
    WireFrame w;
    EncodeFrame(f, w);
    auto d = DecodeFrame(w.data(), w.size());
    ASSERT_TRUE(d.ok()) << d.status();
    const auto& q = std::get<ControlPayload>(d->payload);
    EXPECT_EQ(q.op, ControlPayload::Op::kRaiseGsi);
    EXPECT_EQ(q.arg0, kMaxGsi - 1);
    EXPECT_EQ(q.arg1, flags);
  }
}

TEST(Frame, TypeNames) {
  EXPECT_EQ(FrameTypeName(FrameType::kInterrupt), "interrupt");
  EXPECT_EQ(FrameTypeName(FrameType::kIoResponse), "io_response");
  EXPECT_EQ(FrameTypeName(FrameType::kControl), "control");
  EXPECT_EQ(FrameTypeName(static_cast<FrameType>(0)), "unknown");
}

// Every rule of ValidateFrame: a broken in-memory frame is refused by ValidateFrame, and the same frame forced onto
// the wire (encoded without validation) is refused by DecodeFrame with the same field named.
struct Rule {
  const char* name;
  std::function<Frame()> make;
  const char* field;  // must appear in the message
};

std::vector<Rule> Rules() {
  auto with = [](FrameType t, auto payload, auto mutate) {
    return [t, payload, mutate]() {
      auto p = payload;
      mutate(p);
      return Make(t, p);
    };
  };
  using IP = InterruptPayload;
  using CP = ControlPayload;
  // A raise-gsi of GSI 3 whose arg1 (flags and train bits) is `arg1`.
  auto raise_gsi = [&](uint64_t arg1) {
    return with(FrameType::kControl, Hello(), [arg1](CP& p) {
      p.op = CP::Op::kRaiseGsi;
      p.arg0 = 3;
      p.arg1 = arg1;
    });
  };
  return {
      {"sequence zero", [] { return Make(FrameType::kEoi, Eoi(), 0); }, "'sequence' = 0x0"},
      {"unknown flag", [] { auto f = Make(FrameType::kEoi, Eoi()); f.flags = 0x8000; return f; }, "'flags' = 0x8000"},
      {"payload mismatch", [] { return Make(FrameType::kEoi, Ipi()); }, "'payload'"},
      {"gsi level > 2", with(FrameType::kInterrupt, GsiLevel(), [](IP& p) { p.level = 3; }), "'level' = 0x3"},
      {"gsi too big", with(FrameType::kInterrupt, GsiLevel(), [](IP& p) { p.gsi = Gsi(4096); }), "'gsi' = 0x1000"},
      {"gsi with msi address", with(FrameType::kInterrupt, GsiLevel(), [](IP& p) { p.msi_address = 0xfee00000; }),
       "'msi_address'"},
      {"gsi with msi data", with(FrameType::kInterrupt, GsiLevel(), [](IP& p) { p.msi_data = 1; }), "'msi_data'"},
      {"msi bad address", with(FrameType::kInterrupt, Msi(), [](IP& p) { p.msi_address = 0xfed00000; }),
       "'msi_address' = 0xfed00000"},
      {"msi reserved data", with(FrameType::kInterrupt, Msi(), [](IP& p) { p.msi_data = 0x10031; }),
       "'msi_data' = 0x10031"},
      {"msi with level", with(FrameType::kInterrupt, Msi(), [](IP& p) { p.level = 1; }), "'level'"},
      {"msi with gsi", with(FrameType::kInterrupt, Msi(), [](IP& p) { p.gsi = Gsi(3); }), "'gsi' = 0x3"},
      {"deliver reserved mode", with(FrameType::kDeliver, Deliver(), [](DeliverPayload& p) {
         p.mode = static_cast<DeliveryMode>(3); }), "'mode' = 0x3"},
      {"deliver mode > 7", with(FrameType::kDeliver, Deliver(), [](DeliverPayload& p) {
         p.mode = static_cast<DeliveryMode>(9); }), "'mode' = 0x9"},
      {"deliver illegal vector", with(FrameType::kDeliver, Deliver(), [](DeliverPayload& p) { p.vector = Vector(15); }),
       "'vector' = 0xf"},
      {"deliver level_triggered 2", with(FrameType::kDeliver, Deliver(), [](DeliverPayload& p) {
         p.level_triggered = 2; }), "'level_triggered' = 0x2"},
      {"deliver gsi too big", with(FrameType::kDeliver, Deliver(), [](DeliverPayload& p) { p.gsi = Gsi(5000); }),
       "'gsi' = 0x1388"},
      {"deliver edge with gsi", with(FrameType::kDeliver, Deliver(), [](DeliverPayload& p) { p.level_triggered = 0; }),
       "'gsi' = 0x9"},
      {"ipi reserved mode", with(FrameType::kIpi, Ipi(), [](IpiPayload& p) { p.mode = static_cast<DeliveryMode>(3); }),
       "'mode' = 0x3"},
      {"ipi illegal vector", with(FrameType::kIpi, Ipi(), [](IpiPayload& p) { p.vector = Vector(2); }),
       "'vector' = 0x2"},
      {"ipi dest_logical", with(FrameType::kIpi, Ipi(), [](IpiPayload& p) { p.dest_logical = 2; }), "'dest_logical'"},
      {"ipi shorthand", with(FrameType::kIpi, Ipi(), [](IpiPayload& p) { p.shorthand = 4; }), "'shorthand' = 0x4"},
      {"ipi level", with(FrameType::kIpi, Ipi(), [](IpiPayload& p) { p.level = 3; }), "'level' = 0x3"},
      {"ipi trigger", with(FrameType::kIpi, Ipi(), [](IpiPayload& p) { p.trigger_level = 2; }), "'trigger_level'"},
      {"proxy ipi logical", with(FrameType::kIpi, ProxyIpi(), [](IpiPayload& p) { p.dest_logical = 1; }),
       "'dest_logical' = 0x1 (must be 0 when the source is proxy-resolved"},
      {"proxy ipi shorthand", with(FrameType::kIpi, ProxyIpi(), [](IpiPayload& p) { p.shorthand = 3; }),
       "'shorthand' = 0x3 (must be 0 when the source is proxy-resolved"},
      {"proxy ipi broadcast", with(FrameType::kIpi, ProxyIpi(), [](IpiPayload& p) { p.destination = 0xffffffff; }),
       "'destination' = 0xffffffff"},
      {"eoi low vector", with(FrameType::kEoi, Eoi(), [](EoiPayload& p) { p.vector = Vector(8); }), "'vector' = 0x8"},
      {"eoi gsi too big", with(FrameType::kEoi, Eoi(), [](EoiPayload& p) { p.gsi = Gsi(1u << 20); }), "'gsi'"},
      {"io size 3", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) { p.size = 3; }),
       "'size' = 0x3"},
      {"io pio size 8", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) { p.size = 8; }),
       "'size' = 0x8"},
      {"io pio port", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) { p.address = 0x10000; }),
       "'address' = 0x10000"},
      {"io mmio wraps", with(FrameType::kIoRequest, MmioReadResult(), [](IoRequestPayload& p) {
         p.address = ~0ull - 2; p.data = 0; }), "'address'"},
      {"io space", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) {
         p.space = static_cast<IoRequestPayload::Space>(2); }), "'space' = 0x2"},
      {"io is_write", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) { p.is_write = 2; }),
       "'is_write' = 0x2"},
      {"io request status", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) { p.status = 1; }),
       "'status' = 0x1"},
      {"io response status", with(FrameType::kIoResponse, PioWrite(), [](IoRequestPayload& p) { p.status = 2; }),
       "'status' = 0x2"},
      {"io read request data", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) { p.is_write = 0; }),
       "'data' = 0xbeef"},
      {"io data too wide", with(FrameType::kIoRequest, PioWrite(), [](IoRequestPayload& p) { p.data = 0x10000; }),
       "'data' = 0x10000"},
      {"control op", with(FrameType::kControl, Hello(), [](ControlPayload& p) {
         p.op = static_cast<ControlPayload::Op>(6); }), "'op' = 0x6"},
      {"control priority vcpu", with(FrameType::kControl, Hello(), [](ControlPayload& p) {
         p.op = ControlPayload::Op::kPriority; p.arg0 = 1024; p.arg1 = 0x20; }), "'arg0' = 0x400"},
      {"control priority ppr", with(FrameType::kControl, Hello(), [](ControlPayload& p) {
         p.op = ControlPayload::Op::kPriority; p.arg0 = 3; p.arg1 = 0x100; }), "'arg1' = 0x100"},
      {"control raise-gsi gsi", with(FrameType::kControl, Hello(), [](ControlPayload& p) {
         p.op = ControlPayload::Op::kRaiseGsi; p.arg0 = kMaxGsi; p.arg1 = ControlPayload::kRaiseAssert; }),
       "'arg0' = 0x1000"},
      {"control raise-gsi flags", with(FrameType::kControl, Hello(), [](ControlPayload& p) {
         p.op = ControlPayload::Op::kRaiseGsi; p.arg0 = 3; p.arg1 = 8 | ControlPayload::kRaiseAssert; }),
       "'arg1' = 0xa"},
      {"control raise-gsi edge deassert", with(FrameType::kControl, Hello(), [](ControlPayload& p) {
         p.op = ControlPayload::Op::kRaiseGsi; p.arg0 = 3; p.arg1 = 0; }), "'arg1' = 0x0"},
      {"control raise-gsi train of levels", raise_gsi(CP::kRaiseLevel | CP::kRaiseAssert | CP::TrainBits(5, 100)), "'arg1'"},
      {"control raise-gsi train count 0", raise_gsi(CP::kRaiseAssert | CP::TrainBits(0, 100)), "'arg1'"},
      {"control raise-gsi train count too large",
       raise_gsi(CP::kRaiseAssert | CP::TrainBits(CP::kMaxTrainCount + 1, 100)), "'arg1'"},
      {"control raise-gsi train without interval", raise_gsi(CP::kRaiseAssert | CP::TrainBits(5, 0)), "'arg1'"},
      {"control raise-gsi train interval too short", raise_gsi(CP::kRaiseAssert | CP::TrainBits(5, 9)), "'arg1'"},
      {"control raise-gsi train too long", raise_gsi(CP::kRaiseAssert | CP::TrainBits(1000, 1'000'000)), "'arg1'"},
      {"traced raised zero", [] {
         auto f = Make(FrameType::kEoi, Eoi()); f.flags = kFlagTraced; f.trace.raised = 0; return f; },
       "'trace.raised' = 0x0"},
      {"traced hop before raised", [] {
         auto f = Make(FrameType::kEoi, Eoi()); f.flags = kFlagTraced; f.trace.raised = 1000;
         f.trace.master_decided = 999; return f; }, "'trace.master_decided' = 0x3e7"},
      {"traced hop equal raised", [] {
         auto f = Make(FrameType::kEoi, Eoi()); f.flags = kFlagTraced; f.trace.raised = 1000;
         f.trace.injected = 1000; return f; }, "'trace.injected'"},
      {"traced hop too late", [] {
         auto f = Make(FrameType::kEoi, Eoi()); f.flags = kFlagTraced; f.trace.raised = 1000;
         f.trace.local_controller = 1000 + (1ull << 32); return f; }, "'trace.local_controller'"},
  };
}

TEST(Frame, EveryValidationRuleIsEnforcedByValidateAndDecode) {
  for (const auto& r : Rules()) {
    SCOPED_TRACE(r.name);
    const Frame f = r.make();
    const absl::Status v = ValidateFrame(f);
    ASSERT_FALSE(v.ok());
    EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(v.message()), HasSubstr(r.field)) << v.message();
    EXPECT_THAT(std::string(v.message()), HasSubstr("frame")) << v.message();
    // Not representable on the wire: a payload/type mismatch, io space/is_write > 1 (one bit each there), and
    // trace hops outside (raised, raised + 2^32) (the wire holds a u32 delta, 0 meaning "not reached").
    const std::string_view name = r.name;
    if (name == "payload mismatch" || name == "io space" || name == "io is_write" ||
        name == "traced hop before raised" || name == "traced hop equal raised" || name == "traced hop too late") {
      continue;
    }
    WireFrame w;
    EncodeFrame(f, w);  // precondition violated on purpose: this is what a broken peer would send
    auto d = DecodeFrame(w.data(), w.size());
    ASSERT_FALSE(d.ok()) << "decoder accepted " << ToHex(w);
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    if (name != "io size 3") {  // size 3 has no wire encoding (it goes out as size 1); the decoder names 'data'
      EXPECT_THAT(std::string(d.status().message()), HasSubstr(r.field)) << d.status().message();
    }
  }
}

TEST(Frame, WireOnlyRules) {
  WireFrame good;
  EncodeFrame(Make(FrameType::kEoi, Eoi()), good);
  ASSERT_TRUE(DecodeFrame(good.data(), good.size()).ok());

  auto expect_bad = [&](WireFrame w, absl::StatusCode code, std::string_view needle) {
    auto d = DecodeFrame(w.data(), w.size());
    ASSERT_FALSE(d.ok()) << ToHex(w);
    EXPECT_EQ(d.status().code(), code) << d.status();
    EXPECT_THAT(std::string(d.status().message()), HasSubstr(std::string(needle))) << d.status().message();
  };
  {
    WireFrame w = good;
    w[0] = 2;
    expect_bad(w, absl::StatusCode::kFailedPrecondition, "'version' = 2");
  }
  for (uint8_t t : {0, 8, 0xff}) {
    WireFrame w = good;
    w[1] = t;
    expect_bad(w, absl::StatusCode::kInvalidArgument, "'type'");
  }
  {
    WireFrame w = good;
    w[15] = 1;  // eoi: byte 15 is padding between vector and gsi
    expect_bad(w, absl::StatusCode::kInvalidArgument, "padding byte 15");
  }
  {
    WireFrame w = good;
    w[31] = 0x80;  // last payload byte
    expect_bad(w, absl::StatusCode::kInvalidArgument, "padding byte 31");
  }
  {
    WireFrame w = good;
    w[40] = 1;  // trace byte while untraced
    expect_bad(w, absl::StatusCode::kInvalidArgument, "trace byte 40");
  }
  {
    WireFrame w;
    EncodeFrame(Make(FrameType::kIoRequest, PioWrite()), w);
    w[10] |= 0x10;
    expect_bad(w, absl::StatusCode::kInvalidArgument, "'access' = 0x16");
  }
  {
    WireFrame w;
    EncodeFrame(Make(FrameType::kInterrupt, GsiLevel()), w);
    w[10] = 2;
    expect_bad(w, absl::StatusCode::kInvalidArgument, "'kind' = 0x2");
  }
  {
    WireFrame w = good;
    w[8] = 1;  // traced, raised = 0
    expect_bad(w, absl::StatusCode::kInvalidArgument, "'trace.raised' = 0x0");
  }
  {
    WireFrame w = good;
    w[8] = 1;
    for (size_t i = 36; i < 44; ++i) w[i] = 0xff;  // raised near 2^64: raised + delta would overflow
    expect_bad(w, absl::StatusCode::kInvalidArgument, "'trace.raised'");
  }
  for (size_t size : {size_t{0}, size_t{63}, size_t{65}}) {
    std::vector<uint8_t> buf(size + 1, 0);
    auto d = DecodeFrame(buf.data(), size);
    ASSERT_FALSE(d.ok());
    EXPECT_THAT(std::string(d.status().message()), HasSubstr(fmt::format("size {} bytes", size)));
  }
  EXPECT_FALSE(DecodeFrame(nullptr, kFrameSize).ok());
}

// The receive paths' decoder: same verdict and the same words as DecodeFrame, as plain values, with no allocation for
// a good frame or a bad one (a peer must not be able to force an allocation per frame).
TEST(Frame, DecodeFrameRawGivesTheSameReasonWithoutAllocating) {
  for (const auto& r : Rules()) {
    SCOPED_TRACE(r.name);
    const std::string_view name = r.name;
    if (name == "payload mismatch" || name == "io space" || name == "io is_write" ||
        name == "traced hop before raised" || name == "traced hop equal raised" || name == "traced hop too late") {
      continue;  // not representable on the wire (see above)
    }
    WireFrame w;
    EncodeFrame(r.make(), w);
    Frame out;
    const uint64_t before = ::aggvm::testing::ThreadAllocations();
    const FrameError e = DecodeFrameRaw(w.data(), w.size(), out);
    EXPECT_EQ(::aggvm::testing::ThreadAllocations(), before) << "DecodeFrameRaw allocated for a bad frame";
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.code, FrameErrorCode::kInvalidField);
    EXPECT_EQ(e.type, w[1]);
    // Rendered only when asked, and then word for word what DecodeFrame says.
    auto d = DecodeFrame(w.data(), w.size());
    ASSERT_FALSE(d.ok());
    EXPECT_EQ(DescribeFrameError(e), d.status().message());
    EXPECT_EQ(FrameErrorStatus(e), d.status());
    if (name != "io size 3") {
      EXPECT_THAT(std::string(r.field), HasSubstr(fmt::format("'{}'", FrameFieldName(e.field))));
    }
  }
  // Wire-only reasons carry their own code, field and byte offset.
  WireFrame good;
  EncodeFrame(Make(FrameType::kEoi, Eoi(), 9), good);
  Frame out;
  uint64_t before = ::aggvm::testing::ThreadAllocations();
  FrameError e = DecodeFrameRaw(good.data(), good.size(), out);
  EXPECT_EQ(::aggvm::testing::ThreadAllocations(), before);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(out.sequence, 9u);
  EXPECT_EQ(std::get<EoiPayload>(out.payload).gsi, Eoi().gsi);
  WireFrame again;
  EncodeFrame(out, again);
  EXPECT_EQ(again, good);

  struct Case {
    size_t index;
    uint8_t value;
    FrameErrorCode code;
    FrameField field;
    uint8_t offset;
  };
  for (const Case& c : {Case{0, 7, FrameErrorCode::kVersion, FrameField::kVersion, 0},
                        Case{1, 9, FrameErrorCode::kInvalidField, FrameField::kType, 0},
                        Case{15, 1, FrameErrorCode::kInvalidField, FrameField::kPaddingByte, 15},
                        Case{50, 3, FrameErrorCode::kInvalidField, FrameField::kTraceByte, 50}}) {
    WireFrame w = good;
    w[c.index] = c.value;
    before = ::aggvm::testing::ThreadAllocations();
    e = DecodeFrameRaw(w.data(), w.size(), out);
    EXPECT_EQ(::aggvm::testing::ThreadAllocations(), before);
    EXPECT_EQ(e.code, c.code) << c.index;
    EXPECT_EQ(e.field, c.field) << c.index;
    EXPECT_EQ(e.offset, c.offset) << c.index;
    EXPECT_EQ(e.value, c.value) << c.index;
    EXPECT_EQ(DescribeFrameError(e), DecodeFrame(w.data(), w.size()).status().message());
  }
  before = ::aggvm::testing::ThreadAllocations();
  e = DecodeFrameRaw(good.data(), 63, out);
  EXPECT_EQ(::aggvm::testing::ThreadAllocations(), before);
  EXPECT_EQ(e.code, FrameErrorCode::kSize);
  EXPECT_EQ(e.value, 63u);
  EXPECT_EQ(FrameErrorStatus(e).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(DescribeFrameError(e), HasSubstr("size 63 bytes"));
  e.code = FrameErrorCode::kVersion;
  EXPECT_EQ(FrameErrorStatus(e).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(FrameErrorStatus(FrameError{}).ok());

  // The transports' own reasons render too.
  FrameError spoof{.code = FrameErrorCode::kWrongSource, .field = FrameField::kSource, .type = 4, .value = 9};
  EXPECT_THAT(DescribeFrameError(spoof), HasSubstr("invalid eoi frame: it claims to come from node 9"));
  FrameError not_send{.code = FrameErrorCode::kNotASend, .value = 129};
  EXPECT_THAT(DescribeFrameError(not_send), HasSubstr("opcode 129 instead of a SEND"));
}

TEST(Frame, SequenceCheckerCountsGapsReordersAndWraps) {
  SequenceChecker c;
  EXPECT_EQ(c.expected(), 1u);
  EXPECT_TRUE(c.Accept(1));
  EXPECT_TRUE(c.Accept(2));
  EXPECT_FALSE(c.Accept(5));  // gap: 3, 4 missing
  EXPECT_EQ(c.expected(), 6u);
  EXPECT_TRUE(c.Accept(6));   // resynchronised on the frame that arrived
  EXPECT_FALSE(c.Accept(4));  // reorder (late frame)
  EXPECT_FALSE(c.Accept(4));  // duplicate
  EXPECT_TRUE(c.Accept(5));
  SequenceChecker w(0xfffffffeu);
  EXPECT_TRUE(w.Accept(0xfffffffeu));
  EXPECT_TRUE(w.Accept(0xffffffffu));
  EXPECT_EQ(w.expected(), 1u) << "0 is never a sequence number: after 2^32 - 1 comes 1";
  EXPECT_TRUE(w.Accept(1));
  EXPECT_EQ(NextSequence(0), 1u);
  EXPECT_EQ(NextSequence(41), 42u);
}

// Writes the fuzz seed corpus (fuzz/corpus/frame/): every golden frame, traced and untraced. Run by hand:
//   AGGVM_FRAME_CORPUS_DIR=fuzz/corpus/frame build/transport/transport_frame_test
//     --gtest_also_run_disabled_tests --gtest_filter='*WriteSeedCorpus*'
TEST(Frame, DISABLED_WriteSeedCorpus) {
  const char* dir = std::getenv("AGGVM_FRAME_CORPUS_DIR");
  ASSERT_NE(dir, nullptr) << "set AGGVM_FRAME_CORPUS_DIR";
  for (const auto& g : Goldens()) {
    for (bool traced : {false, true}) {
      Frame f = g.frame;
      f.flags = traced ? kFlagTraced : 0;
      if (traced && !g.frame.traced()) {
        f.trace = TraceBlock{.trace_id = 3, .raised = 5'000'000, .local_controller = 5'000'700,
                             .master_received = 5'012'000, .master_decided = 5'012'400,
                             .target_received = 5'030'000, .injected = 5'031'000};
      }
      ASSERT_TRUE(ValidateFrame(f).ok());
      WireFrame w;
      EncodeFrame(f, w);
      const std::string path = fmt::format("{}/{}{}.bin", dir, g.name, traced ? "_traced" : "");
      std::FILE* out = std::fopen(path.c_str(), "wb");
      ASSERT_NE(out, nullptr) << path;
      ASSERT_EQ(std::fwrite(w.data(), 1, w.size(), out), w.size());
      std::fclose(out);
    }
  }
}

}  // namespace
}  // namespace aggvm::transport
