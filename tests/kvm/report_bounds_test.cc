// A guest cannot make the VMM hold unbounded memory: each vCPU's report keeps at most max_records_per_vcpu records and
// max_eois_per_vcpu level-triggered EOIs (allocated once); the rest is counted as dropped, and the VM runs on.
#include <unistd.h>

#include <fstream>
#include <optional>

#include "tests/kvm/probe_test_util.h"
#include "tests/support/require.h"
#include "vcpu/event_fd.h"
#include "vcpu/msi.h"
#include "vcpu/vm.h"

namespace aggvm::testing {
namespace {

using agent::ProbeVm;
using namespace std::chrono_literals;

/// Resident set size of this process, in bytes (/proc/self/statm, field 2, in pages).
uint64_t ResidentBytes() {
  std::ifstream f("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

class ReportBoundsTest : public ::testing::TestWithParam<ApicSetup> {};

TEST_P(ReportBoundsTest, RecordsBeyondCapacityAreCountedAsDropped) {
  AGGVM_REQUIRE_KVM();
  constexpr uint32_t kVcpus = 2;
  constexpr uint32_t kIterations = 700;
  constexpr size_t kCapacity = 100;
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_EXIT_LOOP, kVcpus, GetParam());
  config.iterations = kIterations;
  config.max_records_per_vcpu = kCapacity;
  uint64_t seen = 0;  // on_record sees every record, kept or not (vCPU 0's thread only)
  config.on_record = [&seen](VcpuIndex v, const agent::Record&) {
    if (v.value() == 0) ++seen;
  };
  auto vm = ProbeVm::Create(config);
  ASSERT_TRUE(vm.ok()) << vm.status();
  ASSERT_TRUE((*vm)->Start().ok());
  ASSERT_TRUE((*vm)->WaitDone(absl::Seconds(120)).ok()) << (*vm)->error();
  // WaitForRecords counts dropped records too: it does not wait forever once the store is full.
  EXPECT_TRUE((*vm)->WaitForRecords(VcpuIndex(1), guest::AGGVM_REC_EXIT_ROUND, kIterations, absl::Seconds(1)).ok());
  EXPECT_FALSE(
      (*vm)->WaitForRecords(VcpuIndex(1), guest::AGGVM_REC_EXIT_ROUND, kIterations + 1, absl::Milliseconds(10)).ok());
  (*vm)->Stop();
  EXPECT_TRUE((*vm)->error().ok()) << (*vm)->error();
  EXPECT_EQ(seen, kIterations);
  for (uint32_t i = 0; i < kVcpus; ++i) {
    const auto r = (*vm)->report(VcpuIndex(i));
    ASSERT_EQ(r.records.size(), kCapacity) << "vCPU " << i;
    EXPECT_EQ(r.dropped_records, kIterations - kCapacity) << "vCPU " << i;
    for (size_t k = 0; k < r.records.size(); ++k) {
      EXPECT_EQ(r.records[k].type, guest::AGGVM_REC_EXIT_ROUND);
      EXPECT_EQ(r.records[k].a, k) << "the first records are kept, in order";
    }
    EXPECT_EQ(r.nop_exits, kIterations) << "vCPU " << i;
    EXPECT_EQ(r.done_status, 0u);
    EXPECT_EQ(r.dropped_eois, 0u);
  }
  EXPECT_EQ((*vm)->dropped_records(), uint64_t{kVcpus} * (kIterations - kCapacity));
}

TEST_P(ReportBoundsTest, EoisBeyondCapacityAreCountedAsDropped) {
  AGGVM_REQUIRE_KVM();
  const bool user = GetParam().irqchip == vcpu::IrqchipMode::kUser;
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_IRQ_SINK, 1, GetParam());
  config.max_eois_per_vcpu = 1;
  uint64_t seen = 0;
  config.on_ioapic_eoi = [&seen](VcpuIndex, Vector) { ++seen; };
  auto created = ProbeVm::Create(config);
  ASSERT_TRUE(created.ok()) << created.status();
  ProbeVm& vm = **created;
  const ApicId dest = vm.apic_id(VcpuIndex(0));
  const vcpu::MsiMessage level_msi = vcpu::FixedMsi(dest, Vector(0x70), vcpu::MsiTrigger::kLevel);
  // Kernel irqchip: KVM reports the EOI of a level vector only for one routed below the split IOAPIC's pins.
  std::optional<vcpu::EventFd> event;
  std::optional<vcpu::IrqFd> irqfd;
  if (!user) {
    const vcpu::GsiRoute route{Gsi(3), level_msi};
    ASSERT_TRUE(vm.vm().SetGsiRouting({&route, 1}).ok());
    auto e = vcpu::EventFd::Create();
    ASSERT_TRUE(e.ok());
    event.emplace(*std::move(e));
    auto f = vcpu::IrqFd::Attach(vm.vm(), *event, Gsi(3));
    ASSERT_TRUE(f.ok()) << f.status();
    irqfd.emplace(*std::move(f));
  }
  ASSERT_TRUE(vm.Start().ok());
  ASSERT_TRUE(vm.WaitForRecords(VcpuIndex(0), guest::AGGVM_REC_HELLO, 1, absl::Seconds(30)).ok()) << vm.error();
  constexpr size_t kShots = 3;
  for (size_t k = 1; k <= kShots; ++k) {
    if (user) {
      ASSERT_TRUE(vm.injector().InjectMsi(level_msi).ok());
    } else {
      ASSERT_TRUE(event->Signal().ok());
    }
    ASSERT_TRUE(vm.WaitForRecords(VcpuIndex(0), guest::AGGVM_REC_IRQ, k, absl::Seconds(10)).ok()) << "shot " << k;
    ASSERT_TRUE(WaitUntil([&] {
      const auto r = vm.report(VcpuIndex(0));
      return r.ioapic_eois.size() + r.dropped_eois == k;
    }, 10s)) << "EOI of shot " << k;
  }
  vm.Stop();
  const auto r = vm.report(VcpuIndex(0));
  ASSERT_EQ(r.ioapic_eois.size(), 1u);
  EXPECT_EQ(r.ioapic_eois[0], Vector(0x70));
  EXPECT_EQ(r.dropped_eois, kShots - 1);
  EXPECT_EQ(vm.dropped_eois(), kShots - 1);
  EXPECT_EQ(seen, kShots) << "on_ioapic_eoi sees every EOI";
  EXPECT_TRUE(vm.error().ok()) << vm.error();
}

INSTANTIATE_TEST_SUITE_P(Irqchip, ReportBoundsTest,
                         ::testing::Values(ApicSetup{vcpu::IrqchipMode::kKernel, true},
                                           ApicSetup{vcpu::IrqchipMode::kUser, true}),
                         ApicSetupName);

// Many more records than the store holds: the process does not grow with them (the old unbounded vector would have
// grown by 32 B per record, ~3 MiB here).
TEST(ReportBounds, MemoryStaysBoundedUnderARecordFlood) {
  AGGVM_REQUIRE_KVM();
  constexpr uint32_t kIterations = 100000;
  constexpr size_t kCapacity = 16;
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_EXIT_LOOP, 1);
  config.iterations = kIterations;
  config.max_records_per_vcpu = kCapacity;
  auto vm = ProbeVm::Create(config);
  ASSERT_TRUE(vm.ok()) << vm.status();
  ASSERT_TRUE((*vm)->Start().ok());
  // Past start-up (thread stacks, first exits) before the baseline.
  ASSERT_TRUE((*vm)->WaitForRecords(VcpuIndex(0), guest::AGGVM_REC_EXIT_ROUND, 1000, absl::Seconds(60)).ok())
      << (*vm)->error();
  const uint64_t before = ResidentBytes();
  ASSERT_TRUE((*vm)->WaitDone(absl::Seconds(300)).ok()) << (*vm)->error();
  const uint64_t after = ResidentBytes();
  (*vm)->Stop();
  const auto r = (*vm)->report(VcpuIndex(0));
  EXPECT_EQ(r.records.size(), kCapacity);
  EXPECT_EQ(r.dropped_records, kIterations - kCapacity);
  EXPECT_LT(after, before + (1u << 20)) << "resident set grew from " << before << " to " << after << " bytes";
}

TEST(ReportBounds, OversizedCapacityIsRefused) {
  auto config = ProbeConfig(guest::AGGVM_WORKLOAD_HELLO, 1);
  config.max_records_per_vcpu = agent::kMaxReportCapacity + 1;
  auto vm = ProbeVm::Create(config);
  ASSERT_FALSE(vm.ok());
  EXPECT_EQ(vm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(vm.status().message().find("max_records_per_vcpu"), absl::string_view::npos) << vm.status();
  config.max_records_per_vcpu = 16;
  config.max_eois_per_vcpu = agent::kMaxReportCapacity + 1;
  EXPECT_EQ(ProbeVm::Create(config).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace aggvm::testing
