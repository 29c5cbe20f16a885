// Fuzz target: MSI decoding, IOAPIC register access and pin/EOI traffic, and the Router, driven by hostile bytes.
//
// Input layout: byte 0 picks the topology (vCPU count, xAPIC/x2APIC mix, routing policy, focus option); then a
// stream of operations, one opcode byte followed by its operands (missing bytes read as zero). IOAPIC messages are
// routed by the Router through the sink, as on the master.
//
// Invariants checked (a violation traps):
//  - a decoded MSI re-encodes and decodes to the same message;
//  - every delivery names an existing vCPU and its node, at most once per decision, and matches the message's
//    destination (SDM 11.6.2); an arbitrated decision delivers at most once;
//  - the IOAPIC never reports remote IRR on an edge-triggered pin and never reads back reserved bits.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "irqchip/destination.h"
#include "irqchip/ioapic.h"
#include "irqchip/msi.h"
#include "irqchip/router.h"

namespace {

using namespace aggvm;
using namespace aggvm::irqchip;

#define FUZZ_CHECK(cond) \
  do {                   \
    if (!(cond)) __builtin_trap(); \
  } while (0)

class Reader {
 public:
  Reader(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  bool done() const { return pos_ >= n_; }
  uint8_t u8() { return pos_ < n_ ? d_[pos_++] : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(u8()) << (8 * i);
    return v;
  }
  uint64_t u64() { return u32() | (static_cast<uint64_t>(u32()) << 32); }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t pos_ = 0;
};

void CheckDecision(const Router& router, const InterruptRequest& req, const RouteResult& res,
                   const std::vector<Delivery>& out) {
  FUZZ_CHECK(res.count <= out.size());
  if (res.outcome == RouteOutcome::kBadMessage || res.outcome == RouteOutcome::kNoDestination) {
    FUZZ_CHECK(res.count == 0);
  }
  if (IsArbitrated(req.message)) FUZZ_CHECK(res.count <= 1);
  std::vector<bool> seen(router.vcpu_count(), false);
  for (uint32_t i = 0; i < res.count; ++i) {
    const uint32_t v = out[i].vcpu.value();
    FUZZ_CHECK(v < router.vcpu_count());
    FUZZ_CHECK(!seen[v]);
    seen[v] = true;
    const VcpuInfo& info = router.vcpu(out[i].vcpu);
    FUZZ_CHECK(info.node == out[i].node);
    FUZZ_CHECK(MatchesDestination(req.message, info.apic));
  }
}

class RoutingSink : public InterruptSink {
 public:
  explicit RoutingSink(Router* router) : router_(router), out_(router->vcpu_count()) {}
  void SendMessage(const InterruptMessage& m, std::optional<Gsi> gsi) override {
    InterruptRequest req{NodeId(1), m, gsi};
    const RouteResult res = router_->Route(req, out_);
    CheckDecision(*router_, req, res, out_);
  }
  void Deliver(VcpuIndex, NodeId, const InterruptMessage&) override {}
  void BroadcastEoi(Vector) override {}
  void Forward(NodeId, const InterruptMessage&) override {}

 private:
  Router* router_;
  std::vector<Delivery> out_;
};

std::vector<VcpuInfo> Topology(uint8_t b) {
  const uint32_t n = 1 + (b & 0x1F) * 2;
  std::vector<VcpuInfo> v;
  for (uint32_t i = 0; i < n; ++i) {
    VcpuInfo info;
    info.node = NodeId(static_cast<uint16_t>(i % 3));
    const bool x2 = (b & 0x20) ? true : ((b & 0x40) ? (i & 1) : false);
    if (x2) {
      info.apic = ApicAddressing{ApicId(i * 7), true, X2apicLdrFromId(ApicId(i * 7)), kDfrFlat, true};
    } else {
      const bool cluster = (b & 0x80) != 0;
      const uint32_t logical = cluster ? (((i / 4) & 0xF) << 4) | (1u << (i % 4)) : (1u << (i % 8));
      info.apic = ApicAddressing{ApicId(i), false, logical << 24, cluster ? kDfrCluster : kDfrFlat, true};
    }
    v.push_back(info);
  }
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in(data, size);
  const uint8_t topo = in.u8();
  const uint8_t cfg = in.u8();
  auto router_or = Router::Create(
      Topology(topo), RouterConfig{.policy = static_cast<RoutingPolicy>(cfg % 4), .focus_processor = (cfg & 4) != 0});
  FUZZ_CHECK(router_or.ok());
  Router router = std::move(*router_or);
  RoutingSink sink(&router);
  auto io_or = IoApic::Create(IoApicConfig{.pins = 24, .version = static_cast<uint8_t>((cfg & 8) ? 0x20 : 0x11)},
                              &sink);
  FUZZ_CHECK(io_or.ok());
  IoApic io = std::move(*io_or);
  std::vector<Delivery> out(router.vcpu_count());
  const MsiDecodeOptions opts{.extended_dest_id = (cfg & 16) != 0, .x2apic_32bit_ids = (cfg & 32) != 0};

  for (int steps = 0; !in.done() && steps < 4096; ++steps) {
    switch (in.u8() % 8) {
      case 0: {  // MSI
        const uint64_t addr = (in.u8() & 1) ? (0xFEE00000u | (in.u32() & 0xFFFFF)) : in.u64();
        const uint32_t d = in.u32();
        const MsiDecodeResult r = DecodeMsiRaw(addr, d, opts);
        if (!r.ok()) break;
        auto enc = EncodeMsi(r.message, opts);
        FUZZ_CHECK(enc.ok());
        const MsiDecodeResult again = DecodeMsiRaw(enc->address, enc->data, opts);
        FUZZ_CHECK(again.ok());
        FUZZ_CHECK(again.message.vector == r.message.vector && again.message.mode == r.message.mode &&
                   again.message.destination == r.message.destination &&
                   again.message.dest_mode == r.message.dest_mode && again.message.trigger == r.message.trigger &&
                   again.message.level == r.message.level &&
                   again.message.redirection_hint == r.message.redirection_hint);
        InterruptRequest req{NodeId(in.u8() % 4), r.message, std::nullopt};
        CheckDecision(router, req, router.Route(req, out), out);
        break;
      }
      case 1: {  // IOAPIC MMIO write
        const uint64_t off = in.u8();
        const uint32_t sz = 1u << (in.u8() % 4);
        io.MmioWrite(off, sz, in.u32());
        break;
      }
      case 2: {  // IOAPIC MMIO read
        const uint64_t off = in.u8();
        const uint32_t sz = 1u << (in.u8() % 4);
        (void)io.MmioRead(off, sz);
        break;
      }
      case 3: {  // pin level
        const uint8_t p = in.u8();
        io.SetPinLevel(p % 32, (p & 0x80) != 0);
        break;
      }
      case 4:  // EOI
        io.Eoi(Vector(in.u8()));
        break;
      case 5: {  // raw message (ICR-like), any shorthand
        InterruptMessage m;
        m.vector = Vector(in.u8());
        const uint8_t f = in.u8();
        m.mode = static_cast<DeliveryMode>(f & 7);
        m.dest_mode = (f & 8) ? DestMode::kLogical : DestMode::kPhysical;
        m.trigger = (f & 16) ? TriggerMode::kLevel : TriggerMode::kEdge;
        m.x2apic_destination = (f & 32) != 0;
        m.redirection_hint = (f & 64) != 0;
        m.shorthand = static_cast<Shorthand>(in.u8() % 4);
        m.destination = (f & 128) ? in.u32() : in.u8();
        m.source = ApicId(in.u8());
        InterruptRequest req{NodeId(in.u8() % 4), m, std::nullopt};
        if (in.u8() & 1) req.gsi = Gsi(in.u8());
        CheckDecision(router, req, router.Route(req, out), out);
        break;
      }
      case 6: {  // the nodes report state
        const VcpuIndex v(in.u8());
        (void)router.UpdatePriority(v, in.u8());
        (void)router.SetVectorActive(v, Vector(in.u8()), in.u8() & 1);
        break;
      }
      case 7: {  // operator pins / guest reprograms an APIC
        const uint8_t what = in.u8();
        const VcpuIndex v(in.u8());
        if (what & 1) {
          (void)router.PinVector(Vector(in.u8()), (what & 2) ? std::optional<VcpuIndex>(v) : std::nullopt);
        } else if (what & 4) {
          (void)router.PinGsi(Gsi(in.u8()), (what & 2) ? std::optional<VcpuIndex>(v) : std::nullopt);
        } else if (v.value() < router.vcpu_count()) {
          ApicAddressing a = router.vcpu(v).apic;
          a.enabled = (what & 8) != 0;
          a.ldr = in.u32();
          a.dfr_model = in.u8() & 0xF;
          if (what & 16) a.id = ApicId(in.u32() & ((what & 32) ? 0xFF : 0xFFFFFFFF));
          (void)router.UpdateAddressing(v, a);
        }
        break;
      }
    }
  }
  for (uint32_t p = 0; p < io.pins(); ++p) {
    const uint64_t e = io.redirection_entry(p);
    FUZZ_CHECK((e & IoApic::kRteReserved) == 0);
    FUZZ_CHECK((e & IoApic::kRteDeliveryStatus) == 0);
    if (!(e & IoApic::kRteLevel)) FUZZ_CHECK(!io.remote_irr(p));
  }
  return 0;
}
