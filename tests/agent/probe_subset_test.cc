// ProbeVm running a SUBSET of a VM's vCPUs, as a node of a distributed VM does: the VM has 4 vCPUs (BootInfo lists all
// four APIC IDs), this "node" creates and runs only vCPUs 2 and 3 (KVM vCPU id = APIC ID). The guest's own HELLO
// records prove which vCPUs ran and which APIC IDs their LAPICs report; in user mode the router knows only the local
// APICs. The console goes through a 16550 UART (AGGVM_BOOT_UART_CONSOLE) whose ports the runner forwards to a small
// UART model here, as the agent forwards them to the master's.
#include <gtest/gtest.h>

#include <map>
#include <mutex>
#include <string>

#include "node-agent/probe_vm.h"
#include "tests/support/require.h"
#include "vcpu/msi.h"

namespace aggvm::testing {
namespace {

using agent::ForwardedAccess;
using agent::ProbeVm;
using agent::ProbeVmConfig;

size_t Count(const agent::VcpuReport& r, guest::aggvm_record_type type) {
  size_t n = 0;
  for (const auto& rec : r.records) n += rec.type == type;
  return n;
}

// THR writes per vCPU, LSR reads answered "transmitter empty" (0x60), as master/devices/console_uart.h does.
struct UartModel {
  std::mutex mu;
  std::map<uint32_t, std::string> text;  // per vCPU, everything written to THR
  uint64_t lsr_reads = 0;
  uint64_t other = 0;

  absl::StatusOr<uint64_t> Access(VcpuIndex v, const ForwardedAccess& a) {
    std::lock_guard l(mu);
    if (!a.mmio && a.size == 1 && a.address == 0x3F8 && a.is_write) {
      text[v.value()].push_back(static_cast<char>(a.data));
      return 0;
    }
    if (!a.mmio && a.size == 1 && a.address == 0x3FD && !a.is_write) {
      ++lsr_reads;
      return 0x60;
    }
    ++other;
    return 0xFF;
  }
};

class ProbeSubsetTest : public ::testing::TestWithParam<vcpu::IrqchipMode> {};

TEST_P(ProbeSubsetTest, HelloRunsOnExactlyTheLocalVcpus) {
  AGGVM_REQUIRE_KVM();
  UartModel uart;
  ProbeVmConfig c;
  c.guest_elf = AGGVM_PROBE_GUEST_ELF;
  c.num_vcpus = 4;
  c.local_vcpus = {VcpuIndex(2), VcpuIndex(3)};
  c.workload = guest::AGGVM_WORKLOAD_HELLO;
  c.irqchip = GetParam();
  c.uart_console = true;
  c.forwarded_ports = {{0x3F8, 0x3FF}};
  c.forward_io = [&](VcpuIndex v, const ForwardedAccess& a) { return uart.Access(v, a); };
  auto vm = ProbeVm::Create(std::move(c));
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ((*vm)->num_vcpus(), 4u);
  ASSERT_EQ((*vm)->local_vcpus().size(), 2u);
  EXPECT_FALSE((*vm)->is_local(VcpuIndex(0)));
  EXPECT_TRUE((*vm)->is_local(VcpuIndex(3)));
  ASSERT_TRUE((*vm)->Start().ok());
  const absl::Status done = (*vm)->WaitDone(absl::Seconds(60));
  ASSERT_TRUE(done.ok()) << done;

  for (uint32_t i = 0; i < 4; ++i) {
    const auto r = (*vm)->report(VcpuIndex(i));
    if (i < 2) {
      EXPECT_TRUE(r.records.empty()) << "vCPU " << i << " runs on another node";
      EXPECT_FALSE(r.done_status.has_value());
      continue;
    }
    ASSERT_EQ(Count(r, guest::AGGVM_REC_HELLO), 1u) << "vCPU " << i;
    for (const auto& rec : r.records) {
      if (rec.type == guest::AGGVM_REC_HELLO) {
        EXPECT_EQ(rec.a, i) << "APIC ID the guest read from its LAPIC";
      }
    }
    EXPECT_EQ(r.done_status, 0u);
    EXPECT_TRUE(r.console_lines.empty()) << "console goes to the UART, not the paravirtual port";
  }
  {
    std::lock_guard l(uart.mu);
    EXPECT_EQ(uart.text[2], "hello from vcpu 2 apic 2\n");
    EXPECT_EQ(uart.text[3], "hello from vcpu 3 apic 3\n");
    EXPECT_EQ(uart.text.count(0), 0u);
    EXPECT_GE(uart.lsr_reads, uart.text[2].size() + uart.text[3].size()) << "the guest polls LSR before each THR write";
    EXPECT_EQ(uart.other, 0u);
  }
  EXPECT_GE((*vm)->forwarded_accesses(), 2 * (uart.text[2].size() + uart.text[3].size()));
  // A remote vCPU's thread does not exist here.
  EXPECT_THROW((void)(*vm)->thread(VcpuIndex(0)), std::out_of_range);
  EXPECT_FALSE((*vm)->WaitForRecords(VcpuIndex(1), guest::AGGVM_REC_HELLO, 1, absl::Milliseconds(1)).ok());
  (*vm)->Stop();
}

TEST_P(ProbeSubsetTest, InterruptsReachOnlyLocalApics) {
  AGGVM_REQUIRE_KVM();
  ProbeVmConfig c;
  c.guest_elf = AGGVM_PROBE_GUEST_ELF;
  c.num_vcpus = 4;
  c.local_vcpus = {VcpuIndex(1), VcpuIndex(3)};
  c.workload = guest::AGGVM_WORKLOAD_IRQ_SINK;
  c.irqchip = GetParam();
  auto vm = ProbeVm::Create(std::move(c));
  ASSERT_TRUE(vm.ok()) << vm.status();
  ASSERT_TRUE((*vm)->Start().ok());
  for (uint32_t i : {1u, 3u}) {
    const absl::Status s = (*vm)->WaitForRecords(VcpuIndex(i), guest::AGGVM_REC_HELLO, 1, absl::Seconds(30));
    ASSERT_TRUE(s.ok()) << s;
  }
  // To a local APIC: handled there.
  ASSERT_TRUE((*vm)->injector().InjectMsi(vcpu::FixedMsi(ApicId(3), Vector(0x51))).ok());
  ASSERT_TRUE((*vm)->WaitForRecords(VcpuIndex(3), guest::AGGVM_REC_IRQ, 1, absl::Seconds(10)).ok());
  // To APIC 2, which this node does not run: nobody takes it. User mode says so (UNAVAILABLE); KVM drops it silently.
  const absl::Status remote = (*vm)->injector().InjectMsi(vcpu::FixedMsi(ApicId(2), Vector(0x52)));
  if (GetParam() == vcpu::IrqchipMode::kUser) {
    EXPECT_EQ(remote.code(), absl::StatusCode::kUnavailable) << remote;
  }
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(Count((*vm)->report(VcpuIndex(1)), guest::AGGVM_REC_IRQ), 0u);
  EXPECT_EQ(Count((*vm)->report(VcpuIndex(3)), guest::AGGVM_REC_IRQ), 1u);
  EXPECT_TRUE((*vm)->error().ok()) << (*vm)->error();
  (*vm)->Stop();
}

TEST(ProbeSubsetConfig, RefusesBadLocalVcpus) {
  ProbeVmConfig c;
  c.guest_elf = AGGVM_PROBE_GUEST_ELF;
  c.num_vcpus = 2;
  c.local_vcpus = {VcpuIndex(1), VcpuIndex(2)};
  auto vm = ProbeVm::Create(c);
  ASSERT_FALSE(vm.ok());
  EXPECT_NE(vm.status().message().find("local_vcpus[1] = 2"), std::string::npos) << vm.status();
  c.local_vcpus = {VcpuIndex(1), VcpuIndex(1)};
  EXPECT_EQ(ProbeVm::Create(c).status().code(), absl::StatusCode::kInvalidArgument);
  c.local_vcpus = {VcpuIndex(0)};
  c.forwarded_ports = {{0x3F8, 0x3FF}};
  EXPECT_EQ(ProbeVm::Create(c).status().code(), absl::StatusCode::kInvalidArgument) << "windows without forward_io";
}

std::string ModeName(const ::testing::TestParamInfo<vcpu::IrqchipMode>& p) { return vcpu::IrqchipModeName(p.param); }
INSTANTIATE_TEST_SUITE_P(Irqchip, ProbeSubsetTest,
                         ::testing::Values(vcpu::IrqchipMode::kKernel, vcpu::IrqchipMode::kUser), ModeName);

}  // namespace
}  // namespace aggvm::testing
