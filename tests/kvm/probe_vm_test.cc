// The probe guest boots in long mode on N vCPUs, and a misbehaving guest ends its VM with a clear error.
#include <cstdio>
#include <fstream>
#include <string>

#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;

void RunHello(uint32_t vcpus, ApicSetup setup) {
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_HELLO, vcpus, setup);
  auto vm = ProbeVm::Create(config);
  ASSERT_TRUE(vm.ok()) << vm.status();
  ASSERT_TRUE((*vm)->Start().ok());
  ASSERT_TRUE((*vm)->WaitDone(absl::Seconds(30)).ok()) << (*vm)->error();
  (*vm)->Stop();
  for (uint32_t i = 0; i < vcpus; ++i) {
    const auto r = (*vm)->report(VcpuIndex(i));
    ASSERT_EQ(CountRecords(r, guest::AGGVM_REC_HELLO), 1u) << "vCPU " << i;
    for (const auto& rec : r.records) {
      EXPECT_EQ(rec.vcpu, i);
      EXPECT_EQ(rec.a, (*vm)->apic_id(VcpuIndex(i)).value()) << "APIC ID the guest read from its LAPIC";
      EXPECT_GT(rec.b, 0u) << "rdtsc";
    }
    ASSERT_EQ(r.console_lines.size(), 1u);
    EXPECT_EQ(r.console_lines[0], "hello from vcpu " + std::to_string(i) + " apic " + std::to_string(i));
    EXPECT_EQ(r.done_status, 0u);
  }
  if (setup.irqchip == vcpu::IrqchipMode::kUser) {
    // The LAPIC accesses really went to the userspace models: MSR exits in x2APIC mode, MMIO exits in xAPIC mode.
    ASSERT_NE((*vm)->user_irqchip(), nullptr);
    const auto c = (*vm)->user_irqchip()->counters();
    EXPECT_GE(c.apic_msr_accesses, vcpus) << "IA32_APIC_BASE reads at least";
    if (setup.x2apic) {
      EXPECT_EQ(c.apic_mmio_accesses, 0u);
    } else {
      EXPECT_GE(c.apic_mmio_accesses, 2u * vcpus) << "SVR write and ID read per vCPU";
    }
    EXPECT_EQ(c.foreign_msrs_gp, 0u);
    for (uint32_t i = 0; i < vcpus; ++i) {
      const auto ac = (*vm)->user_irqchip()->apic_counters(VcpuIndex(i));
      EXPECT_EQ(ac.gp_faults + ac.illegal_apic_base + ac.reserved_accesses, 0u) << "vCPU " << i;
    }
  } else {
    EXPECT_EQ((*vm)->user_irqchip(), nullptr);
  }
}

class ProbeVmTest : public ::testing::TestWithParam<ApicSetup> {};

TEST_P(ProbeVmTest, HelloOneVcpu) {
  AGGVM_REQUIRE_KVM();
  RunHello(1, GetParam());
}

TEST_P(ProbeVmTest, HelloFourVcpus) {
  AGGVM_REQUIRE_KVM();
  RunHello(4, GetParam());
}

void ExpectVmError(guest::aggvm_workload workload, ApicSetup setup, absl::StatusCode code,
                   std::vector<std::string> needles) {
  auto vm = ProbeVm::Create(ProbeConfig(workload, 2, setup));
  ASSERT_TRUE(vm.ok()) << vm.status();
  ASSERT_TRUE((*vm)->Start().ok());
  const absl::Status s = (*vm)->WaitDone(absl::Seconds(30));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), code) << s;
  for (const auto& n : needles) EXPECT_NE(s.message().find(n), absl::string_view::npos) << s << " lacks " << n;
  (*vm)->Stop();  // bounded: every vCPU thread stops
  for (uint32_t i = 0; i < 2; ++i) {
    EXPECT_EQ((*vm)->thread(VcpuIndex(i)).state(), vcpu::VcpuThread::State::kStopped);
  }
}

TEST_P(ProbeVmTest, UnknownPortEndsVm) {
  AGGVM_REQUIRE_KVM();
  ExpectVmError(guest::AGGVM_WORKLOAD_BAD_PORT, GetParam(), absl::StatusCode::kInvalidArgument,
                {"unknown port", "0x1234"});
}

TEST_P(ProbeVmTest, UnmappedMemoryEndsVm) {
  AGGVM_REQUIRE_KVM();
  ExpectVmError(guest::AGGVM_WORKLOAD_UNMAPPED, GetParam(), absl::StatusCode::kInvalidArgument,
                {"unmapped", "0xc0000000"});
}

TEST_P(ProbeVmTest, TripleFaultEndsVm) {
  AGGVM_REQUIRE_KVM();
  ExpectVmError(guest::AGGVM_WORKLOAD_TRIPLE_FAULT, GetParam(), absl::StatusCode::kAborted, {"triple fault"});
}

INSTANTIATE_TEST_SUITE_P(Irqchip, ProbeVmTest, AllApicSetups(), ApicSetupName);

TEST(ProbeVm, BadGuestImageIsRefused) {
  AGGVM_REQUIRE_KVM();
  const std::string path = ::testing::TempDir() + "/not-an-elf";
  {
    std::ofstream f(path, std::ios::binary);
    f << "#!/bin/sh\necho this is not an ELF\n" << std::string(200, '#') << "\n";  // longer than an ELF header
  }
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_HELLO, 1);
  config.guest_elf = path;
  auto vm = ProbeVm::Create(config);
  ASSERT_FALSE(vm.ok());
  EXPECT_EQ(vm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(vm.status().message().find("bad magic"), absl::string_view::npos) << vm.status();
  std::remove(path.c_str());

  config.guest_elf = ::testing::TempDir() + "/does-not-exist.elf";
  vm = ProbeVm::Create(config);
  ASSERT_FALSE(vm.ok());
  EXPECT_EQ(vm.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace aggvm::testing
