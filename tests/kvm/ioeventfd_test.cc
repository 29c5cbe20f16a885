// IoEventFd (KVM_IOEVENTFD, api.rst): a guest OUT to a registered port signals the eventfd inside KVM instead of
// exiting to userspace; with a datamatch only that value does; after deassignment (the destructor) the OUT exits to
// userspace again. The guest is the exit-loop workload: `iterations` times OUT dword i to AGGVM_PORT_NOP, whose
// userspace exits the VMM counts in VcpuReport::nop_exits.
#include <sys/eventfd.h>

#include <optional>

#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"
#include "vcpu/event_fd.h"
#include "vcpu/vm.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;
using vcpu::EventFd;
using vcpu::IoEventFd;

constexpr uint32_t kIterations = 50;

std::unique_ptr<ProbeVm> MakeExitLoop(ApicSetup setup) {
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_EXIT_LOOP, 1, setup);
  config.iterations = kIterations;
  auto vm = ProbeVm::Create(config);
  EXPECT_TRUE(vm.ok()) << vm.status();
  return vm.ok() ? *std::move(vm) : nullptr;
}

/// Runs the guest to DONE and returns its userspace NOP exits.
uint64_t RunToDone(ProbeVm& vm) {
  EXPECT_TRUE(vm.Start().ok());
  const absl::Status s = vm.WaitDone(absl::Seconds(60));
  EXPECT_TRUE(s.ok()) << s;
  vm.Stop();
  return vm.report(VcpuIndex(0)).nop_exits;
}

/// The eventfd's counter, reset; 0 when it was never signalled (EFD_NONBLOCK read: EAGAIN).
uint64_t Drain(EventFd& e) {
  auto v = e.Consume();
  if (!v.ok()) {
    EXPECT_TRUE(absl::IsUnavailable(v.status())) << v.status();  // EAGAIN
    return 0;
  }
  return *v;
}

class IoEventFdTest : public ::testing::TestWithParam<ApicSetup> {};

TEST_P(IoEventFdTest, EveryOutToThePortSignalsTheEventfd) {
  AGGVM_REQUIRE_KVM();
  auto vm = MakeExitLoop(GetParam());
  ASSERT_TRUE(vm);
  auto event = EventFd::Create(EFD_NONBLOCK);
  ASSERT_TRUE(event.ok()) << event.status();
  auto io = IoEventFd::Attach(vm->vm(), *event, IoEventFd::Space::kPio, AGGVM_PORT_NOP, 4);
  ASSERT_TRUE(io.ok()) << io.status();
  EXPECT_EQ(RunToDone(*vm), 0u) << "an OUT to an ioeventfd port must not exit to userspace";
  EXPECT_EQ(Drain(*event), kIterations);
  EXPECT_EQ(vm->report(VcpuIndex(0)).records.size(), kIterations) << "the record port still exits";
}

TEST_P(IoEventFdTest, DatamatchSignalsOnlyTheMatchingValue) {
  AGGVM_REQUIRE_KVM();
  auto vm = MakeExitLoop(GetParam());
  ASSERT_TRUE(vm);
  auto event = EventFd::Create(EFD_NONBLOCK);
  ASSERT_TRUE(event.ok()) << event.status();
  constexpr uint64_t kMatch = 7;  // the guest OUTs its iteration number: only iteration 7 matches
  auto io = IoEventFd::Attach(vm->vm(), *event, IoEventFd::Space::kPio, AGGVM_PORT_NOP, 4, kMatch);
  ASSERT_TRUE(io.ok()) << io.status();
  EXPECT_EQ(RunToDone(*vm), kIterations - 1) << "non-matching values exit to userspace";
  EXPECT_EQ(Drain(*event), 1u);
}

TEST_P(IoEventFdTest, AfterDeassignTheOutExitsToUserspaceAgain) {
  AGGVM_REQUIRE_KVM();
  auto vm = MakeExitLoop(GetParam());
  ASSERT_TRUE(vm);
  auto event = EventFd::Create(EFD_NONBLOCK);
  ASSERT_TRUE(event.ok()) << event.status();
  {
    auto io = IoEventFd::Attach(vm->vm(), *event, IoEventFd::Space::kPio, AGGVM_PORT_NOP, 4);
    ASSERT_TRUE(io.ok()) << io.status();
    IoEventFd moved(*std::move(io));  // the moved-from one must not deassign: `moved` does, once
    // The same registration twice is refused while it exists (api.rst: EEXIST)...
    EXPECT_FALSE(IoEventFd::Attach(vm->vm(), *event, IoEventFd::Space::kPio, AGGVM_PORT_NOP, 4).ok());
  }
  // ...and accepted again after the destructor deassigned it.
  {
    auto again = IoEventFd::Attach(vm->vm(), *event, IoEventFd::Space::kPio, AGGVM_PORT_NOP, 4);
    ASSERT_TRUE(again.ok()) << again.status();
  }
  EXPECT_EQ(RunToDone(*vm), kIterations);
  EXPECT_EQ(Drain(*event), 0u);
}

INSTANTIATE_TEST_SUITE_P(Irqchip, IoEventFdTest,
                         ::testing::Values(ApicSetup{vcpu::IrqchipMode::kKernel, true},
                                           ApicSetup{vcpu::IrqchipMode::kUser, true}),
                         ApicSetupName);

TEST(IoEventFd, BadLengthIsRefused) {
  AGGVM_REQUIRE_KVM();
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_HELLO, 1);
  auto vm = ProbeVm::Create(config);
  ASSERT_TRUE(vm.ok()) << vm.status();
  auto event = EventFd::Create(EFD_NONBLOCK);
  ASSERT_TRUE(event.ok());
  auto io = IoEventFd::Attach((*vm)->vm(), *event, IoEventFd::Space::kPio, AGGVM_PORT_NOP, 3);
  ASSERT_FALSE(io.ok());
  EXPECT_EQ(io.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(io.status().message().find("length 3"), absl::string_view::npos) << io.status();
}

}  // namespace
}  // namespace aggvm::testing
