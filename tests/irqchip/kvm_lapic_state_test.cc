// LocalApic <-> KVM in-kernel LAPIC state round trip on the real /dev/kvm.
//
// A register state is built in the model, exported as `struct kvm_lapic_state`, loaded into a real vCPU with
// KVM_SET_LAPIC, read back with KVM_GET_LAPIC, imported into a fresh model and compared register by register
// (SDM vol. 3, 11.4.1 table 11-1 layout; KVM Documentation/virt/kvm/api.rst "KVM_GET_LAPIC"). KVM recomputes PPR
// from TPR and ISR, and restarts the timer from the saved current count, so both rules of the model are checked
// against KVM's too. The VM, irqchip and vCPU are created with raw ioctls: this test does not depend on vcpu/.
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "irqchip/local_apic.h"
#include "tests/support/require.h"

namespace aggvm::irqchip {
namespace {

using namespace apic;  // NOLINT

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd& operator=(Fd&& o) noexcept {
    std::swap(fd_, o.fd_);
    return *this;
  }
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_ = -1;
};

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// kvm_cpuid2 and kvm_msrs end in __DECLARE_FLEX_ARRAY, which in C++ adds a byte before the array: sizeof (and so
// the ioctl numbers) and the entries' offset differ from the kernel's C layout. Restate it: an 8-byte count header
// directly followed by the entries (vcpu/kvm_abi.h does the same; this test stays independent of vcpu/).
struct CountHeader {
  uint32_t count;
  uint32_t pad;
};
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CountHeader);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CountHeader);
constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, CountHeader);
constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, CountHeader);
static_assert(kGetSupportedCpuid == 0xc008ae05ul && kSetCpuid2 == 0x4008ae90ul && kGetMsrs == 0xc008ae88ul &&
              kSetMsrs == 0x4008ae89ul);

// An 8-byte-aligned, zeroed buffer: CountHeader then `n` entries of E.
template <typename E>
struct FlexBuffer {
  explicit FlexBuffer(uint32_t n) : words((sizeof(CountHeader) + n * sizeof(E) + 7) / 8) { header()->count = n; }
  CountHeader* header() { return reinterpret_cast<CountHeader*>(words.data()); }
  E* entries() { return reinterpret_cast<E*>(words.data() + 1); }
  void* arg() { return words.data(); }
  std::vector<uint64_t> words;
};

enum class Irqchip { kFull, kSplit };

// One VM with an in-kernel LAPIC and one vCPU, built with raw ioctls. Order as kvm-ioctls: system -> VM -> irqchip
// -> vCPU; each fd is owned before the next step can fail.
class KvmLapicVcpu {
 public:
  void Create(Irqchip chip, uint32_t vcpu_id, bool x2apic_api) {
    kvm_ = Fd(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
    ASSERT_GE(kvm_.get(), 0) << Errno("open /dev/kvm");
    vm_ = Fd(::ioctl(kvm_.get(), KVM_CREATE_VM, 0));
    ASSERT_GE(vm_.get(), 0) << Errno("KVM_CREATE_VM");
    if (chip == Irqchip::kFull) {
      ASSERT_EQ(::ioctl(vm_.get(), KVM_CREATE_IRQCHIP, 0), 0) << Errno("KVM_CREATE_IRQCHIP");
    } else {
      kvm_enable_cap cap{};
      cap.cap = KVM_CAP_SPLIT_IRQCHIP;
      cap.args[0] = 24;
      ASSERT_EQ(::ioctl(vm_.get(), KVM_ENABLE_CAP, &cap), 0) << Errno("KVM_ENABLE_CAP(SPLIT_IRQCHIP)");
    }
    if (x2apic_api) {
      kvm_enable_cap cap{};
      cap.cap = KVM_CAP_X2APIC_API;
      cap.args[0] = KVM_X2APIC_API_USE_32BIT_IDS;
      ASSERT_EQ(::ioctl(vm_.get(), KVM_ENABLE_CAP, &cap), 0) << Errno("KVM_ENABLE_CAP(X2APIC_API)");
    }
    vcpu_ = Fd(::ioctl(vm_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(vcpu_id)));
    ASSERT_GE(vcpu_.get(), 0) << Errno("KVM_CREATE_VCPU");
    // CPUID with x2APIC (leaf 1 ECX bit 21): without it KVM treats IA32_APIC_BASE.EXTD as reserved.
    FlexBuffer<kvm_cpuid_entry2> cpuid(256);
    ASSERT_EQ(::ioctl(kvm_.get(), kGetSupportedCpuid, cpuid.arg()), 0) << Errno("KVM_GET_SUPPORTED_CPUID");
    bool has_x2apic = false;
    for (uint32_t i = 0; i < cpuid.header()->count; ++i) {
      if (cpuid.entries()[i].function == 1) has_x2apic = (cpuid.entries()[i].ecx >> 21) & 1;
    }
    ASSERT_TRUE(has_x2apic) << "KVM_GET_SUPPORTED_CPUID does not offer x2APIC";
    ASSERT_EQ(::ioctl(vcpu_.get(), kSetCpuid2, cpuid.arg()), 0) << Errno("KVM_SET_CPUID2");
  }

  void SetMsr(uint32_t index, uint64_t value) {
    FlexBuffer<kvm_msr_entry> msrs(1);
    msrs.entries()[0].index = index;
    msrs.entries()[0].data = value;
    ASSERT_EQ(::ioctl(vcpu_.get(), kSetMsrs, msrs.arg()), 1) << Errno("KVM_SET_MSRS") << " msr " << index;
  }
  uint64_t GetMsr(uint32_t index) {
    FlexBuffer<kvm_msr_entry> msrs(1);
    msrs.entries()[0].index = index;
    EXPECT_EQ(::ioctl(vcpu_.get(), kGetMsrs, msrs.arg()), 1) << Errno("KVM_GET_MSRS") << " msr " << index;
    return msrs.entries()[0].data;
  }
  void SetLapic(const kvm_lapic_state& s) {
    ASSERT_EQ(::ioctl(vcpu_.get(), KVM_SET_LAPIC, &s), 0) << Errno("KVM_SET_LAPIC");
  }
  kvm_lapic_state GetLapic() {
    kvm_lapic_state s{};
    EXPECT_EQ(::ioctl(vcpu_.get(), KVM_GET_LAPIC, &s), 0) << Errno("KVM_GET_LAPIC");
    return s;
  }

 private:
  Fd kvm_, vm_, vcpu_;
};

class NullSink : public ApicSink {
 public:
  void SendIpi(const InterruptMessage&) override { ++ipis; }
  void EoiBroadcast(Vector) override {}
  void InterruptPending() override {}
  int ipis = 0;
};

class FakeClock : public ApicClock {
 public:
  uint64_t NowNs() const override { return now; }
  uint64_t now = 1'000'000'000;
};

uint32_t Reg(const kvm_lapic_state& s, uint32_t off) {
  uint32_t v;
  std::memcpy(&v, s.regs + off, sizeof v);
  return v;
}

LocalApic::Config ConfigFor(uint32_t id) {
  LocalApic::Config c;
  c.initial_id = ApicId(id);
  return c;  // bus_cycle_ns = 1 matches KVM's default APIC bus cycle
}

constexpr uint32_t kTimerInitial = 0xF0000000;
constexpr uint64_t kTimerElapsedTicks = 0x10000000;  // the model's timer has run this far before the export
constexpr uint32_t kTimerDivide128 = 0xA;

// A state that exercises every architectural register: software-enabled, TPR, logical addressing, an in-service
// level-triggered vector, requested vectors, a latched ESR, all LVTs, an ICR and a running (masked) timer.
void BuildState(LocalApic& m, FakeClock& clock, bool x2) {
  const auto write = [&](uint32_t off, uint32_t v) {
    if (x2) {
      ASSERT_EQ(m.WriteMsr(X2ApicMsr(off), v), AccessResult::kOk) << std::hex << off;
    } else {
      ASSERT_EQ(m.WriteMmio(off, v), AccessResult::kOk) << std::hex << off;
    }
  };
  if (x2) {
    ASSERT_EQ(m.SetApicBase(kDefaultApicBaseAddress | kApicBaseEnable | kApicBaseExtd), AccessResult::kOk);
  }
  write(kRegSvr, kSvrEnable | 0xEF);
  write(kRegTpr, 0x21);
  if (!x2) {
    write(kRegDfr, 0x0FFFFFFF);  // cluster model
    write(kRegLdr, 0x24000000);
  }
  InterruptMessage level;
  level.vector = Vector(0x91);
  level.trigger = TriggerMode::kLevel;
  ASSERT_EQ(m.Accept(level), AcceptResult::kAccepted);
  ASSERT_EQ(m.AcknowledgeInterrupt(), Vector(0x91));
  for (uint8_t v : {0x42, 0xB3, 0xFD}) {
    InterruptMessage msg;
    msg.vector = Vector(v);
    ASSERT_EQ(m.Accept(msg), AcceptResult::kAccepted);
  }
  write(kRegLvtError, 0x10000 | 0xFE);  // masked: the error below is only logged
  InterruptMessage bad;
  bad.vector = Vector(3);
  ASSERT_EQ(m.Accept(bad), AcceptResult::kIllegalVector);
  write(kRegEsr, 0);  // latch it: ESR = receive illegal vector
  write(kRegLvtLint0, 7u << kLvtDeliveryModeShift);               // ExtINT
  write(kRegLvtLint1, 4u << kLvtDeliveryModeShift);               // NMI
  write(kRegLvtThermal, 0x33);
  write(kRegLvtPmc, 0x10000 | (4u << kLvtDeliveryModeShift));
  write(kRegLvtCmci, 0x10000 | 0x50);
  write(kRegLvtTimer, 0x10000 | (1u << kLvtTimerModeShift) | 0xEF);  // periodic, masked
  write(kRegTimerDivide, kTimerDivide128);
  write(kRegTimerInitial, kTimerInitial);
  clock.now += kTimerElapsedTicks * 128;
  if (x2) {
    ASSERT_EQ(m.WriteMsr(X2ApicMsr(kRegIcrLow), (0x00010002ull << 32) | 0x4000 | kIcrDestLogical | 0x66),
              AccessResult::kOk);
  } else {
    write(kRegIcrHigh, 0x05000000);
    write(kRegIcrLow, 0x4000 | 0x55);
  }
}

// Registers whose value is architectural state (not recomputed, not write-only), by xAPIC offset.
std::vector<uint32_t> ComparedOffsets(bool x2) {
  std::vector<uint32_t> offs = {kRegId,       kRegTpr,      kRegPpr,        kRegLdr,        kRegSvr,
                                kRegEsr,      kRegIcrLow,   kRegIcrHigh,    kRegLvtTimer,   kRegLvtThermal,
                                kRegLvtPmc,   kRegLvtLint0, kRegLvtLint1,   kRegLvtError,   kRegLvtCmci,
                                kRegTimerInitial, kRegTimerDivide};
  if (!x2) offs.push_back(kRegDfr);
  for (uint32_t i = 0; i < 8; ++i) {
    offs.push_back(kRegIsr + (i << 4));
    offs.push_back(kRegTmr + (i << 4));
    offs.push_back(kRegIrr + (i << 4));
  }
  return offs;
}

void RoundTrip(Irqchip chip, uint32_t vcpu_id, bool x2) {
  KvmLapicVcpu kvm;
  ASSERT_NO_FATAL_FAILURE(kvm.Create(chip, vcpu_id, /*x2apic_api=*/true));
  NullSink sink;
  FakeClock clock;
  LocalApic model(ConfigFor(vcpu_id), sink, clock);
  ASSERT_NO_FATAL_FAILURE(BuildState(model, clock, x2));
  const kvm_lapic_state sent = model.ExportKvmState();
  const uint32_t sent_count = Reg(sent, kRegTimerCurrent);
  ASSERT_EQ(sent_count, kTimerInitial - kTimerElapsedTicks);

  // The mode lives in IA32_APIC_BASE, not in the page: set it first, as KVM interprets the page by mode.
  ASSERT_NO_FATAL_FAILURE(kvm.SetMsr(kMsrApicBase, model.apic_base() | (vcpu_id == 0 ? kApicBaseBsp : 0)));
  ASSERT_NO_FATAL_FAILURE(kvm.SetLapic(sent));
  // PPR is derived state. KVM_SET_LAPIC recomputes it BEFORE it recounts the loaded ISR (kvm_apic_set_state calls
  // apic_update_ppr, then kvm_apic_update_apicv refreshes isr_count), so on a vCPU whose ISR was empty the PPR read
  // back right after one SET is just the TPR. A second SET sees the right ISR count.
  EXPECT_TRUE(Reg(kvm.GetLapic(), kRegPpr) == 0x90u || Reg(kvm.GetLapic(), kRegPpr) == 0x21u);
  ASSERT_NO_FATAL_FAILURE(kvm.SetLapic(sent));
  const kvm_lapic_state got = kvm.GetLapic();
  const uint64_t base = kvm.GetMsr(kMsrApicBase);
  EXPECT_EQ(base & ~kApicBaseBsp, model.apic_base());

  // KVM's page itself matches register by register (PPR recomputed by KVM from TPR and ISR).
  for (uint32_t off : ComparedOffsets(x2)) {
    EXPECT_EQ(Reg(got, off), Reg(sent, off)) << "KVM_GET_LAPIC offset 0x" << std::hex << off;
  }
  EXPECT_EQ(Reg(got, kRegPpr), 0x90u) << "PPR = ISRV class 9 > TPR class 2 (SDM 11.8.3.1)";
  if (x2) {
    // x2APIC: the ID is the full 32-bit vCPU id and KVM derives the LDR from it (SDM 11.12.10.2).
    EXPECT_EQ(Reg(got, kRegId), vcpu_id);
    EXPECT_EQ(Reg(got, kRegLdr), ((vcpu_id >> 4) << 16) | (1u << (vcpu_id & 0xF)));
  }
  EXPECT_EQ(Reg(got, kRegVersion) & 0xFF, kVersionIntegrated);
  // KVM restarted the timer from the saved current count (not from the initial count), and it kept running.
  const uint32_t kvm_count = Reg(got, kRegTimerCurrent);
  EXPECT_LE(kvm_count, sent_count);
  EXPECT_GT(kvm_count, sent_count - (1u << 22)) << "more than 0.5 s of timer ticks between SET and GET";

  // Import into a fresh model: every architectural register equals the original model's.
  NullSink sink2;
  FakeClock clock2;
  LocalApic copy(ConfigFor(vcpu_id), sink2, clock2);
  const absl::Status st = copy.ImportKvmState(got, base);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(copy.mode(), x2 ? ApicMode::kX2Apic : ApicMode::kXApic);
  const kvm_lapic_state again = copy.ExportKvmState();
  for (uint32_t off : ComparedOffsets(x2)) {
    EXPECT_EQ(Reg(again, off), Reg(sent, off)) << "model after import, offset 0x" << std::hex << off;
  }
  EXPECT_EQ(copy.TimerCurrentCount(), kvm_count);
  EXPECT_EQ(copy.TimerDeadlineNs(), clock2.now + uint64_t{kvm_count} * 128);
  EXPECT_EQ(copy.addressing().id, model.addressing().id);
  EXPECT_EQ(copy.addressing().ldr, model.addressing().ldr);
  EXPECT_EQ(copy.PendingInterrupt(), Vector(0xFD));
}

TEST(KvmLapicState, XApicStateRoundTripsThroughKvmIrqchip_SDM_11_4_1) {
  AGGVM_REQUIRE_KVM();
  RoundTrip(Irqchip::kFull, 2, /*x2=*/false);
}

TEST(KvmLapicState, X2ApicStateRoundTripsThroughKvmSplitIrqchip_SDM_11_12) {
  AGGVM_REQUIRE_KVM();
  RoundTrip(Irqchip::kSplit, 0x23, /*x2=*/true);
}

TEST(KvmLapicState, X2ApicStateRoundTripsThroughKvmIrqchip_SDM_11_12) {
  AGGVM_REQUIRE_KVM();
  RoundTrip(Irqchip::kFull, 0x11, /*x2=*/true);
}

// KVM's reset LAPIC of a non-BSP vCPU imports as the model's power-up state (SDM 11.4.7.1).
TEST(KvmLapicState, FreshKvmLapicImportsAsPowerUpState_SDM_11_4_7_1) {
  AGGVM_REQUIRE_KVM();
  KvmLapicVcpu kvm;
  ASSERT_NO_FATAL_FAILURE(kvm.Create(Irqchip::kFull, 1, /*x2apic_api=*/true));
  const kvm_lapic_state fresh = kvm.GetLapic();
  const uint64_t base = kvm.GetMsr(kMsrApicBase);
  EXPECT_EQ(base, kDefaultApicBaseAddress | kApicBaseEnable);
  NullSink sink;
  FakeClock clock;
  LocalApic imported(ConfigFor(1), sink, clock);
  ASSERT_TRUE(imported.ImportKvmState(fresh, base).ok());
  LocalApic power_up(ConfigFor(1), sink, clock);
  const kvm_lapic_state a = imported.ExportKvmState();
  const kvm_lapic_state b = power_up.ExportKvmState();
  // KVM only resets the LVT entries it exposes (CMCI exists only with MCG_CMCI_P): leave CMCI out.
  for (uint32_t off : ComparedOffsets(false)) {
    if (off == kRegLvtCmci) continue;
    EXPECT_EQ(Reg(a, off), Reg(b, off)) << "offset 0x" << std::hex << off;
  }
}

}  // namespace
}  // namespace aggvm::irqchip
