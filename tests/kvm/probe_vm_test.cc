// The probe guest boots in long mode on N vCPUs, and a misbehaving guest ends its VM with a clear error.
#include <cstdio>
#include <fstream>
#include <string>

#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;

void RunHello(uint32_t vcpus, bool x2apic) {
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_HELLO, vcpus);
  config.x2apic = x2apic;
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
}

TEST(ProbeVm, HelloOneVcpu) {
  AGGVM_REQUIRE_KVM();
  RunHello(1, true);
}

TEST(ProbeVm, HelloFourVcpusX2apic) {
  AGGVM_REQUIRE_KVM();
  RunHello(4, true);
}

TEST(ProbeVm, HelloFourVcpusXapic) {
  AGGVM_REQUIRE_KVM();
  RunHello(4, false);
}

void ExpectVmError(guest::aggvm_workload workload, absl::StatusCode code, std::vector<std::string> needles) {
  auto vm = ProbeVm::Create(ProbeConfig(workload, 2));
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

TEST(ProbeVm, UnknownPortEndsVm) {
  AGGVM_REQUIRE_KVM();
  ExpectVmError(guest::AGGVM_WORKLOAD_BAD_PORT, absl::StatusCode::kInvalidArgument, {"unknown port", "0x1234"});
}

TEST(ProbeVm, UnmappedMemoryEndsVm) {
  AGGVM_REQUIRE_KVM();
  ExpectVmError(guest::AGGVM_WORKLOAD_UNMAPPED, absl::StatusCode::kInvalidArgument, {"unmapped", "0xc0000000"});
}

TEST(ProbeVm, TripleFaultEndsVm) {
  AGGVM_REQUIRE_KVM();
  ExpectVmError(guest::AGGVM_WORKLOAD_TRIPLE_FAULT, absl::StatusCode::kAborted, {"triple fault"});
}

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
