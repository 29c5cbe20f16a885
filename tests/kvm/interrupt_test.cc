// Interrupts from the host reach the handler of the vCPU they address (checked from the guest's IRQ records), through
// KVM_SIGNAL_MSI and through irqfd + GSI routing; level MSI routes exit as KVM_EXIT_IOAPIC_EOI; IPIs ping-pong.
#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"
#include "vcpu/event_fd.h"
#include "vcpu/msi.h"
#include "vcpu/vm.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;
using namespace std::chrono_literals;

std::unique_ptr<ProbeVm> StartIrqSink(uint32_t vcpus) {
  auto vm = ProbeVm::Create(ProbeConfig(guest::AGGVM_WORKLOAD_IRQ_SINK, vcpus));
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

TEST(Interrupts, SignalMsiReachesAddressedVcpu) {
  AGGVM_REQUIRE_KVM();
  auto vm = StartIrqSink(3);
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

TEST(Interrupts, LevelMsiRouteExitsWithIoapicEoi) {
  AGGVM_REQUIRE_KVM();
  auto vm = StartIrqSink(1);
  ASSERT_TRUE(vm);
  const ApicId dest = vm->apic_id(VcpuIndex(0));
  const vcpu::GsiRoute route{Gsi(3), vcpu::FixedMsi(dest, Vector(0x70), vcpu::MsiTrigger::kLevel)};
  ASSERT_TRUE(vm->vm().SetGsiRouting({&route, 1}).ok());
  auto event = vcpu::EventFd::Create();
  ASSERT_TRUE(event.ok());
  auto irqfd = vcpu::IrqFd::Attach(vm->vm(), *event, Gsi(3));
  ASSERT_TRUE(irqfd.ok()) << irqfd.status();

  // An edge MSI first: handled, but its EOI stays in KVM.
  ASSERT_TRUE(vm->injector().InjectMsi(vcpu::FixedMsi(dest, Vector(0x71))).ok());
  ASSERT_TRUE(WaitUntil([&] { return IrqRecords(*vm, 0).size() == 1; }, 10s));
  // The level route: the guest's EOI of 0x70 comes back to the VMM.
  ASSERT_TRUE(event->Signal().ok());
  ASSERT_TRUE(WaitUntil([&] { return !vm->report(VcpuIndex(0)).ioapic_eois.empty(); }, 10s));
  const auto r = vm->report(VcpuIndex(0));
  ASSERT_EQ(r.ioapic_eois.size(), 1u);
  EXPECT_EQ(r.ioapic_eois[0], Vector(0x70));
  const auto recs = IrqRecords(*vm, 0);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[1].a, 0x70u);
  vm->Stop();
}

TEST(Interrupts, IpiPingPongCompletesRounds) {
  AGGVM_REQUIRE_KVM();
  constexpr uint32_t kRounds = 50;
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_IPI_PINGPONG, 3);
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
}

}  // namespace
}  // namespace aggvm::testing
