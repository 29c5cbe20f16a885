// Unit tests of the master's per-VM data plane (master/vm_dataplane.h) and of the spec's interrupt_routes rules:
// the spec -> GlobalController mapping, and a VmDataPlane dialing two real TcpTransports that play the nodes.
#include "master/vm_dataplane.h"

#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "irqchip/ioapic.h"
#include "master/vm_spec.h"
#include "tests/support/data_plane_spec.h"
#include "transport/tcp_transport.h"

namespace aggvm::master {
namespace {

using ::testing::HasSubstr;
using testing::TopologyByPlacementOrder;

v1::VmSpec TwoNodeSpec() {
  v1::VmSpec spec = testing::TwoNodeDataPlaneSpec("dp");
  auto* r = spec.add_interrupt_routes();
  r->set_gsi(4);
  r->set_vector(0x44);
  r->set_delivery(v1::INTERRUPT_DELIVERY_LOWEST_PRIORITY);
  r->set_dest_mode(v1::DESTINATION_MODE_LOGICAL);
  r->set_destination(0xFF);
  r->set_trigger(v1::INTERRUPT_TRIGGER_EDGE);
  auto* l = spec.add_interrupt_routes();
  l->set_gsi(5);
  l->set_vector(0x55);
  l->set_delivery(v1::INTERRUPT_DELIVERY_FIXED);
  l->set_dest_mode(v1::DESTINATION_MODE_PHYSICAL);
  l->set_destination(3);
  l->set_trigger(v1::INTERRUPT_TRIGGER_LEVEL);
  spec.set_routing_policy(v1::ROUTING_POLICY_ROUND_ROBIN);
  return spec;
}


TEST(ControllerConfigFromSpec, MapsTopologyRoutesAndPolicy) {
  const v1::VmSpec spec = TwoNodeSpec();
  auto c = ControllerConfigFromSpec(spec, TopologyByPlacementOrder(spec));
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->vcpus.size(), 4u);
  EXPECT_EQ(c->vcpus[3].node, NodeId(2));
  EXPECT_EQ(c->vcpus[3].apic.id, ApicId(3));
  EXPECT_TRUE(c->vcpus[3].apic.x2apic);
  EXPECT_EQ(c->nodes, (std::vector<NodeId>{NodeId(1), NodeId(2)}));
  EXPECT_EQ(c->router.policy, irqchip::RoutingPolicy::kRoundRobin);
  EXPECT_EQ(c->wait_mode, transport::WaitMode::kEvent);
  ASSERT_EQ(c->pins.size(), 2u);
  EXPECT_EQ(c->pins[0].pin, 4u);
  EXPECT_EQ(c->pins[0].entry, RedirectionEntry(Vector(0x44), irqchip::DeliveryMode::kLowestPriority,
                                               irqchip::DestMode::kLogical, irqchip::TriggerMode::kEdge, 0xFF));
  EXPECT_EQ(c->pins[1].entry, RedirectionEntry(Vector(0x55), irqchip::DeliveryMode::kFixed,
                                               irqchip::DestMode::kPhysical, irqchip::TriggerMode::kLevel, 3));
  EXPECT_EQ(c->pins[1].entry & irqchip::IoApic::kRteMask, 0u);
}

TEST(ControllerConfigFromSpec, RefusesATopologyThatDoesNotMatchTheSpec) {
  v1::VmSpec spec = TwoNodeSpec();
  v1::Topology t = TopologyByPlacementOrder(spec);
  t.mutable_vcpus()->RemoveLast();
  auto c = ControllerConfigFromSpec(spec, t);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("topology lists 3 vCPUs but the spec has 4"));
}

TEST(InterruptRoutesSpec, EachBadFieldIsNamed) {
  v1::VmSpec spec = TwoNodeSpec();
  spec.mutable_image()->clear_path();
  SpecContext ctx;
  ctx.default_image = "";
  auto* r = spec.add_interrupt_routes();  // duplicate pin, bad vector, destination beyond the vCPUs
  r->set_gsi(4);
  r->set_vector(7);
  r->set_destination(9);
  auto* big = spec.add_interrupt_routes();
  big->set_gsi(24);
  big->set_vector(0x60);
  big->set_dest_mode(v1::DESTINATION_MODE_LOGICAL);
  big->set_destination(0);
  FillDefaults(spec, ctx);
  const absl::Status st = ValidateVmSpec(spec, ctx);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("interrupt_routes[2].gsi: GSI 4 is already routed by interrupt_routes[0]"));
  EXPECT_THAT(st.message(), HasSubstr("interrupt_routes[2].vector: 7 is outside 32..254"));
  EXPECT_THAT(st.message(), HasSubstr("interrupt_routes[2].destination: APIC ID 9 names no vCPU"));
  EXPECT_THAT(st.message(), HasSubstr("interrupt_routes[3].gsi: 24 is not an IOAPIC pin (0..23)"));
  EXPECT_THAT(st.message(), HasSubstr("interrupt_routes[3].destination: logical mask 0 names no vCPU"));
}

TEST(InterruptRoutesSpec, LogicalDestinationsNeedX2apic) {
  v1::VmSpec spec = TwoNodeSpec();
  spec.mutable_workload()->set_xapic(true);
  SpecContext ctx;
  FillDefaults(spec, ctx);
  const absl::Status st = ValidateVmSpec(spec, ctx);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("interrupt_routes[0].dest_mode: logical destinations need x2APIC"));
}

TEST(InterruptRoutesSpec, DefaultsAreFixedPhysicalEdge) {
  v1::VmSpec spec;
  auto* r = spec.add_interrupt_routes();
  r->set_gsi(1);
  r->set_vector(0x41);
  FillDefaults(spec, SpecContext{});
  EXPECT_EQ(spec.interrupt_routes(0).delivery(), v1::INTERRUPT_DELIVERY_FIXED);
  EXPECT_EQ(spec.interrupt_routes(0).dest_mode(), v1::DESTINATION_MODE_PHYSICAL);
  EXPECT_EQ(spec.interrupt_routes(0).trigger(), v1::INTERRUPT_TRIGGER_EDGE);
}

// Two raw transports play the nodes: the data plane dials them (lower id dials higher), its controller rings a
// doorbell on node 1 as a kControl raise-gsi, and a node that disappears is reported through on_node_lost.
TEST(VmDataPlane, DialsTheNodesRingsAndReportsALostNode) {
  const v1::VmSpec spec = TwoNodeSpec();
  std::vector<std::unique_ptr<transport::TcpTransport>> nodes;
  std::vector<VmNodeEndpoint> endpoints;
  for (uint16_t id = 1; id <= 2; ++id) {
    transport::TcpTransportOptions o;
    o.listen_address = "127.0.0.1:0";
    auto t = transport::TcpTransport::Create(NodeId(id), o);
    ASSERT_TRUE(t.ok()) << t.status();
    endpoints.push_back(VmNodeEndpoint{NodeId(id), id == 1 ? "a" : "b",
                                       "127.0.0.1:" + std::to_string((*t)->listen_port())});
    nodes.push_back(*std::move(t));
  }
  std::mutex mu;
  std::vector<std::pair<NodeId, std::string>> lost;
  VmDataPlaneOptions o;
  o.listen_address = "127.0.0.1:0";
  o.connect_timeout = absl::Seconds(10);
  o.on_node_lost = [&](NodeId n, const absl::Status& why) {
    std::lock_guard l(mu);
    lost.emplace_back(n, std::string(why.message()));
  };
  auto dp = VmDataPlane::Begin(spec, TopologyByPlacementOrder(spec), endpoints, o);
  ASSERT_TRUE(dp.ok()) << dp.status();
  EXPECT_THAT((*dp)->listen_address(), HasSubstr("127.0.0.1:"));
  // The nodes connect after Begin returned (as agents do during PrepareVm).
  std::vector<std::thread> connects;
  std::vector<absl::Status> results(2);
  for (size_t i = 0; i < 2; ++i) {
    connects.emplace_back([&, i] {
      const transport::PeerEndpoint m{NodeId(0), (*dp)->listen_address()};
      results[i] = nodes[i]->Connect({&m, 1}, absl::Seconds(10));
    });
  }
  for (auto& t : connects) t.join();
  for (const auto& r : results) ASSERT_TRUE(r.ok()) << r;
  ASSERT_TRUE((*dp)->Activate().ok());
  GlobalController* gc = (*dp)->controller();
  ASSERT_NE(gc, nullptr);

  ASSERT_TRUE(gc->Ring(NodeId(1), Gsi(4), irqchip::TriggerMode::kEdge, true).ok());
  transport::ReceivedFrame f[1];
  size_t got = 0;
  for (int i = 0; i < 500 && got == 0; ++i) {
    auto n = nodes[0]->Wait(f, absl::Milliseconds(10));
    ASSERT_TRUE(n.ok()) << n.status();
    got = *n;
  }
  ASSERT_EQ(got, 1u);
  const auto* c = std::get_if<transport::ControlPayload>(&f[0].frame.payload);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->op, transport::ControlPayload::Op::kRaiseGsi);
  EXPECT_EQ(c->arg0, 4u);

  auto table = gc->GetRoutingTable();
  ASSERT_TRUE(table.ok());
  EXPECT_EQ(table->policy, irqchip::RoutingPolicy::kRoundRobin);
  EXPECT_EQ(table->pins[4].vector, Vector(0x44));

  nodes[1]->Close();  // node b disappears
  const absl::Time end = absl::Now() + absl::Seconds(5);
  while (absl::Now() < end) {
    {
      std::lock_guard l(mu);
      if (!lost.empty()) break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  {
    std::lock_guard l(mu);
    ASSERT_EQ(lost.size(), 1u);
    EXPECT_EQ(lost[0].first, NodeId(2));
  }
  EXPECT_TRUE(gc->node_lost(NodeId(2)));
  (*dp)->Stop();
  (*dp)->Stop();  // idempotent
}

TEST(VmDataPlane, ActivateNamesTheNodeThatNeverAnswered) {
  const v1::VmSpec spec = TwoNodeSpec();
  // Nothing listens at these addresses.
  std::vector<VmNodeEndpoint> endpoints{{NodeId(1), "a", "127.0.0.1:1"}, {NodeId(2), "b", "127.0.0.1:1"}};
  VmDataPlaneOptions o;
  o.listen_address = "127.0.0.1:0";
  o.connect_timeout = absl::Milliseconds(300);
  auto dp = VmDataPlane::Begin(spec, TopologyByPlacementOrder(spec), endpoints, o);
  ASSERT_TRUE(dp.ok()) << dp.status();
  const absl::Status st = (*dp)->Activate();
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("could not connect its data plane"));
  EXPECT_THAT(st.message(), HasSubstr("node 1"));
}

// On a host with no verbs device (this one: ibv_get_device_list gives ENOSYS), an rdma VM's data plane is refused
// with what to do; with a device (the rdma_rxe VM) tests/rdma/rdma_dataplane_rxe_test runs it for real.
TEST(VmDataPlane, RdmaWithoutADeviceIsRefusedWithAClearMessage) {
  v1::VmSpec spec = TwoNodeSpec();
  spec.set_transport(v1::TRANSPORT_KIND_RDMA);
  VmDataPlaneOptions o;
  o.listen_address = "127.0.0.1:0";
  const std::vector<VmNodeEndpoint> nodes{{NodeId(1), "a", "127.0.0.1:1"}, {NodeId(2), "b", "127.0.0.1:1"}};
  auto dp = VmDataPlane::Begin(spec, TopologyByPlacementOrder(spec), nodes, o);
  if (dp.ok()) GTEST_SKIP() << "skipping: this host has an RDMA device (the refusal needs a host without one)";
  EXPECT_EQ(dp.status().code(), absl::StatusCode::kUnavailable) << dp.status();
  EXPECT_THAT(dp.status().message(), HasSubstr("no RDMA device found"));
  EXPECT_THAT(dp.status().message(), HasSubstr("TRANSPORT_KIND_TCP"));
  EXPECT_THAT(dp.status().message(), HasSubstr("VM 'dp'"));
}

}  // namespace
}  // namespace aggvm::master
