// Interrupts from the host reach the handler of the vCPU they address (checked from the guest's IRQ records), through
// the VM's InterruptInjector (KVM_SIGNAL_MSI in kernel irqchip mode, the userspace LAPICs + KVM_INTERRUPT in user
// mode) and, in kernel mode, through irqfd + GSI routing; a level-triggered EOI is reported (KVM_EXIT_IOAPIC_EOI, or
// the user irqchip's EOI broadcast); IPIs ping-pong. Each parametrized test runs in both irqchip modes, with the
// guest's LAPIC in x2APIC and in xAPIC mode.
#include <unistd.h>

#include <future>
#include <optional>
#include <thread>

#include "node-agent/irq_probe.h"

#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"
#include "tests/support/thread_watch.h"
#include "vcpu/event_fd.h"
#include "vcpu/msi.h"
#include "vcpu/vm.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;
using namespace std::chrono_literals;

std::unique_ptr<ProbeVm> StartIrqSink(uint32_t vcpus, ApicSetup setup = {}) {
  auto vm = ProbeVm::Create(ProbeConfig(guest::AGGVM_WORKLOAD_IRQ_SINK, vcpus, setup));
  EXPECT_TRUE(vm.ok()) << vm.status();
  if (!vm.ok()) return nullptr;
  EXPECT_TRUE((*vm)->Start().ok());
  for (uint32_t i = 0; i < vcpus; ++i) {
    // HELLO = IDT loaded and LAPIC enabled: an MSI sent earlier would be dropped by a disabled LAPIC.
    const absl::Status s = (*vm)->WaitForRecords(VcpuIndex(i), guest::AGGVM_REC_HELLO, 1, absl::Seconds(30));
    EXPECT_TRUE(s.ok()) << s;
  }
  return *std::move(vm);
}

std::vector<agent::Record> IrqRecords(ProbeVm& vm, uint32_t index) {
  std::vector<agent::Record> out;
  for (const auto& r : vm.report(VcpuIndex(index)).records) {
    if (r.type == guest::AGGVM_REC_IRQ) out.push_back(r);
  }
  return out;
}

class InterruptsTest : public ::testing::TestWithParam<ApicSetup> {};

TEST_P(InterruptsTest, MsiReachesAddressedVcpu) {
  AGGVM_REQUIRE_KVM();
  auto vm = StartIrqSink(3, GetParam());
  ASSERT_TRUE(vm);
  // vCPU 2 then vCPU 0, different vectors; vCPU 1 must see nothing.
  const std::pair<uint32_t, uint8_t> shots[] = {{2, 0x41}, {0, 0x42}, {2, 0x43}};
  for (auto [target, vector] : shots) {
    const size_t before = IrqRecords(*vm, target).size();
    ASSERT_TRUE(vm->injector().InjectMsi(vcpu::FixedMsi(vm->apic_id(VcpuIndex(target)), Vector(vector))).ok());
    ASSERT_TRUE(WaitUntil([&] { return IrqRecords(*vm, target).size() > before; }, 10s)) << "vCPU " << target;
    const auto recs = IrqRecords(*vm, target);
    EXPECT_EQ(recs.back().a, vector);
    EXPECT_EQ(recs.back().vcpu, target);
    EXPECT_EQ(recs.back().c, before) << "per-vCPU sequence number";
  }
  EXPECT_TRUE(IrqRecords(*vm, 1).empty());
  EXPECT_EQ(IrqRecords(*vm, 0).size(), 1u);
  EXPECT_EQ(IrqRecords(*vm, 2).size(), 2u);
  // An MSI to an APIC ID no vCPU has is not delivered, and says so.
  const absl::Status lost = vm->injector().InjectMsi(vcpu::FixedMsi(ApicId(7), Vector(0x44)));
  EXPECT_EQ(lost.code(), absl::StatusCode::kUnavailable) << lost;
  EXPECT_TRUE(vm->error().ok()) << vm->error();
  vm->Stop();
}

// The latency benches' probe: both waiters measure every MSI at its addressed vCPU; the sleeping one (the floor of the
// cluster bench) sleeps without a timer until the IRQ record, and still ends at its budget when none comes.
TEST_P(InterruptsTest, IrqProbeMeasuresEveryMsiAndItsSleepingWaiterEndsAtTheBudget) {
  AGGVM_REQUIRE_KVM();
  agent::IrqProbe probe;
  agent::ProbeVmConfig config = ProbeConfig(guest::AGGVM_WORKLOAD_IRQ_SINK, 2, GetParam());
  probe.Attach(config);
  auto created = ProbeVm::Create(config);
  ASSERT_TRUE(created.ok()) << created.status();
  std::unique_ptr<ProbeVm> vm = *std::move(created);
  ASSERT_TRUE(vm->Start().ok());
  constexpr size_t kSamples = 40;
  for (auto waiter : {agent::IrqProbe::Waiter::kSpin, agent::IrqProbe::Waiter::kSleep}) {
    const bool sleeps = waiter == agent::IrqProbe::Waiter::kSleep;
    // The sleeping waiter paced (as the cluster bench's floor runs it), the spinning one back to back.
    const absl::Duration pace = sleeps ? absl::Microseconds(500) : absl::ZeroDuration();
    const int64_t before = VoluntarySwitches(::gettid());
    const absl::Time start = absl::Now();
    auto m = probe.Measure(*vm, VcpuIndex(1), Vector(0x45), kSamples, agent::MsiPath::kInjector, absl::Seconds(20),
                           waiter, pace);
    const absl::Duration took = absl::Now() - start;
    const int64_t slept = VoluntarySwitches(::gettid()) - before;
    ASSERT_TRUE(m.ok()) << (sleeps ? "sleeping: " : "spinning: ") << m.status();
    ASSERT_EQ(m->to_handler_us.size(), kSamples);
    ASSERT_EQ(m->to_vmm_us.size(), kSamples);
    for (size_t i = 0; i < kSamples; ++i) {
      EXPECT_GT(m->to_handler_us[i], 0.0) << i;
      EXPECT_GE(m->to_vmm_us[i], m->to_handler_us[i]) << i << ": the VMM saw the record before the handler ran";
    }
    // The handler's record comes back through an exit to userspace: a sleeping waiter has gone to sleep for most.
    if (sleeps) {
      EXPECT_GE(slept, static_cast<int64_t>(kSamples / 4)) << "the sleeping waiter did not sleep";
    }
    EXPECT_GE(took, static_cast<double>(kSamples - 1) * pace) << "the samples were not paced";
  }
  EXPECT_EQ(IrqRecords(*vm, 1).size(), 2 * kSamples);
  EXPECT_TRUE(IrqRecords(*vm, 0).empty());

  // Paused vCPUs handle nothing: the sleeping waiter (no timer of its own) ends at its budget, with the MSI named.
  // If the budget does not end the sleep, resuming the vCPUs does (the test then fails instead of hanging).
  ASSERT_TRUE(vm->Pause().ok());
  const absl::Time t0 = absl::Now();
  std::promise<absl::StatusOr<agent::IrqLatencySamples>> result;
  auto stuck = result.get_future();
  std::thread measure([&] {
    result.set_value(probe.Measure(*vm, VcpuIndex(1), Vector(0x46), 3, agent::MsiPath::kInjector,
                                   absl::Milliseconds(200), agent::IrqProbe::Waiter::kSleep));
  });
  const bool ended = stuck.wait_for(10s) == std::future_status::ready;
  const absl::Duration took = absl::Now() - t0;
  vm->Resume();
  measure.join();
  EXPECT_TRUE(ended) << "the budget did not end the sleeping waiter's wait";
  const auto got = stuck.get();
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded) << got.status();
  EXPECT_NE(got.status().message().find("MSI 1 of 3"), std::string::npos) << got.status();
  EXPECT_GE(took, absl::Milliseconds(200));
  vm->Stop();
}

TEST(Interrupts, IrqfdReachesAddressedVcpu) {
  AGGVM_REQUIRE_KVM();
  auto vm = StartIrqSink(2);
  ASSERT_TRUE(vm);
  const vcpu::GsiRoute routes[] = {{Gsi(5), vcpu::FixedMsi(vm->apic_id(VcpuIndex(1)), Vector(0x61))},
                                   {Gsi(6), vcpu::FixedMsi(vm->apic_id(VcpuIndex(0)), Vector(0x62))}};
  ASSERT_TRUE(vm->vm().SetGsiRouting(routes).ok());
  auto e5 = vcpu::EventFd::Create();
  auto e6 = vcpu::EventFd::Create();
  ASSERT_TRUE(e5.ok() && e6.ok());
  auto f5 = vcpu::IrqFd::Attach(vm->vm(), *e5, Gsi(5));
  auto f6 = vcpu::IrqFd::Attach(vm->vm(), *e6, Gsi(6));
  ASSERT_TRUE(f5.ok()) << f5.status();
  ASSERT_TRUE(f6.ok()) << f6.status();

  ASSERT_TRUE(e5->Signal().ok());
  ASSERT_TRUE(WaitUntil([&] { return !IrqRecords(*vm, 1).empty(); }, 10s));
  EXPECT_EQ(IrqRecords(*vm, 1).back().a, 0x61u);
  ASSERT_TRUE(e6->Signal().ok());
  ASSERT_TRUE(WaitUntil([&] { return !IrqRecords(*vm, 0).empty(); }, 10s));
  EXPECT_EQ(IrqRecords(*vm, 0).back().a, 0x62u);
  EXPECT_EQ(IrqRecords(*vm, 1).size(), 1u);
  EXPECT_TRUE(vm->error().ok()) << vm->error();
  vm->Stop();
}

// A level-triggered MSI's EOI comes back to the VMM as an IoapicEoi exit; an edge MSI's does not. Kernel mode: a
// level MSI route behind an irqfd (KVM exits with KVM_EXIT_IOAPIC_EOI only for vectors of level routes). User mode:
// the level MSI through the injector; the LocalApic's EOI broadcast is surfaced as the same exit.
TEST_P(InterruptsTest, LevelMsiEoiIsReported) {
  AGGVM_REQUIRE_KVM();
  const bool user = GetParam().irqchip == vcpu::IrqchipMode::kUser;
  auto vm = StartIrqSink(1, GetParam());
  ASSERT_TRUE(vm);
  const ApicId dest = vm->apic_id(VcpuIndex(0));
  const vcpu::MsiMessage level_msi = vcpu::FixedMsi(dest, Vector(0x70), vcpu::MsiTrigger::kLevel);
  std::optional<vcpu::EventFd> event;
  std::optional<vcpu::IrqFd> irqfd;
  if (!user) {
    const vcpu::GsiRoute route{Gsi(3), level_msi};
    ASSERT_TRUE(vm->vm().SetGsiRouting({&route, 1}).ok());
    auto e = vcpu::EventFd::Create();
    ASSERT_TRUE(e.ok());
    event.emplace(*std::move(e));
    auto f = vcpu::IrqFd::Attach(vm->vm(), *event, Gsi(3));
    ASSERT_TRUE(f.ok()) << f.status();
    irqfd.emplace(*std::move(f));
  }

  // An edge MSI first: handled, but its EOI is not reported.
  ASSERT_TRUE(vm->injector().InjectMsi(vcpu::FixedMsi(dest, Vector(0x71))).ok());
  ASSERT_TRUE(WaitUntil([&] { return IrqRecords(*vm, 0).size() == 1; }, 10s));
  // The level one: the guest's EOI of 0x70 comes back to the VMM.
  if (user) {
    ASSERT_TRUE(vm->injector().InjectMsi(level_msi).ok());
  } else {
    ASSERT_TRUE(event->Signal().ok());
  }
  ASSERT_TRUE(WaitUntil([&] { return !vm->report(VcpuIndex(0)).ioapic_eois.empty(); }, 10s));
  std::this_thread::sleep_for(20ms);  // a second (wrong) report would show up here
  const auto r = vm->report(VcpuIndex(0));
  ASSERT_EQ(r.ioapic_eois.size(), 1u);
  EXPECT_EQ(r.ioapic_eois[0], Vector(0x70));
  const auto recs = IrqRecords(*vm, 0);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[1].a, 0x70u);
  if (user) {
    EXPECT_EQ(vm->user_irqchip()->counters().eoi_broadcasts, 1u);
  }
  EXPECT_TRUE(vm->error().ok()) << vm->error();
  vm->Stop();
}

TEST_P(InterruptsTest, IpiPingPongCompletesRounds) {
  AGGVM_REQUIRE_KVM();
  constexpr uint32_t kRounds = 50;
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_IPI_PINGPONG, 3, GetParam());
  config.iterations = kRounds;
  config.ping_vcpu = VcpuIndex(2);
  config.pong_vcpu = VcpuIndex(0);
  auto vm = ProbeVm::Create(config);
  ASSERT_TRUE(vm.ok()) << vm.status();
  ASSERT_TRUE((*vm)->Start().ok());
  ASSERT_TRUE((*vm)->WaitDone(absl::Seconds(60)).ok()) << (*vm)->error();
  (*vm)->Stop();
  const auto ping = (*vm)->report(VcpuIndex(2));
  std::vector<agent::Record> rounds;
  for (const auto& r : ping.records) {
    if (r.type == guest::AGGVM_REC_PING_ROUND) rounds.push_back(r);
  }
  ASSERT_EQ(rounds.size(), kRounds);
  for (uint32_t i = 0; i < kRounds; ++i) {
    EXPECT_EQ(rounds[i].a, i);
    EXPECT_GT(rounds[i].c, rounds[i].b) << "answer after the ping, round " << i;
    if (i > 0) {
      EXPECT_GT(rounds[i].b, rounds[i - 1].c) << "rdtsc increases across rounds";
    }
  }
  EXPECT_EQ(CountRecords((*vm)->report(VcpuIndex(0)), guest::AGGVM_REC_PING_ROUND), 0u);
  EXPECT_EQ(CountRecords((*vm)->report(VcpuIndex(1)), guest::AGGVM_REC_PING_ROUND), 0u);
  const auto rtt = agent::PingPongRoundTripsUs(ping, (*vm)->tsc_khz());
  EXPECT_EQ(rtt.size(), kRounds);
  if (GetParam().irqchip == vcpu::IrqchipMode::kUser) {
    const auto c = (*vm)->user_irqchip()->counters();
    // Plus the warm-up handshake: AGGVM_VEC_WARMUP until the pong answers, and its READY answers.
    EXPECT_GE(c.ipis, 2u * kRounds) << "every ping and every pong went through the userspace router";
    // Only warm-ups that reached the pong before its LAPIC was enabled are refused, never a ping or a pong.
    EXPECT_LE(c.undelivered, c.ipis - 2u * kRounds);
    EXPECT_GE(c.injected, 2u * kRounds);
  }
}

INSTANTIATE_TEST_SUITE_P(Irqchip, InterruptsTest, AllApicSetups(), ApicSetupName);

// ---- user irqchip only: what the userspace router decides ----

class UserIrqchipTest : public ::testing::TestWithParam<bool> {  // param: guest LAPIC in x2APIC mode
 protected:
  std::unique_ptr<ProbeVm> Start(uint32_t vcpus) { return StartIrqSink(vcpus, {vcpu::IrqchipMode::kUser, GetParam()}); }
};

// Physical destination 0xFF from an 8-bit MSI is a broadcast (SDM 11.6.2.1; x2APIC targets too, 11.12.9 / KVM).
TEST_P(UserIrqchipTest, BroadcastMsiReachesEveryVcpu) {
  AGGVM_REQUIRE_KVM();
  auto vm = Start(3);
  ASSERT_TRUE(vm);
  ASSERT_TRUE(vm->injector().InjectMsi(vcpu::FixedMsi(ApicId(0xFF), Vector(0x48))).ok());
  for (uint32_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(WaitUntil([&] { return IrqRecords(*vm, i).size() == 1; }, 10s)) << "vCPU " << i;
    EXPECT_EQ(IrqRecords(*vm, i)[0].a, 0x48u);
  }
  vm->Stop();
}

// Lowest-priority delivery (data bits 10:8 = 001, SDM 11.6.2.4) to a broadcast destination: exactly one vCPU takes
// each message.
TEST_P(UserIrqchipTest, LowestPriorityMsiReachesExactlyOneVcpu) {
  AGGVM_REQUIRE_KVM();
  constexpr uint32_t kVcpus = 3;
  constexpr uint32_t kShots = 6;
  auto vm = Start(kVcpus);
  ASSERT_TRUE(vm);
  auto total = [&] {
    size_t n = 0;
    for (uint32_t i = 0; i < kVcpus; ++i) n += IrqRecords(*vm, i).size();
    return n;
  };
  for (uint32_t shot = 0; shot < kShots; ++shot) {
    vcpu::MsiMessage msi = vcpu::FixedMsi(ApicId(0xFF), Vector(0x60));
    msi.data |= 1u << 8;  // lowest priority
    ASSERT_TRUE(vm->injector().InjectMsi(msi).ok());
    ASSERT_TRUE(WaitUntil([&] { return total() >= shot + 1; }, 10s)) << "shot " << shot;
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(total(), kShots) << "a lowest-priority message reached more than one vCPU";
  vm->Stop();
}

// What is not an APIC message is refused with a reason, counted, and nothing reaches the guest.
TEST_P(UserIrqchipTest, BadMsiIsRefusedAndCounted) {
  AGGVM_REQUIRE_KVM();
  auto vm = Start(1);
  ASSERT_TRUE(vm);
  vcpu::MsiMessage not_apic = vcpu::FixedMsi(ApicId(0), Vector(0x50));
  not_apic.address_lo = 0xFED00000;
  const absl::Status s = vm->injector().InjectMsi(not_apic);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  vcpu::MsiMessage reserved_mode = vcpu::FixedMsi(ApicId(0), Vector(0x50));
  reserved_mode.data |= 3u << 8;  // delivery mode 011b is reserved (SDM 11.11.2)
  EXPECT_EQ(vm->injector().InjectMsi(reserved_mode).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vm->user_irqchip()->counters().bad_msis, 2u);
  // There is no in-kernel irqchip in this mode: KVM itself refuses to deliver an MSI.
  EXPECT_FALSE(vm->vm().SignalMsi(vcpu::FixedMsi(ApicId(0), Vector(0x50))).value_or(false));
  std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(IrqRecords(*vm, 0).empty());
  EXPECT_TRUE(vm->error().ok()) << vm->error();
  vm->Stop();
}

std::string GuestApicModeName(const ::testing::TestParamInfo<bool>& p) { return p.param ? "X2apic" : "Xapic"; }

INSTANTIATE_TEST_SUITE_P(GuestApicMode, UserIrqchipTest, ::testing::Bool(), GuestApicModeName);

}  // namespace
}  // namespace aggvm::testing
