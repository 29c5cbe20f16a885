// libFuzzer target: the input is a sequence of operations on one LocalApic. After every operation the invariants of
// SDM vol. 3 ch. 11 are checked and a violation aborts:
//  - no vector below 16 is ever requested or in service (11.5.3);
//  - PPR is never below TPR, and its class is at least the highest in-service class (11.8.3.1);
//  - a pending (deliverable) vector has a class above PPR's (11.8.3.1);
//  - an ISR bit appears only by acknowledging a requested vector (11.8.4);
//  - one EOI clears exactly the highest in-service vector (11.8.5).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "irqchip/local_apic.h"

namespace {

using namespace aggvm;
using namespace aggvm::irqchip;

class Reader {
 public:
  Reader(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  bool empty() const { return pos_ >= n_; }
  template <typename T>
  T Get() {
    T v{};
    const size_t take = std::min(sizeof(T), n_ - std::min(pos_, n_));
    std::memcpy(&v, d_ + pos_, take);
    pos_ += take;
    return v;
  }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t pos_ = 0;
};

class Sink : public ApicSink {
 public:
  void SendIpi(const InterruptMessage& m) override {
    if (m.shorthand == Shorthand::kSelf) std::abort();  // self IPIs are accepted locally
  }
  void EoiBroadcast(Vector) override {}
  void InterruptPending() override {}
};

class Clock : public ApicClock {
 public:
  uint64_t NowNs() const override { return now; }
  uint64_t now = 1'000'000;
};

void Check(bool ok) {
  if (!ok) std::abort();
}

InterruptMessage ReadMessage(Reader& r) {
  InterruptMessage m;
  const auto bits = r.Get<uint16_t>();
  m.vector = Vector(r.Get<uint8_t>());
  m.mode = static_cast<DeliveryMode>(bits & 7);
  m.dest_mode = (bits & 8) ? DestMode::kLogical : DestMode::kPhysical;
  m.trigger = (bits & 16) ? TriggerMode::kLevel : TriggerMode::kEdge;
  m.level = (bits & 32) != 0;
  m.shorthand = static_cast<Shorthand>((bits >> 6) & 3);
  m.x2apic_destination = (bits & 256) != 0;
  m.destination = r.Get<uint32_t>();
  m.source = ApicId(r.Get<uint8_t>());
  return m;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader r(data, size);
  Sink sink;
  Clock clock;
  LocalApic::Config cfg;
  const auto flags = r.Get<uint8_t>();
  cfg.initial_id = ApicId(r.Get<uint16_t>());
  cfg.x2apic_supported = !(flags & 1);
  cfg.eoi_suppression_supported = !(flags & 2);
  cfg.tsc_deadline_supported = !(flags & 4);
  cfg.bus_cycle_ns = 1 + (flags >> 5);
  LocalApic apic(cfg, sink, clock);
  int steps = 0;
  while (!r.empty() && ++steps < 4096) {
    const VectorBitmap isr_before = apic.isr();
    const VectorBitmap irr_before = apic.irr();
    const int highest_isr = isr_before.Highest();
    bool eoi = false, reset = false;
    std::optional<Vector> acked;
    switch (r.Get<uint8_t>() % 14) {
      case 0: {
        const auto off = static_cast<uint32_t>(r.Get<uint8_t>()) << 4;
        const auto res = apic.WriteMmio(off, r.Get<uint32_t>());
        eoi = off == apic::kRegEoi && res == AccessResult::kOk;
        break;
      }
      case 1: apic.ReadMmio(r.Get<uint16_t>() & 0x1FFF); break;
      case 2: {
        const auto sel = r.Get<uint8_t>();
        const uint32_t msr = sel == 0 ? apic::kMsrApicBase : sel == 1 ? apic::kMsrTscDeadline : 0x800u + sel;
        const ApicMode before = apic.mode();
        const auto res = apic.WriteMsr(msr, r.Get<uint64_t>());
        eoi = msr == apic::X2ApicMsr(apic::kRegEoi) && res == AccessResult::kOk;
        reset = apic.mode() != before;
        break;
      }
      case 3: apic.ReadMsr(0x7F0u + r.Get<uint8_t>()); break;
      case 4: apic.Accept(ReadMessage(r)); break;
      case 5: acked = apic.AcknowledgeInterrupt(); break;
      case 6: apic.Eoi(); eoi = true; break;
      case 7: clock.now += r.Get<uint32_t>(); apic.ServiceTimer(); break;
      case 8: apic.RaiseLvt(static_cast<Lvt>(r.Get<uint8_t>() % kLvtCount)); break;
      case 9: {
        const ApicMode before = apic.mode();
        apic.SetApicBase(r.Get<uint64_t>());
        reset = apic.mode() != before;
        break;
      }
      case 10: apic.TakeNmi(); apic.TakeSmi(); apic.TakeInit(); apic.TakeExtInt(); apic.TakeSipi(); break;
      case 11: apic.ResetOnInit(); reset = true; break;
      case 12: {  // a foreign KVM page: our own export with hostile bytes written over it
        kvm_lapic_state page = apic.ExportKvmState(r.Get<uint8_t>() & 1);
        const int patches = r.Get<uint8_t>() % 16;
        for (int i = 0; i < patches; ++i) {
          const auto off = static_cast<uint16_t>(r.Get<uint16_t>() % (sizeof(page.regs) - 3));
          const auto v = r.Get<uint32_t>();
          std::memcpy(page.regs + off, &v, sizeof v);
        }
        (void)apic.ImportKvmState(page, r.Get<uint64_t>(), r.Get<uint8_t>() & 1);
        reset = true;
        break;
      }
      default: (void)apic.MatchesDestination(ReadMessage(r)); break;
    }
    const VectorBitmap& isr = apic.isr();
    const VectorBitmap& irr = apic.irr();
    for (uint8_t v = 0; v < apic::kFirstLegalVector; ++v) Check(!irr.Test(v) && !isr.Test(v));
    Check(apic.ppr() >= apic.tpr());
    Check((apic.ppr() & 0xF0) >= (std::max(isr.Highest(), 0) & 0xF0));
    if (auto p = apic.PendingInterrupt()) Check((p->value() >> 4) > (apic.ppr() >> 4));
    if (reset) continue;
    if (acked) {
      Check(irr_before.Test(acked->value()) && !isr_before.Test(acked->value()) && isr.Test(acked->value()));
    }
    for (int v = 0; v < 256; ++v) {
      const auto vec = static_cast<uint8_t>(v);
      if (isr.Test(vec) && !isr_before.Test(vec)) Check(acked && acked->value() == vec);
    }
    if (eoi) {
      VectorBitmap expected = isr_before;
      if (highest_isr >= 0) expected.Clear(static_cast<uint8_t>(highest_isr));
      Check(isr == expected);
    } else if (!acked) {
      Check(isr == isr_before);
    }
  }
  return 0;
}
