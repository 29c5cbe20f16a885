// INIT / SIPI / NMI in `user` irqchip mode on the real /dev/kvm, with hand-made 16-bit guests: every vCPU starts in
// wait-for-SIPI (UserIrqchip::HoldUntilSipi) and runs only once a SIPI names it; what it runs proves where it
// started (it OUTs its CS and a marker byte). Messages come from the guest's own ICR writes (x2APIC MSRs) or from
// the host through UserIrqchip::Deliver, as an agent injects what the master routed. The last test runs two such
// VMs as two "nodes" whose IPIs cross through a RemoteIpiSink (UserIrqchip::SetRemote).
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "irqchip/interrupt.h"
#include "tests/support/require.h"
#include "vcpu/guest_memory.h"
#include "vcpu/kvm.h"
#include "vcpu/long_mode.h"
#include "vcpu/user_irqchip.h"
#include "vcpu/vcpu.h"
#include "vcpu/vcpu_thread.h"
#include "vcpu/vm.h"

namespace aggvm::testing {
namespace {

using namespace std::chrono_literals;
using irqchip::DeliveryMode;
using irqchip::InterruptMessage;
using vcpu::VcpuThread;

constexpr uint16_t kPortCs = 0xE2;      // a vCPU OUTs its CS here (16 bits)
constexpr uint16_t kPortMarker = 0xE1;  // ... and a marker byte here
constexpr uint16_t kPortBspDone = 0xE0;
constexpr uint16_t kPortNmi = 0xE4;     // the real-mode NMI handler's marker

// 16-bit code (hand-assembled; each line is one instruction).
// At vector << 12: report CS and `marker`, then halt forever with IF = 0.
std::vector<uint8_t> ReportAndHalt(uint8_t marker) {
  return {
      0x8C, 0xC8,          // mov ax, cs
      0xE7, kPortCs,       // out kPortCs, ax
      0xB0, marker,        // mov al, marker
      0xE6, kPortMarker,   // out kPortMarker, al
      0xF4,                // hlt
      0xEB, 0xFD,          // jmp short -3 (back to hlt)
  };
}

// The BSP's INIT-SIPI-SIPI (SDM vol. 3, 9.4.4.1) to APIC ID 1, through the x2APIC ICR (MSR 0x830, destination in
// EDX): enable x2APIC, INIT (level assert), SIPI twice with `vector`, then report and halt.
std::vector<uint8_t> BspStartsAp(uint8_t vector) {
  return {
      0x66, 0xB9, 0x1B, 0x00, 0x00, 0x00,  // mov ecx, 0x1B (IA32_APIC_BASE)
      0x0F, 0x32,                          // rdmsr
      0x0D, 0x00, 0x0C,                    // or ax, 0x0C00 (EN | EXTD)
      0x0F, 0x30,                          // wrmsr
      0x66, 0xB9, 0x30, 0x08, 0x00, 0x00,  // mov ecx, 0x830 (ICR)
      0x66, 0xBA, 0x01, 0x00, 0x00, 0x00,  // mov edx, 1 (destination APIC ID 1)
      0x66, 0xB8, 0x00, 0x45, 0x00, 0x00,  // mov eax, 0x4500 (INIT, level assert)
      0x0F, 0x30,                          // wrmsr
      0x66, 0xB8, vector, 0x46, 0x00, 0x00,  // mov eax, 0x4600 | vector (SIPI)
      0x0F, 0x30,                          // wrmsr
      0x0F, 0x30,                          // wrmsr (second SIPI: the AP runs already, it is ignored)
      0xB0, 0xB0,                          // mov al, 0xB0
      0xE6, kPortBspDone,                  // out kPortBspDone, al
      0xF4,                                // hlt
      0xEB, 0xFD,                          // jmp short -3
  };
}

struct Out {
  uint32_t vcpu = 0;
  uint16_t port = 0;
  uint32_t value = 0;
};

// A VM with no in-kernel irqchip, guest RAM at 0 (and optionally 64 KiB of "ROM" below 4 GiB for the reset vector),
// one thread per vCPU, every vCPU held in wait-for-SIPI until the test starts it.
class RealModeVm {
 public:
  static absl::StatusOr<std::unique_ptr<RealModeVm>> Create(std::vector<ApicId> ids, bool reset_vector_rom) {
    auto kvm = vcpu::Kvm::Open();
    if (!kvm.ok()) return kvm.status();
    if (auto s = kvm->RequireExtension(KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR"); !s.ok()) return s;
    auto vm = kvm->CreateVm();
    if (!vm.ok()) return vm.status();
    if (auto s = vcpu::UserIrqchip::ConfigureVm(*vm); !s.ok()) return s;
    std::unique_ptr<RealModeVm> r(new RealModeVm(*std::move(kvm), *std::move(vm)));
    auto ram = vcpu::GuestMemory::Create(r->vm_, 0, GuestAddress(0), 1 << 20);
    if (!ram.ok()) return ram.status();
    r->ram_.emplace(*std::move(ram));
    if (reset_vector_rom) {
      auto rom = vcpu::GuestMemory::Create(r->vm_, 1, GuestAddress(0xFFFF0000), 0x10000);
      if (!rom.ok()) return rom.status();
      r->rom_.emplace(*std::move(rom));
    }
    auto cpuid = r->kvm_.SupportedCpuid();
    if (!cpuid.ok()) return cpuid.status();
    for (ApicId id : ids) {
      auto v = r->vm_.CreateVcpu(id);
      if (!v.ok()) return v.status();
      if (auto s = v->SetCpuid(vcpu::CpuidForVcpu(*cpuid, id)); !s.ok()) return s;
      v->EnableSyncRegs();
      r->vcpus_.push_back(*std::move(v));
    }
    r->chip_ = std::make_unique<vcpu::UserIrqchip>(ids, vcpu::UserIrqchip::Options{});
    for (uint32_t i = 0; i < ids.size(); ++i) {
      r->chip_->HoldUntilSipi(VcpuIndex(i));
      r->threads_.push_back(std::make_unique<VcpuThread>(
          r->vcpus_[i], [p = r.get(), i](vcpu::VcpuExit& e) { return p->HandleExit(i, e); },
          &r->chip_->hooks(VcpuIndex(i))));
      r->chip_->Attach(VcpuIndex(i), r->vcpus_[i], *r->threads_.back());
    }
    return r;
  }

  ~RealModeVm() {
    for (auto& t : threads_) t->Stop();
    threads_.clear();
  }

  absl::Status Load(uint64_t gpa, std::span<const uint8_t> code) {
    if (rom_.has_value() && gpa >= rom_->base().raw()) return rom_->Write(GuestAddress(gpa), code);
    return ram_->Write(GuestAddress(gpa), code);
  }
  absl::Status StartThreads() {
    for (auto& t : threads_) {
      if (auto s = t->Start(); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  uint32_t Deliver(DeliveryMode mode, ApicId dest, uint8_t vector = 0) {
    InterruptMessage m;
    m.mode = mode;
    m.vector = Vector(vector);
    m.destination = dest.value();
    m.x2apic_destination = true;
    return chip_->Deliver(m);
  }

  // Waits for an OUT of `value` to `port` by vCPU `vcpu`; then returns true.
  bool WaitForOut(uint32_t vcpu, uint16_t port, uint32_t value, std::chrono::milliseconds timeout = 20s) {
    std::unique_lock l(mu_);
    return cv_.wait_for(l, timeout, [&] {
      for (const Out& o : outs_) {
        if (o.vcpu == vcpu && o.port == port && o.value == value) return true;
      }
      return !error_.ok();
    }) && error_.ok();
  }
  size_t CountOuts(uint32_t vcpu, uint16_t port) {
    std::lock_guard l(mu_);
    size_t n = 0;
    for (const Out& o : outs_) n += (o.vcpu == vcpu && o.port == port) ? 1 : 0;
    return n;
  }
  std::optional<uint32_t> LastOut(uint32_t vcpu, uint16_t port) {
    std::lock_guard l(mu_);
    std::optional<uint32_t> last;
    for (const Out& o : outs_) {
      if (o.vcpu == vcpu && o.port == port) last = o.value;
    }
    return last;
  }
  absl::Status error() {
    std::lock_guard l(mu_);
    return error_;
  }

  /// Called on the vCPU's thread after each OUT is recorded (no lock held), before the guest resumes: what it does
  /// happens while the guest is provably between that OUT and the next instruction. Before StartThreads.
  void OnOut(std::function<void(uint32_t vcpu, uint16_t port, uint32_t value)> f) { on_out_ = std::move(f); }

  vcpu::UserIrqchip& chip() { return *chip_; }
  VcpuThread& thread(uint32_t i) { return *threads_[i]; }
  vcpu::Vcpu& vcpu(uint32_t i) { return vcpus_[i]; }

 private:
  RealModeVm(vcpu::Kvm kvm, vcpu::Vm vm) : kvm_(std::move(kvm)), vm_(std::move(vm)) {}

  VcpuThread::ExitAction HandleExit(uint32_t i, vcpu::VcpuExit& exit) {
    std::unique_lock l(mu_);
    if (const auto* out = std::get_if<vcpu::IoOut>(&exit)) {
      const Out o{i, out->port, out->Value()};
      outs_.push_back(o);
      cv_.notify_all();
      l.unlock();
      if (on_out_) on_out_(o.vcpu, o.port, o.value);
      return VcpuThread::ExitAction::Continue();
    }
    error_ = absl::InternalError(absl::StrCat("vCPU ", i, ": unexpected exit ", vcpu::DescribeExit(exit)));
    cv_.notify_all();
    return VcpuThread::ExitAction::Finish(error_);
  }

  vcpu::Kvm kvm_;
  vcpu::Vm vm_;
  std::optional<vcpu::GuestMemory> ram_, rom_;
  std::vector<vcpu::Vcpu> vcpus_;
  std::unique_ptr<vcpu::UserIrqchip> chip_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Out> outs_;
  absl::Status error_;
  std::function<void(uint32_t, uint16_t, uint32_t)> on_out_;
  std::vector<std::unique_ptr<VcpuThread>> threads_;  // last: destroyed (stopped, joined) first
};

bool WaitHalted(RealModeVm& v) {
  for (int i = 0; i < 10000; ++i) {
    if (v.chip().counters().halts >= 1) return true;
    std::this_thread::sleep_for(1ms);
  }
  return false;
}

// vCPU 0 (the BSP) is started by a SIPI from the host; it brings up vCPU 1 with INIT-SIPI-SIPI through its own ICR.
TEST(UserModeInitSipi, GuestInitSipiSipiStartsHeldAp) {
  AGGVM_REQUIRE_KVM();
  auto vm = RealModeVm::Create({ApicId(0), ApicId(1)}, false);
  ASSERT_TRUE(vm.ok()) << vm.status();
  RealModeVm& v = **vm;
  ASSERT_TRUE(v.Load(0x1000, BspStartsAp(0x02)).ok());
  ASSERT_TRUE(v.Load(0x2000, ReportAndHalt(0xA1)).ok());
  ASSERT_TRUE(v.StartThreads().ok());

  // Held: neither vCPU enters the guest.
  std::this_thread::sleep_for(100ms);
  EXPECT_TRUE(v.chip().WaitingForSipi(VcpuIndex(0)));
  EXPECT_TRUE(v.chip().WaitingForSipi(VcpuIndex(1)));
  EXPECT_EQ(v.thread(0).exits(), 0u);
  EXPECT_EQ(v.thread(1).exits(), 0u);
  EXPECT_EQ(v.CountOuts(1, kPortMarker), 0u);

  EXPECT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(0), 0x01), 1u);  // BSP code at 0x01 << 12
  ASSERT_TRUE(v.WaitForOut(0, kPortBspDone, 0xB0)) << v.error();
  ASSERT_TRUE(v.WaitForOut(1, kPortMarker, 0xA1)) << v.error();
  EXPECT_TRUE(v.WaitForOut(1, kPortCs, 0x0200)) << "AP's CS is not vector << 8";
  EXPECT_EQ(v.CountOuts(1, kPortMarker), 1u) << "the second SIPI restarted a running AP";
  EXPECT_FALSE(v.chip().WaitingForSipi(VcpuIndex(1)));

  const vcpu::UserIrqchipCounters c = v.chip().counters();
  EXPECT_EQ(c.inits, 1u);
  EXPECT_EQ(c.sipis, 2u);          // host -> BSP, BSP -> AP
  EXPECT_EQ(c.sipis_ignored, 1u);  // the second SIPI of the pair
  EXPECT_EQ(c.startups, 2u);
  EXPECT_EQ(c.unsupported_events, 0u);

  v.thread(1).Pause();
  ASSERT_TRUE(v.thread(1).WaitForState(VcpuThread::State::kPaused, absl::Seconds(10)));
  auto sregs = v.vcpu(1).GetSregs();
  ASSERT_TRUE(sregs.ok()) << sregs.status();
  EXPECT_EQ(sregs->cs.selector, 0x0200);
  EXPECT_EQ(sregs->cs.base, 0x2000u);
  EXPECT_EQ(sregs->cr0 & 1, 0u) << "not in real mode";
  EXPECT_TRUE(v.error().ok()) << v.error();
}

// A running AP: NMI runs its real-mode NMI handler (it was halted with IF = 0); a SIPI is ignored; INIT stops it
// (wait-for-SIPI: a fixed interrupt is refused, the APIC is software-disabled); a SIPI restarts it at the new vector.
TEST(UserModeInitSipi, HostNmiInitSipiOnRunningAp) {
  AGGVM_REQUIRE_KVM();
  auto vm = RealModeVm::Create({ApicId(1)}, false);
  ASSERT_TRUE(vm.ok()) << vm.status();
  RealModeVm& v = **vm;
  const uint8_t ivt_nmi[4] = {0x00, 0x00, 0x00, 0x03};  // IVT entry 2 at 0x8: offset 0, segment 0x0300
  ASSERT_TRUE(v.Load(0x8, ivt_nmi).ok());
  const uint8_t nmi_handler[] = {0xB0, 0x4E, 0xE6, kPortNmi, 0xCF};  // mov al, 0x4E; out kPortNmi, al; iret
  ASSERT_TRUE(v.Load(0x3000, nmi_handler).ok());
  ASSERT_TRUE(v.Load(0x1000, ReportAndHalt(0x11)).ok());
  ASSERT_TRUE(v.Load(0x2000, ReportAndHalt(0x22)).ok());
  ASSERT_TRUE(v.StartThreads().ok());

  EXPECT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(1), 0x01), 1u);
  ASSERT_TRUE(v.WaitForOut(0, kPortMarker, 0x11)) << v.error();
  ASSERT_TRUE(WaitHalted(v));

  EXPECT_EQ(v.Deliver(DeliveryMode::kNmi, ApicId(1)), 1u);
  ASSERT_TRUE(v.WaitForOut(0, kPortNmi, 0x4E)) << "NMI handler did not run: " << v.error();
  EXPECT_EQ(v.chip().counters().nmis, 1u);

  EXPECT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(1), 0x02), 0u) << "SIPI to a running vCPU";
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(v.CountOuts(0, kPortMarker), 1u);
  EXPECT_EQ(v.chip().counters().sipis_ignored, 1u);

  EXPECT_EQ(v.Deliver(DeliveryMode::kInit, ApicId(1)), 1u);
  EXPECT_TRUE(v.chip().WaitingForSipi(VcpuIndex(0)));
  EXPECT_EQ(v.Deliver(DeliveryMode::kFixed, ApicId(1), 0x40), 0u) << "fixed interrupt accepted after INIT";
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(v.CountOuts(0, kPortMarker), 1u);

  EXPECT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(1), 0x02), 1u);
  ASSERT_TRUE(v.WaitForOut(0, kPortMarker, 0x22)) << v.error();
  EXPECT_TRUE(v.WaitForOut(0, kPortCs, 0x0200));
  const vcpu::UserIrqchipCounters c = v.chip().counters();
  EXPECT_EQ(c.inits, 1u);
  EXPECT_EQ(c.sipis, 2u);
  EXPECT_EQ(c.startups, 2u);
  EXPECT_EQ(v.CountOuts(0, kPortNmi), 1u);
  EXPECT_TRUE(v.error().ok()) << v.error();
}

// INIT to the BSP restarts it at the reset vector F000:FFF0 (as KVM does), not in wait-for-SIPI.
TEST(UserModeInitSipi, InitRestartsBspAtResetVector) {
  AGGVM_REQUIRE_KVM();
  auto vm = RealModeVm::Create({ApicId(0)}, true);
  ASSERT_TRUE(vm.ok()) << vm.status();
  RealModeVm& v = **vm;
  ASSERT_TRUE(v.Load(0x1000, ReportAndHalt(0x11)).ok());
  const uint8_t reset[] = {0xB0, 0xBB, 0xE6, kPortMarker, 0xF4, 0xEB, 0xFD};  // mov al, 0xBB; out; hlt; jmp
  ASSERT_TRUE(v.Load(0xFFFFFFF0, reset).ok());
  ASSERT_TRUE(v.StartThreads().ok());
  EXPECT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(0), 0x01), 1u);
  ASSERT_TRUE(v.WaitForOut(0, kPortMarker, 0x11)) << v.error();
  EXPECT_EQ(v.Deliver(DeliveryMode::kInit, ApicId(0)), 1u);
  ASSERT_TRUE(v.WaitForOut(0, kPortMarker, 0xBB)) << "the BSP did not restart at the reset vector: " << v.error();
  EXPECT_FALSE(v.chip().WaitingForSipi(VcpuIndex(0)));
  EXPECT_EQ(v.chip().counters().inits, 1u);
  EXPECT_EQ(v.chip().counters().startups, 2u);
}

// A vCPU waiting for a SIPI still obeys its thread's commands: it pauses, a SIPI sent while it is paused starts it
// only after Resume, and Stop ends a waiting vCPU.
TEST(UserModeInitSipi, WaitingVcpuPausesResumesStops) {
  AGGVM_REQUIRE_KVM();
  auto vm = RealModeVm::Create({ApicId(1), ApicId(2)}, false);
  ASSERT_TRUE(vm.ok()) << vm.status();
  RealModeVm& v = **vm;
  ASSERT_TRUE(v.Load(0x1000, ReportAndHalt(0x11)).ok());
  ASSERT_TRUE(v.StartThreads().ok());
  ASSERT_TRUE(v.thread(0).WaitForState(VcpuThread::State::kRunning, absl::Seconds(10)));
  v.thread(0).Pause();
  ASSERT_TRUE(v.thread(0).WaitForState(VcpuThread::State::kPaused, absl::Seconds(10)));
  EXPECT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(1), 0x01), 1u);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(v.CountOuts(0, kPortMarker), 0u) << "ran while paused";
  v.thread(0).Resume();
  ASSERT_TRUE(v.WaitForOut(0, kPortMarker, 0x11)) << v.error();
  EXPECT_TRUE(v.chip().WaitingForSipi(VcpuIndex(1)));
  v.thread(1).Stop();
  EXPECT_TRUE(v.thread(1).WaitStopped(absl::Seconds(10)).ok());
  EXPECT_EQ(v.thread(1).exits(), 0u);
}

// INIT / SIPI pairs from the host while the vCPU runs, halts or is between the two: every SIPI restarts it at its
// vector, nothing of the discarded context leaks (no unexpected exit ends the VM).
TEST(UserModeInitSipi, RepeatedInitSipiRestartsEveryTime) {
  AGGVM_REQUIRE_KVM();
  auto vm = RealModeVm::Create({ApicId(1)}, false);
  ASSERT_TRUE(vm.ok()) << vm.status();
  RealModeVm& v = **vm;
  ASSERT_TRUE(v.Load(0x1000, ReportAndHalt(0x11)).ok());
  ASSERT_TRUE(v.Load(0x2000, ReportAndHalt(0x22)).ok());
  ASSERT_TRUE(v.StartThreads().ok());
  constexpr int kRounds = 42;  // the last round (odd, waited for) starts it at vector 2
  int waited = 0;
  for (int i = 0; i < kRounds; ++i) {
    const bool first = (i % 2) == 0;
    const size_t before = v.CountOuts(0, kPortMarker);
    if (i > 0) {
      ASSERT_EQ(v.Deliver(DeliveryMode::kInit, ApicId(1)), 1u);
    }
    ASSERT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(1), first ? 0x01 : 0x02), 1u) << "round " << i;
    if (i % 4 == 3) continue;  // sometimes INIT again before it reported
    ++waited;
    for (int t = 0; t < 10000 && v.CountOuts(0, kPortMarker) <= before; ++t) std::this_thread::sleep_for(1ms);
    ASSERT_GT(v.CountOuts(0, kPortMarker), before) << "round " << i << ": no restart. " << v.error();
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(v.LastOut(0, kPortCs), 0x0200u);
  EXPECT_EQ(v.LastOut(0, kPortMarker), 0x22u);
  const vcpu::UserIrqchipCounters c = v.chip().counters();
  EXPECT_EQ(c.inits, static_cast<uint64_t>(kRounds - 1));
  EXPECT_EQ(c.sipis, static_cast<uint64_t>(kRounds));
  EXPECT_EQ(c.sipis_ignored, 0u);
  EXPECT_GE(c.startups, static_cast<uint64_t>(waited));
  EXPECT_TRUE(v.error().ok()) << v.error();
}

// NMI blocking (SDM vol. 3, 6.7.1): an NMI that arrives while the guest's NMI handler runs waits until the handler's
// IRET. The second NMI of each pair below is delivered from the handler's own OUT exit, so it reaches KVM (KVM_NMI)
// while the guest is provably inside the handler: KVM holds it pending, blocked. The handler then IRETs and the main
// loop HLTs at once; that HLT exits to userspace with the NMI still in KVM and nothing in the model — the race that
// hung the probe guest's `nmi` workload. Both NMIs of every pair must run the handler, with IF = 0 at the HLT (an
// NMI ends a halt whatever IF says) and with IF = 1.
class UserModeNmiTest : public ::testing::TestWithParam<bool> {};

TEST_P(UserModeNmiTest, NmiDuringHandlerIsNotLostAtHlt) {
  AGGVM_REQUIRE_KVM();
  const bool sti = GetParam();
  std::atomic<uint32_t> handler_runs{0};  // declared before the VM: its vCPU thread uses it until the VM is gone
  auto vm = RealModeVm::Create({ApicId(1)}, false);
  ASSERT_TRUE(vm.ok()) << vm.status();
  RealModeVm& v = **vm;
  const uint8_t ivt_nmi[4] = {0x00, 0x01, 0x00, 0x03};  // IVT entry 2: 0x0300:0x0100
  ASSERT_TRUE(v.Load(2 * 4, ivt_nmi).ok());
  // push ax; mov al, 0x4E; out kPortNmi, al; pop ax; iret
  const uint8_t nmi_handler[] = {0x50, 0xB0, 0x4E, 0xE6, kPortNmi, 0x58, 0xCF};
  ASSERT_TRUE(v.Load(0x3100, nmi_handler).ok());
  const std::vector<uint8_t> main_loop = {
      static_cast<uint8_t>(sti ? 0xFB : 0x90),  // sti, or nop (IF = 0 after SIPI)
      0xB0, 0x77, 0xE6, kPortMarker,            // mov al, 0x77; out kPortMarker, al (ready)
      0xF4,                                     // hlt
      0xEB, 0xFD,                               // jmp short -3
  };
  ASSERT_TRUE(v.Load(0x1000, main_loop).ok());
  // The first NMI of each pair (odd-numbered handler OUT) sends the second from inside the handler.
  v.OnOut([&](uint32_t, uint16_t port, uint32_t) {
    if (port != kPortNmi) return;
    if (handler_runs.fetch_add(1) % 2 == 0) {
      EXPECT_EQ(v.Deliver(DeliveryMode::kNmi, ApicId(1)), 1u);
    }
  });
  ASSERT_TRUE(v.StartThreads().ok());
  ASSERT_EQ(v.Deliver(DeliveryMode::kStartup, ApicId(1), 0x01), 1u);
  ASSERT_TRUE(v.WaitForOut(0, kPortMarker, 0x77)) << v.error();

  constexpr uint32_t kPairs = 10;
  for (uint32_t pair = 0; pair < kPairs; ++pair) {
    // Halted in userspace before each pair: the first NMI wakes the userspace halt, the second meets the race.
    for (int t = 0; t < 10000 && v.chip().counters().halts < pair + 1; ++t) std::this_thread::sleep_for(1ms);
    ASSERT_GE(v.chip().counters().halts, pair + 1) << "pair " << pair << ": the guest never halted";
    ASSERT_EQ(v.Deliver(DeliveryMode::kNmi, ApicId(1)), 1u);
    const size_t want = 2 * (pair + 1);
    for (int t = 0; t < 5000 && v.CountOuts(0, kPortNmi) < want; ++t) std::this_thread::sleep_for(1ms);
    ASSERT_EQ(v.CountOuts(0, kPortNmi), want)
        << "pair " << pair << ": the NMI sent during the handler was lost (IF = " << sti
        << "); VM status: " << v.error();
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(v.CountOuts(0, kPortNmi), 2 * kPairs) << "an NMI ran twice";
  const vcpu::UserIrqchipCounters c = v.chip().counters();
  EXPECT_EQ(c.nmis, 2 * kPairs);
  std::printf("IF=%d: %llu of %u second NMIs were still in KVM at the HLT (re-entered instead of sleeping)\n",
              sti ? 1 : 0, static_cast<unsigned long long>(c.nmi_halt_reentries), kPairs);
  EXPECT_TRUE(v.error().ok()) << v.error();
}

INSTANTIATE_TEST_SUITE_P(Hlt, UserModeNmiTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "IfSet" : "IfClear"; });

// Two "nodes" in one process (two VMs, one vCPU each, APIC IDs 0 and 1), each with its own UserIrqchip that knows
// the other vCPU only as remote. The RemoteIpiSink plays the master: it hands the whole message to every node's
// Deliver (each matches only its own APICs; the shorthand excludes the sender by its APIC ID). A fixed IPI and an
// NMI all-excluding-self from guest A run guest B's real-mode handlers; A gets nothing back.
class MasterLikeSink final : public vcpu::RemoteIpiSink {
 public:
  void OnRemoteIcr(VcpuIndex, const InterruptMessage& message) override {
    for (vcpu::UserIrqchip* node : nodes) node->Deliver(message);
  }
  std::vector<vcpu::UserIrqchip*> nodes;
};

constexpr uint16_t kPortIrq = 0xE5;

// Real mode: IA32_APIC_BASE |= EN | EXTD, SVR = 0x1FF (x2APIC MSRs).
const std::vector<uint8_t> kEnableX2apic = {
    0x66, 0xB9, 0x1B, 0x00, 0x00, 0x00,  // mov ecx, 0x1B
    0x0F, 0x32,                          // rdmsr
    0x0D, 0x00, 0x0C,                    // or ax, 0x0C00
    0x0F, 0x30,                          // wrmsr
    0x66, 0xB9, 0x0F, 0x08, 0x00, 0x00,  // mov ecx, 0x80F (SVR)
    0x66, 0xB8, 0xFF, 0x01, 0x00, 0x00,  // mov eax, 0x1FF
    0x66, 0x31, 0xD2,                    // xor edx, edx
    0x0F, 0x30,                          // wrmsr
};

std::vector<uint8_t> Concat(std::vector<uint8_t> a, const std::vector<uint8_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// IVT entry `vector` -> 0x0300:offset; handlers at 0x3000 (vector 0x40: OUT + x2APIC EOI) and 0x3100 (NMI: OUT).
absl::Status LoadHandlers(RealModeVm& v) {
  const uint8_t ivt_irq[4] = {0x00, 0x00, 0x00, 0x03};
  const uint8_t ivt_nmi[4] = {0x00, 0x01, 0x00, 0x03};
  const uint8_t irq[] = {
      0xB0, 0x40,                          // mov al, 0x40
      0xE6, kPortIrq,                      // out kPortIrq, al
      0x66, 0xB9, 0x0B, 0x08, 0x00, 0x00,  // mov ecx, 0x80B (EOI)
      0x66, 0x31, 0xC0,                    // xor eax, eax
      0x66, 0x31, 0xD2,                    // xor edx, edx
      0x0F, 0x30,                          // wrmsr
      0xCF,                                // iret
  };
  // push ax; mov al, 0x4E; out kPortNmi, al; pop ax; iret (the NMI may land inside the other handler)
  const uint8_t nmi[] = {0x50, 0xB0, 0x4E, 0xE6, kPortNmi, 0x58, 0xCF};
  if (auto s = v.Load(0x40 * 4, ivt_irq); !s.ok()) return s;
  if (auto s = v.Load(2 * 4, ivt_nmi); !s.ok()) return s;
  if (auto s = v.Load(0x3000, irq); !s.ok()) return s;
  return v.Load(0x3100, nmi);
}

TEST(UserModeRemoteIpi, FixedAndNmiShorthandCrossNodes) {
  AGGVM_REQUIRE_KVM();
  auto a = RealModeVm::Create({ApicId(0)}, false);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = RealModeVm::Create({ApicId(1)}, false);
  ASSERT_TRUE(b.ok()) << b.status();
  RealModeVm& va = **a;
  RealModeVm& vb = **b;
  MasterLikeSink master;
  master.nodes = {&va.chip(), &vb.chip()};
  irqchip::ApicAddressing remote_of_a, remote_of_b;
  remote_of_a.id = ApicId(1);
  remote_of_a.x2apic = true;
  remote_of_b.id = ApicId(0);
  remote_of_b.x2apic = true;
  va.chip().SetRemote(std::span(&remote_of_a, 1), &master);
  vb.chip().SetRemote(std::span(&remote_of_b, 1), &master);

  ASSERT_TRUE(LoadHandlers(va).ok());
  ASSERT_TRUE(LoadHandlers(vb).ok());
  const std::vector<uint8_t> b_main = {
      0xB0, 0x77, 0xE6, kPortMarker,  // mov al, 0x77; out kPortMarker, al (ready)
      0xFB,                           // sti
      0xF4,                           // hlt
      0xEB, 0xFD,                     // jmp short -3
  };
  ASSERT_TRUE(vb.Load(0x1000, Concat(kEnableX2apic, b_main)).ok());
  const std::vector<uint8_t> a_main = {
      0x66, 0xB9, 0x30, 0x08, 0x00, 0x00,  // mov ecx, 0x830 (ICR)
      0x66, 0xBA, 0x01, 0x00, 0x00, 0x00,  // mov edx, 1
      0x66, 0xB8, 0x40, 0x00, 0x00, 0x00,  // mov eax, 0x40 (fixed, physical, vector 0x40)
      0x0F, 0x30,                          // wrmsr
      0x66, 0x31, 0xD2,                    // xor edx, edx
      0x66, 0xB8, 0x00, 0x04, 0x0C, 0x00,  // mov eax, 0xC0400 (NMI, all excluding self)
      0x0F, 0x30,                          // wrmsr
      0xB0, 0xA0, 0xE6, kPortBspDone,      // mov al, 0xA0; out kPortBspDone, al
      0xF4, 0xEB, 0xFD,                    // hlt; jmp short -3
  };
  ASSERT_TRUE(va.Load(0x1000, Concat(kEnableX2apic, a_main)).ok());
  ASSERT_TRUE(va.StartThreads().ok());
  ASSERT_TRUE(vb.StartThreads().ok());

  ASSERT_EQ(vb.Deliver(DeliveryMode::kStartup, ApicId(1), 0x01), 1u);
  ASSERT_TRUE(vb.WaitForOut(0, kPortMarker, 0x77)) << vb.error();
  ASSERT_EQ(va.Deliver(DeliveryMode::kStartup, ApicId(0), 0x01), 1u);
  ASSERT_TRUE(va.WaitForOut(0, kPortBspDone, 0xA0)) << va.error();
  EXPECT_TRUE(vb.WaitForOut(0, kPortIrq, 0x40)) << "fixed IPI did not reach the other node: " << vb.error();
  EXPECT_TRUE(vb.WaitForOut(0, kPortNmi, 0x4E)) << "NMI shorthand did not reach the other node: " << vb.error();
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(va.CountOuts(0, kPortNmi), 0u) << "all-excluding-self reached the sender";
  EXPECT_EQ(va.CountOuts(0, kPortIrq), 0u);
  EXPECT_EQ(vb.CountOuts(0, kPortIrq), 1u);
  const vcpu::UserIrqchipCounters ca = va.chip().counters();
  EXPECT_EQ(ca.ipis, 2u);
  EXPECT_EQ(ca.remote_ipis, 2u);
  EXPECT_EQ(ca.undelivered, 0u);
  EXPECT_EQ(vb.chip().counters().nmis, 1u);
  EXPECT_EQ(vb.chip().counters().injected, 1u);
  EXPECT_EQ(va.chip().counters().nmis, 0u);
}

}  // namespace
}  // namespace aggvm::testing
