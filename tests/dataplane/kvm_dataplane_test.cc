// The device-interrupt data path ending in a real guest: a master GlobalController and two nodes (LocalController
// over TcpTransport) in one process, each node running the probe guest (irq-sink) on the real /dev/kvm with ALL the
// VM's vCPUs (ProbeVm cannot run a subset) but injecting only into the vCPUs it owns (vCPU 0 on node A, vCPU 1 on
// node B), through InjectorVmPort (KVM_SIGNAL_MSI). A doorbell rung for node A is raised on A, routed by the master
// and handled by the guest's vCPU 1 on node B — proven by B's guest IRQ record. A level-triggered one comes back as
// KVM_EXIT_IOAPIC_EOI on B, travels to the master as kEoi, and is re-delivered while A holds it asserted.
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cstdio>

#include "node-agent/injector_vm_port.h"
#include "node-agent/probe_vm.h"
#include "tests/dataplane/cluster.h"
#include "tests/support/require.h"
#include "vcpu/msi.h"
#include "vcpu/vm.h"

namespace aggvm::testing {
namespace {

using irqchip::DeliveryMode;
using irqchip::DestMode;
using irqchip::TriggerMode;
using master::RedirectionEntry;

constexpr NodeId kA{1}, kB{2};
constexpr uint32_t kEdgeGsi = 4, kLevelGsi = 5;
constexpr uint8_t kEdgeVector = 0x44, kLevelVector = 0x55;

size_t IrqCount(agent::ProbeVm& vm, uint32_t vcpu, uint8_t vector) {
  size_t n = 0;
  for (const auto& r : vm.report(VcpuIndex(vcpu)).records) n += r.type == guest::AGGVM_REC_IRQ && r.a == vector;
  return n;
}
size_t AllIrqs(agent::ProbeVm& vm, uint32_t vcpu) {
  size_t n = 0;
  for (const auto& r : vm.report(VcpuIndex(vcpu)).records) n += r.type == guest::AGGVM_REC_IRQ;
  return n;
}

struct NodeVm {
  std::unique_ptr<agent::ProbeVm> vm;
  std::unique_ptr<agent::InjectorVmPort> port;
  std::atomic<agent::LocalController*> lc{nullptr};  // set once the cluster exists (EOIs before are not ours)
};

TEST(DataplaneKvm, DoorbellOnNodeAReachesTheGuestHandlerOnNodeB) {
  AGGVM_REQUIRE_KVM();
  std::array<NodeVm, 2> nodes;
  for (auto& n : nodes) {
    agent::ProbeVmConfig c;
    c.guest_elf = AGGVM_PROBE_GUEST_ELF;
    c.num_vcpus = 2;
    c.workload = guest::AGGVM_WORKLOAD_IRQ_SINK;
    c.x2apic = true;
    c.irqchip = vcpu::IrqchipMode::kKernel;
    NodeVm* np = &n;
    c.on_ioapic_eoi = [np](VcpuIndex v, Vector vec) {
      if (agent::LocalController* lc = np->lc.load(std::memory_order_acquire)) lc->OnGuestEoi(v, vec);
    };
    auto vm = agent::ProbeVm::Create(std::move(c));
    ASSERT_TRUE(vm.ok()) << vm.status();
    n.vm = *std::move(vm);
    n.port = std::make_unique<agent::InjectorVmPort>(&n.vm->injector(),
                                                     std::vector<ApicId>{n.vm->apic_id(VcpuIndex(0)),
                                                                         n.vm->apic_id(VcpuIndex(1))});
    ASSERT_TRUE(n.vm->Start().ok());
  }
  // KVM reports the EOI of a level vector only for vectors of level routes (see injector_vm_port.h): node B, whose
  // vCPU 1 handles the level pin, installs one, as the agent does for each level pin routed to its vCPUs.
  const vcpu::GsiRoute level_route{Gsi(kLevelGsi), vcpu::FixedMsi(nodes[1].vm->apic_id(VcpuIndex(1)),
                                                                  Vector(kLevelVector), vcpu::MsiTrigger::kLevel)};
  ASSERT_TRUE(nodes[1].vm->vm().SetGsiRouting({&level_route, 1}).ok());
  for (auto& n : nodes) {
    for (uint32_t v = 0; v < 2; ++v) {
      // HELLO = IDT loaded and LAPIC enabled: an interrupt before it would be lost.
      const absl::Status s = n.vm->WaitForRecords(VcpuIndex(v), guest::AGGVM_REC_HELLO, 1, absl::Seconds(30));
      ASSERT_TRUE(s.ok()) << s;
    }
  }

  auto cluster = DataplaneCluster::Make(
      2, 1, [&](uint32_t i) { return nodes[i].port.get(); }, [](master::GlobalControllerConfig& c) {
        c.pins = {{kEdgeGsi, RedirectionEntry(Vector(kEdgeVector), DeliveryMode::kFixed, DestMode::kPhysical,
                                              TriggerMode::kEdge, 1)},
                  {kLevelGsi, RedirectionEntry(Vector(kLevelVector), DeliveryMode::kFixed, DestMode::kPhysical,
                                               TriggerMode::kLevel, 1)}};
      });
  ASSERT_TRUE(cluster);
  for (uint32_t i = 0; i < 2; ++i) nodes[i].lc.store(cluster->node(i).lc.get(), std::memory_order_release);

  // Edge, traced: raised on A, handled by the guest's vCPU 1 on B.
  ASSERT_TRUE(cluster->master().Ring(kA, Gsi(kEdgeGsi), TriggerMode::kEdge, true, /*traced=*/true).ok());
  agent::ProbeVm& vm_a = *nodes[0].vm;
  agent::ProbeVm& vm_b = *nodes[1].vm;
  ASSERT_TRUE(WaitUntil([&] { return IrqCount(vm_b, 1, kEdgeVector) == 1; }, absl::Seconds(10)))
      << "the guest on node B never handled the doorbell interrupt";
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(IrqCount(vm_b, 1, kEdgeVector), 1u);
  EXPECT_EQ(AllIrqs(vm_b, 0), 0u) << "vCPU 0 runs on node A: B must not inject into it";
  EXPECT_EQ(AllIrqs(vm_a, 0), 0u);
  EXPECT_EQ(AllIrqs(vm_a, 1), 0u) << "node A's copy of vCPU 1 is not the real one";
  EXPECT_EQ(cluster->node(0).lc->counters().control_raises, 1u);
  EXPECT_EQ(cluster->node(1).lc->counters().delivered, 1u);
  // The trace of that interrupt, hop by hop (one host: every hop's clock is the same CLOCK_MONOTONIC).
  const auto traces = cluster->traces();
  ASSERT_EQ(traces.size(), 1u);
  const transport::TraceBlock& t = traces[0];
  EXPECT_LT(t.raised, t.local_controller);
  EXPECT_LE(t.local_controller, t.master_received);
  EXPECT_LE(t.master_received, t.master_decided);
  EXPECT_LE(t.master_decided, t.target_received);
  EXPECT_LE(t.target_received, t.injected);
  const auto us = [&](uint64_t ts) { return static_cast<double>(ts - t.raised) / 1000.0; };
  std::printf("doorbell trace (us from raise on A): local_controller %.1f, master_received %.1f, "
              "master_decided %.1f, target_received %.1f, injected %.1f\n",
              us(t.local_controller), us(t.master_received), us(t.master_decided), us(t.target_received),
              us(t.injected));

  // Level: A asserts and holds; B's guest handles it, EOIs (KVM_EXIT_IOAPIC_EOI -> kEoi), the master re-delivers
  // while the pin is asserted. After A deasserts, deliveries stop.
  ASSERT_TRUE(cluster->master().Ring(kA, Gsi(kLevelGsi), TriggerMode::kLevel, true).ok());
  ASSERT_TRUE(WaitUntil([&] { return IrqCount(vm_b, 1, kLevelVector) >= 3; }, absl::Seconds(10)))
      << "level interrupt handled " << IrqCount(vm_b, 1, kLevelVector) << " times; EOIs sent by B: "
      << cluster->node(1).lc->counters().eois_sent;
  ASSERT_TRUE(cluster->master().Ring(kA, Gsi(kLevelGsi), TriggerMode::kLevel, false).ok());
  // Settled = the master has seen A's deassert and the EOI of the last delivery (remote IRR clear); the guest
  // records an IRQ before it EOIs, so the count is then final.
  ASSERT_TRUE(WaitUntil([&] {
    auto table = cluster->master().GetRoutingTable();
    return table.ok() && !table->pins[kLevelGsi].input && !table->pins[kLevelGsi].remote_irr;
  }));
  const size_t settled = IrqCount(vm_b, 1, kLevelVector);
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(IrqCount(vm_b, 1, kLevelVector), settled) << "re-delivered after the deassert";
  const auto mc = cluster->master().counters();
  EXPECT_EQ(mc.level_delivered, settled);
  EXPECT_GE(mc.eois, 3u);
  EXPECT_EQ(AllIrqs(vm_b, 0), 0u);
  EXPECT_EQ(AllIrqs(vm_a, 0), 0u);

  for (auto& n : nodes) {
    n.lc.store(nullptr, std::memory_order_release);
    EXPECT_TRUE(n.vm->error().ok()) << n.vm->error();
  }
  cluster.reset();
  for (auto& n : nodes) n.vm->Stop();
}

}  // namespace
}  // namespace aggvm::testing
