// Pause / resume / stop of a running vCPU from another thread: the spin workload's heartbeat stops while paused and
// moves again after resume.
#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;
using State = vcpu::VcpuThread::State;
using namespace std::chrono_literals;

TEST(VcpuThread, PauseResumeStopRunningVcpu) {
  AGGVM_REQUIRE_KVM();
  auto vm = ProbeVm::Create(ProbeConfig(guest::AGGVM_WORKLOAD_SPIN, 2));
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

}  // namespace
}  // namespace aggvm::testing
