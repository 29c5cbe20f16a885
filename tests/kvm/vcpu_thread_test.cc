// Pause / resume / stop of a running vCPU from another thread: the spin workload's heartbeat stops while paused and
// moves again after resume.
#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"
#include "vcpu/msi.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;
using State = vcpu::VcpuThread::State;
using namespace std::chrono_literals;

class VcpuThreadTest : public ::testing::TestWithParam<ApicSetup> {};

TEST_P(VcpuThreadTest, PauseResumeStopRunningVcpu) {
  AGGVM_REQUIRE_KVM();
  auto vm = ProbeVm::Create(ProbeConfig(guest::AGGVM_WORKLOAD_SPIN, 2, GetParam()));
  ASSERT_TRUE(vm.ok()) << vm.status();
  ProbeVm& p = **vm;
  ASSERT_TRUE(p.Start().ok());
  ASSERT_TRUE(p.WaitForRecords(VcpuIndex(1), guest::AGGVM_REC_HELLO, 1, absl::Seconds(30)).ok()) << p.error();
  const uint64_t h0 = p.Heartbeat(VcpuIndex(1));
  ASSERT_TRUE(WaitUntil([&] { return p.Heartbeat(VcpuIndex(1)) > h0 + 100; }, 10s)) << "spin is not spinning";

  auto& t = p.thread(VcpuIndex(1));
  t.Pause();
  ASSERT_TRUE(t.WaitForState(State::kPaused, absl::Seconds(5)));
  const uint64_t kicks = t.kicks();
  EXPECT_GE(kicks, 1u) << "the pause kicked the vCPU out of KVM_RUN";
  const uint64_t h1 = p.Heartbeat(VcpuIndex(1));
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(p.Heartbeat(VcpuIndex(1)), h1) << "heartbeat moved while paused";
  // vCPU 0 keeps running meanwhile.
  const uint64_t other = p.Heartbeat(VcpuIndex(0));
  EXPECT_TRUE(WaitUntil([&] { return p.Heartbeat(VcpuIndex(0)) > other; }, 5s));

  t.Resume();
  ASSERT_TRUE(t.WaitForState(State::kRunning, absl::Seconds(5)));
  EXPECT_TRUE(WaitUntil([&] { return p.Heartbeat(VcpuIndex(1)) > h1 + 100; }, 10s)) << "no progress after resume";

  // Pause twice, resume, then stop from the paused state and from the running state.
  t.Pause();
  t.Pause();
  ASSERT_TRUE(t.WaitForState(State::kPaused, absl::Seconds(5)));
  t.Stop();
  EXPECT_TRUE(t.WaitStopped(absl::Seconds(5)).ok());
  EXPECT_EQ(t.state(), State::kStopped);
  t.Resume();  // Stopped is final
  EXPECT_EQ(t.state(), State::kStopped);
  const uint64_t h2 = p.Heartbeat(VcpuIndex(1));
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(p.Heartbeat(VcpuIndex(1)), h2);

  auto& t0 = p.thread(VcpuIndex(0));
  EXPECT_EQ(t0.state(), State::kRunning);
  t0.Stop();
  EXPECT_TRUE(t0.WaitStopped(absl::Seconds(5)).ok());
  EXPECT_TRUE(p.error().ok()) << p.error();
}

// A vCPU halted in the guest (in KVM's LAPIC, or sleeping in userspace in user mode) pauses; an MSI sent while it is
// paused is latched and handled only after Resume; Stop ends a halted vCPU too.
TEST_P(VcpuThreadTest, PauseHaltedVcpuDefersInterruptUntilResume) {
  AGGVM_REQUIRE_KVM();
  auto vm = ProbeVm::Create(ProbeConfig(guest::AGGVM_WORKLOAD_IRQ_SINK, 2, GetParam()));
  ASSERT_TRUE(vm.ok()) << vm.status();
  ProbeVm& p = **vm;
  ASSERT_TRUE(p.Start().ok());
  ASSERT_TRUE(p.WaitForRecords(VcpuIndex(1), guest::AGGVM_REC_HELLO, 1, absl::Seconds(30)).ok()) << p.error();
  std::this_thread::sleep_for(20ms);  // let it reach its HLT
  auto& t = p.thread(VcpuIndex(1));
  t.Pause();
  ASSERT_TRUE(t.WaitForState(State::kPaused, absl::Seconds(5))) << "a halted vCPU did not pause";
  ASSERT_TRUE(p.injector().InjectMsi(vcpu::FixedMsi(p.apic_id(VcpuIndex(1)), Vector(0x55))).ok());
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(CountRecords(p.report(VcpuIndex(1)), guest::AGGVM_REC_IRQ), 0u) << "handled while paused";
  t.Resume();
  ASSERT_TRUE(p.WaitForRecords(VcpuIndex(1), guest::AGGVM_REC_IRQ, 1, absl::Seconds(10)).ok()) << p.error();
  for (const auto& r : p.report(VcpuIndex(1)).records) {
    if (r.type == guest::AGGVM_REC_IRQ) {
      EXPECT_EQ(r.a, 0x55u);
    }
  }
  std::this_thread::sleep_for(20ms);
  t.Stop();
  EXPECT_TRUE(t.WaitStopped(absl::Seconds(5)).ok()) << "a halted vCPU did not stop";
  EXPECT_EQ(CountRecords(p.report(VcpuIndex(0)), guest::AGGVM_REC_IRQ), 0u);
  EXPECT_TRUE(p.error().ok()) << p.error();
}

INSTANTIATE_TEST_SUITE_P(Irqchip, VcpuThreadTest, AllApicSetups(), ApicSetupName);

}  // namespace
}  // namespace aggvm::testing
