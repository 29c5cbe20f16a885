// The distributed VM end to end: aggvm-master and three aggvm-agents as separate processes, each in its own network
// namespace (veth + bridge), the probe guest of 3 nodes x 2 vCPUs across them over TCP. The test process drives the
// master over gRPC from inside the master's namespace and checks everything from what the guest itself reported:
// console lines through the master's UART, IRQ records (vector, rdtsc, sequence) of the vCPU that handled each
// interrupt. Needs root (namespaces) and /dev/kvm.
#include <signal.h>

#include <memory>
#include <set>
#include <vector>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "irqchip/destination.h"
#include "irqchip/router.h"
#include "proto/aggvm.grpc.pb.h"
#include "tests/cluster/shared_cluster.h"
#include "tests/support/cluster_launcher.h"
#include "tests/support/require.h"

namespace aggvm::testing {
namespace {

namespace v1 = ::aggvm::v1;
using ::testing::HasSubstr;

constexpr uint32_t kIrqRecord = 2;    // guest/abi.h AGGVM_REC_IRQ
constexpr uint32_t kHelloRecord = 1;  // AGGVM_REC_HELLO
constexpr uint32_t kEdgeGsi = 4, kLevelGsi = 5;
constexpr uint32_t kEdgeVector = 0x44, kLevelVector = 0x55;
const char* const kNodes[] = {"node-a", "node-b", "node-c"};

// The processes: master in namespace 0, node-a..c in 1..3 (tests/cluster/shared_cluster.h).
ClusterOptions Options() {
  ClusterOptions o;
  o.tag = "e2e";
  o.master_bin = AGGVM_MASTER_BIN;
  o.agent_bin = AGGVM_AGENT_BIN;
  o.heartbeat_ms = 100;
  return o;
}

using Watch = VmWatch;

v1::VmSpec Spec(const std::string& name, const std::string& workload, v1::IrqchipMode irqchip) {
  v1::VmSpec spec = ClusterSpec(name, workload, irqchip);
  auto* edge = spec.add_interrupt_routes();  // lowest priority to all six: the policy picks one
  edge->set_gsi(kEdgeGsi);
  edge->set_vector(kEdgeVector);
  edge->set_delivery(v1::INTERRUPT_DELIVERY_LOWEST_PRIORITY);
  edge->set_dest_mode(v1::DESTINATION_MODE_LOGICAL);
  edge->set_destination(0x3F);
  auto* level = spec.add_interrupt_routes();  // fixed to vCPU 3 on node-b, level-triggered
  level->set_gsi(kLevelGsi);
  level->set_vector(kLevelVector);
  level->set_destination(3);
  level->set_trigger(v1::INTERRUPT_TRIGGER_LEVEL);
  return spec;
}

grpc::Status CreateVm(ClusterLauncher& c, const v1::VmSpec& spec) { return testing::CreateVm(c.stub(), spec); }
grpc::Status Lifecycle(ClusterLauncher& c, const std::string& verb, const std::string& vm) {
  return testing::Lifecycle(c.stub(), verb, vm);
}
grpc::Status Ring(ClusterLauncher& c, const std::string& vm, const std::string& node, uint32_t gsi, bool level = false,
                  bool asserted = true) {
  return testing::Ring(c.stub(), vm, node, gsi, level, asserted);
}
absl::StatusOr<v1::RoutingTable> Table(ClusterLauncher& c, const std::string& vm) {
  return testing::Table(c.stub(), vm);
}

#define CLUSTER_OR_SKIP() AGGVM_SHARED_CLUSTER_OR_SKIP(Options())

TEST(ClusterE2e, EveryVcpuOnEveryNodeSaysHelloOnTheOneConsole) {
  CLUSTER_OR_SKIP();
  ASSERT_TRUE(CreateVm(*cluster, Spec("hello", "hello", v1::IRQCHIP_MODE_KERNEL)).ok());
  Watch w(cluster->stub(), "hello");
  auto st = Lifecycle(*cluster, "start", "hello");
  ASSERT_TRUE(st.ok()) << st.error_message();
  auto lines = [&] {
    std::set<std::pair<uint32_t, std::string>> seen;  // (vCPU, node) of console lines through the master's UART
    for (const auto& e : w.events()) {
      if (e.has_console() && e.console().text().find("hello") != std::string::npos) {
        seen.emplace(e.console().vcpu(), e.console().node());
      }
    }
    return seen;
  };
  EXPECT_TRUE(w.WaitFor([&] { return lines().size() == 6; }, absl::Seconds(60)));
  for (uint32_t v = 0; v < 6; ++v) EXPECT_TRUE(lines().contains({v, kNodes[v / 2]})) << "vCPU " << v;
  EXPECT_TRUE(Lifecycle(*cluster, "stop", "hello").ok());
}

class DoorbellE2e : public ::testing::TestWithParam<v1::IrqchipMode> {};

// The reference: a fresh Router with the VM's topology (the master rebuilds its Router on every policy switch).
std::vector<uint32_t> Expected(irqchip::RoutingPolicy policy, int rings, std::optional<uint32_t> pinned) {
  std::vector<irqchip::VcpuInfo> vcpus;
  for (uint32_t v = 0; v < 6; ++v) {
    irqchip::VcpuInfo i;
    i.node = NodeId(static_cast<uint16_t>(1 + v / 2));
    i.apic.id = ApicId(v);
    i.apic.x2apic = true;
    i.apic.ldr = irqchip::X2apicLdrFromId(ApicId(v));
    vcpus.push_back(i);
  }
  auto r = irqchip::Router::Create(vcpus, irqchip::RouterConfig{.policy = policy});
  EXPECT_TRUE(r.ok());
  if (pinned) {
    EXPECT_TRUE(r->PinVector(Vector(kEdgeVector), VcpuIndex(*pinned)).ok());
  }
  irqchip::InterruptRequest req;
  req.source_node = NodeId(1);
  req.gsi = Gsi(kEdgeGsi);
  req.message.vector = Vector(kEdgeVector);
  req.message.mode = irqchip::DeliveryMode::kLowestPriority;
  req.message.dest_mode = irqchip::DestMode::kLogical;
  req.message.destination = 0x3F;
  std::vector<uint32_t> out;
  std::array<irqchip::Delivery, 8> d;
  for (int k = 0; k < rings; ++k) {
    auto res = r->Route(req, d);
    EXPECT_EQ(res.count, 1u);
    out.push_back(d[0].vcpu.value());
  }
  return out;
}

TEST_P(DoorbellE2e, DoorbellsOnNodeAReachTheVcpuThePolicyChoseAndLevelWaitsForTheEoi) {
  CLUSTER_OR_SKIP();
  const std::string vm = GetParam() == v1::IRQCHIP_MODE_USER ? "bell-user" : "bell-kernel";
  ASSERT_TRUE(CreateVm(*cluster, Spec(vm, "irq-sink", GetParam())).ok());
  Watch w(cluster->stub(), vm);
  auto st = Lifecycle(*cluster, "start", vm);
  ASSERT_TRUE(st.ok()) << st.error_message();
  // irq-sink says HELLO once its IDT and LAPIC are up: an interrupt before would be lost.
  ASSERT_TRUE(w.WaitFor([&] { return w.records(kHelloRecord).size() == 6; }, absl::Seconds(60)));

  // Edge doorbells raised on node-a, one at a time; the receiving vCPU comes from the guest's IRQ record.
  const int kRings = 6;
  struct Case {
    v1::RoutingPolicy policy;
    irqchip::RoutingPolicy model;
    std::optional<uint32_t> pin;
  };
  for (const Case& k : {Case{v1::ROUTING_POLICY_SDM, irqchip::RoutingPolicy::kSdm, std::nullopt},
                        Case{v1::ROUTING_POLICY_ROUND_ROBIN, irqchip::RoutingPolicy::kRoundRobin, std::nullopt},
                        Case{v1::ROUTING_POLICY_NODE_LOCAL_FIRST, irqchip::RoutingPolicy::kNodeLocalFirst, std::nullopt},
                        Case{v1::ROUTING_POLICY_STATIC, irqchip::RoutingPolicy::kStatic, 5u}}) {
    SCOPED_TRACE(v1::RoutingPolicy_Name(k.policy));
    v1::SetRoutingPolicyRequest req;
    req.set_vm(vm);
    req.set_policy(k.policy);
    if (k.pin) {
      auto* r = req.add_static_routes();
      r->set_vector(kEdgeVector);
      r->set_vcpu(*k.pin);
    }
    v1::RoutingTable t;
    ASSERT_TRUE(Call([&](grpc::ClientContext& ctx) { return cluster->stub().SetRoutingPolicy(&ctx, req, &t); }).ok());
    std::vector<uint32_t> got;
    for (int i = 0; i < kRings; ++i) {
      const size_t before = w.records(kIrqRecord, kEdgeVector).size();
      ASSERT_TRUE(Ring(*cluster, vm, "node-a", kEdgeGsi).ok());
      ASSERT_TRUE(w.WaitFor([&] { return w.records(kIrqRecord, kEdgeVector).size() > before; }, absl::Seconds(10)))
          << "ring " << i << " never reached a guest handler";
      const auto rec = w.records(kIrqRecord, kEdgeVector)[before];
      EXPECT_EQ(rec.node(), kNodes[rec.vcpu() / 2]) << "reported by the node that runs the vCPU";
      got.push_back(rec.vcpu());
    }
    EXPECT_EQ(got, Expected(k.model, kRings, k.pin));
    if (k.policy == v1::ROUTING_POLICY_NODE_LOCAL_FIRST) {
      for (uint32_t v : got) EXPECT_LT(v, 2u) << "node-local-first keeps node-a's interrupt on node-a";
    }
    if (k.policy == v1::ROUTING_POLICY_STATIC) {
      for (uint32_t v : got) EXPECT_EQ(v, 5u);
    }
    if (k.policy == v1::ROUTING_POLICY_ROUND_ROBIN) {
      EXPECT_EQ(std::set<uint32_t>(got.begin(), got.end()).size(), 6u) << "every vCPU on every node in turn";
    }
  }
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(w.records(kIrqRecord, kEdgeVector).size(), 4u * kRings) << "exactly one handler per edge";

  // Level: held asserted on node-a, delivered to vCPU 3 on node-b; the master keeps remote IRR until node-b's kEoi
  // for the guest's EOI, so deliveries never run ahead of EOIs by more than one; re-delivered after each EOI.
  ASSERT_TRUE(Ring(*cluster, vm, "node-a", kLevelGsi, true, true).ok());
  uint64_t max_outstanding = 0;
  ASSERT_TRUE(w.WaitFor(
      [&] {
        auto t = Table(*cluster, vm);
        if (t.ok()) {
          const uint64_t d = t->counters().at("level_delivered"), e = t->counters().at("eois");
          max_outstanding = std::max(max_outstanding, d - std::min(d, e));
        }
        return w.records(kIrqRecord, kLevelVector).size() >= 3;
      },
      absl::Seconds(20)))
      << "a held level interrupt must be re-delivered after each EOI";
  EXPECT_LE(max_outstanding, 1u) << "re-delivered before the EOI came back";
  ASSERT_TRUE(Ring(*cluster, vm, "node-a", kLevelGsi, true, false).ok());
  // Settled: the master saw the deassert and the last EOI (remote IRR clear).
  ASSERT_TRUE(w.WaitFor(
      [&] {
        auto t = Table(*cluster, vm);
        if (!t.ok()) return false;
        for (const auto& e : t->entries()) {
          if (e.gsi() == kLevelGsi) return !e.input() && !e.remote_irr();
        }
        return false;
      },
      absl::Seconds(10)));
  absl::SleepFor(absl::Milliseconds(200));
  const auto level = w.records(kIrqRecord, kLevelVector);
  for (const auto& r : level) {
    EXPECT_EQ(r.vcpu(), 3u);
    EXPECT_EQ(r.node(), "node-b");
  }
  auto t = Table(*cluster, vm);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->counters().at("level_delivered"), level.size());
  EXPECT_EQ(t->counters().at("eois"), level.size());
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(w.records(kIrqRecord, kLevelVector).size(), level.size()) << "re-delivered after the deassert";
  std::printf("%s: %zu level deliveries while held; routing counters: routed %lu delivered %lu eois %lu\n",
              vm.c_str(), level.size(), static_cast<unsigned long>(t->counters().at("routed")),
              static_cast<unsigned long>(t->counters().at("delivered")),
              static_cast<unsigned long>(t->counters().at("eois")));
  EXPECT_TRUE(Lifecycle(*cluster, "stop", vm).ok());
}

INSTANTIATE_TEST_SUITE_P(Irqchip, DoorbellE2e, ::testing::Values(v1::IRQCHIP_MODE_KERNEL, v1::IRQCHIP_MODE_USER),
                         [](const auto& p) { return p.param == v1::IRQCHIP_MODE_USER ? "user" : "kernel"; });

TEST(ClusterE2e, BadSpecsAndDoorbellsAreRefusedWithAClearMessage) {
  CLUSTER_OR_SKIP();
  struct Bad {
    std::function<void(v1::VmSpec&)> change;
    std::string expect;
  };
  const std::vector<Bad> bad = {
      {[](v1::VmSpec& s) { s.mutable_placement(2)->set_node("node-x"); }, "placement[2].node: unknown node 'node-x'"},
      {[](v1::VmSpec& s) { s.mutable_placement(1)->set_vcpus(0, 0); }, "vCPU 0 is also placed on node 'node-a'"},
      {[](v1::VmSpec& s) { s.set_vcpus(0); }, "vcpus: 0 vCPUs"},
      {[](v1::VmSpec& s) { s.set_memory_mib(2); }, "memory_mib: 2 MiB is outside 4..3072 MiB"},
      {[](v1::VmSpec& s) { s.mutable_image()->set_path("/no/such/guest.elf"); }, "image.path: cannot use"},
      {[](v1::VmSpec& s) { s.mutable_interrupt_routes(0)->set_gsi(30); }, "interrupt_routes[0].gsi: 30 is not an IOAPIC pin"},
  };
  for (const auto& b : bad) {
    v1::VmSpec spec = Spec("bad", "irq-sink", v1::IRQCHIP_MODE_KERNEL);
    b.change(spec);
    auto st = CreateVm(*cluster, spec);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << b.expect;
    EXPECT_THAT(st.error_message(), HasSubstr(b.expect));
    if (st.ok()) {
      EXPECT_TRUE(Lifecycle(*cluster, "stop", "bad").ok());  // frees the nodes for the next tests
    }
  }
  // Memory too small for the image: a 4 MiB VM for an image loaded up to 5 MiB (the probe guest is smaller).
  // Covered with a synthetic ELF in master_unit_test (vm_spec_test.cc: "memory_mib: 32 MiB is too small").
  // A doorbell for a VM that is not running.
  ASSERT_TRUE(CreateVm(*cluster, Spec("idle", "irq-sink", v1::IRQCHIP_MODE_KERNEL)).ok());
  auto ring = Ring(*cluster, "idle", "node-a", kEdgeGsi);
  EXPECT_EQ(ring.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(ring.error_message(), HasSubstr("it is CREATED"));
  EXPECT_TRUE(Lifecycle(*cluster, "stop", "idle").ok());
}

TEST(ClusterE2e, ASecondAgentWithALiveNodesNameIsRefused) {
  CLUSTER_OR_SKIP();
  v1::RegisterNodeRequest req;
  req.set_node("node-b");
  req.set_control_address("10.0.0.99:7000");
  v1::RegisterNodeResponse resp;
  auto st = Call([&](grpc::ClientContext& ctx) { return cluster->stub().RegisterNode(&ctx, req, &resp); });
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_THAT(st.error_message(), HasSubstr("node-b"));
  EXPECT_EQ(cluster->UpNodes(), 3) << "the live node-b keeps its registration";
}

// Last: kills node-c's agent (and brings it back for reruns).
TEST(ClusterE2e, AnAgentThatDisappearsFailsItsVmWithAClearEvent) {
  CLUSTER_OR_SKIP();
  ASSERT_TRUE(CreateVm(*cluster, Spec("victim", "irq-sink", v1::IRQCHIP_MODE_KERNEL)).ok());
  Watch w(cluster->stub(), "victim");
  ASSERT_TRUE(Lifecycle(*cluster, "start", "victim").ok());
  ASSERT_TRUE(w.WaitFor([&] { return w.records(kHelloRecord).size() == 6; }, absl::Seconds(60)));
  const absl::Time killed = absl::Now();
  cluster->KillAgent(3, SIGKILL);
  std::string error;
  ASSERT_TRUE(w.WaitFor(
      [&] {
        for (const auto& e : w.events()) {
          if (e.has_vm_changed() && e.vm_changed().state() == v1::VM_STATE_FAILED) error = e.vm_changed().error();
        }
        return !error.empty();
      },
      absl::Seconds(10)))
      << "the master never reported the VM failed";
  std::printf("VM failed %.0f ms after node-c's agent was killed: %s\n",
              absl::ToDoubleMilliseconds(absl::Now() - killed), error.c_str());
  EXPECT_THAT(error, HasSubstr("node 'node-c'"));
  EXPECT_THAT(error, HasSubstr("lost"));
  auto ring = Ring(*cluster, "victim", "node-a", kEdgeGsi);
  EXPECT_EQ(ring.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // The heartbeat detector marks the node LOST too (~500 ms); only then can a new agent take the name again.
  EXPECT_TRUE(cluster->WaitUp(2, absl::Seconds(10))) << "node-c never marked LOST";
  ASSERT_TRUE(cluster->SpawnAgent(3).ok());
  EXPECT_TRUE(cluster->WaitUp(3, absl::Seconds(20)));
}

}  // namespace
}  // namespace aggvm::testing
