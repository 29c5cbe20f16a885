// The gRPC control plane end to end in one process: a real master and real agents on 127.0.0.1 (port 0), each agent
// driving a RecordingVmHost. Membership, loss detection, spec refusal, topology and the VM lifecycle reaching agents.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/clock.h"
#include "tests/cluster/cluster_fixture.h"

namespace aggvm::testing {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

v1::ListNodesResponse Nodes(TestCluster& c) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(5)));
  v1::ListNodesResponse r;
  EXPECT_TRUE(c.stub().ListNodes(&ctx, {}, &r).ok());
  return r;
}

grpc::Status Create(TestCluster& c, const v1::VmSpec& spec, v1::VmStatus* out = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(5)));
  v1::CreateVmRequest req;
  *req.mutable_spec() = spec;
  v1::VmStatus ignored;
  return c.stub().CreateVm(&ctx, req, out ? out : &ignored);
}

grpc::Status Lifecycle(TestCluster& c, const std::string& verb, const std::string& name, v1::VmStatus* out) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  v1::VmRef ref;
  ref.set_name(name);
  if (verb == "start") return c.stub().StartVm(&ctx, ref, out);
  if (verb == "pause") return c.stub().PauseVm(&ctx, ref, out);
  return c.stub().StopVm(&ctx, ref, out);
}

/// A WatchEvents stream that is live once constructed.
class Watch {
 public:
  Watch(TestCluster& c, const std::string& vm, bool console) {
    v1::WatchEventsRequest req;
    req.set_vm(vm);
    req.set_console(console);
    ctx_.set_deadline(In(absl::Seconds(60)));
    reader_ = c.stub().WatchEvents(&ctx_, req);
    reader_->WaitForInitialMetadata();
  }
  ~Watch() {
    ctx_.TryCancel();
    v1::Event e;
    while (reader_->Read(&e)) {
    }
    (void)reader_->Finish();
  }
  /// The next event matching `pred`, skipping others; nullopt if the stream ends first.
  template <typename Pred>
  std::optional<v1::Event> Until(Pred pred) {
    v1::Event e;
    while (reader_->Read(&e)) {
      if (pred(e)) return e;
    }
    return std::nullopt;
  }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader_;
};

TEST(ControlPlane, NodesRegisterWithDistinctIds) {
  TestCluster c;
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  auto nodes = Nodes(c);
  ASSERT_EQ(nodes.nodes_size(), 3);
  std::set<uint32_t> ids;
  for (const auto& n : nodes.nodes()) {
    EXPECT_EQ(n.health(), v1::NODE_HEALTH_UP) << n.node();
    EXPECT_NE(n.node_id(), 0u) << "0 is the master";
    EXPECT_EQ(n.node_id(), c.agent(n.node()).node_id().value());
    EXPECT_EQ(n.control_address(), fmt::format("127.0.0.1:{}", c.agent(n.node()).port()));
    ids.insert(n.node_id());
  }
  EXPECT_EQ(ids.size(), 3u);
  // Heartbeats flow: after a few intervals each node has sent some and its last one is recent.
  absl::SleepFor(absl::Milliseconds(450));
  const auto later = Nodes(c);
  for (const auto& n : later.nodes()) {
    EXPECT_LT(n.last_heartbeat_ms_ago(), 300u) << n.node();
    EXPECT_GE(c.agent(n.node()).master().heartbeats_ok(), 2u) << n.node();
  }
}

TEST(ControlPlane, SecondRegistrationOfALiveNodeIsRefused) {
  TestCluster c;
  ASSERT_TRUE(c.StartAgent("a").ok());
  // Directly, as another process would.
  grpc::ClientContext ctx;
  v1::RegisterNodeRequest req;
  req.set_node("a");
  req.set_control_address("127.0.0.1:1");
  v1::RegisterNodeResponse resp;
  auto st = c.stub().RegisterNode(&ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_THAT(st.error_message(), HasSubstr("node 'a' is already registered and alive"));
  // A second agent with the same name gives up after its registration deadline with the master's reason.
  RecordingVmHost other;
  agent::control::AgentControlOptions ao;
  ao.node = "a";
  ao.master_address = c.address();
  ao.listen_address = "127.0.0.1:0";
  ao.register_deadline = absl::Milliseconds(300);
  auto dup = agent::control::AgentControlPlane::Start(ao, other);
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(Nodes(c).nodes_size(), 1);
}

TEST(ControlPlane, LostNodeIsReportedWithinBoundedTime) {
  TestCluster c(absl::Milliseconds(100), 3);  // LOST after 300 ms without heartbeat
  for (const char* n : {"a", "b"}) ASSERT_TRUE(c.StartAgent(n).ok());
  Watch watch(c, "", false);
  const uint64_t t0 = MonotonicNanos();
  c.StopAgent("b");  // the agent disappears: no more heartbeats
  auto lost = watch.Until([](const v1::Event& e) {
    return e.has_node_changed() && e.node_changed().health() == v1::NODE_HEALTH_LOST;
  });
  ASSERT_TRUE(lost) << "no LOST event";
  const double ms = static_cast<double>(MonotonicNanos() - t0) / 1e6;
  EXPECT_EQ(lost->node_changed().node(), "b");
  EXPECT_GE(lost->node_changed().last_heartbeat_ms_ago(), 300u);
  EXPECT_LT(ms, 2000.0) << "lost_after is 300 ms";
  std::printf("node loss reported %.0f ms after the agent stopped (lost_after 300 ms, heartbeat 100 ms)\n", ms);
  uint32_t old_id = 0;
  const auto after = Nodes(c);
  for (const auto& n : after.nodes()) {
    EXPECT_EQ(n.health(), n.node() == "b" ? v1::NODE_HEALTH_LOST : v1::NODE_HEALTH_UP) << n.node();
    if (n.node() == "b") old_id = n.node_id();
  }
  // The node comes back under the same name and keeps its id.
  auto again = c.StartAgent("b");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->node_id().value(), old_id);
  auto joined = watch.Until([](const v1::Event& e) {
    return e.has_node_changed() && e.node_changed().health() == v1::NODE_HEALTH_UP && e.node_changed().node() == "b";
  });
  EXPECT_TRUE(joined);
}

TEST(ControlPlane, BadSpecsAreRefusedNamingTheField) {
  TestCluster c;
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  struct Case {
    const char* what;
    std::function<void(v1::VmSpec&)> mutate;
    const char* expect;
  };
  const Case cases[] = {
      {"unknown node", [](v1::VmSpec& s) { s.mutable_placement(1)->set_node("d"); },
       "placement[1].node: unknown node 'd'; registered nodes: [a, b, c]"},
      {"overlap", [](v1::VmSpec& s) { s.mutable_placement(2)->set_vcpus(1, 0); },
       "placement[2].vcpus[1]: vCPU 0 is also placed on node 'a'"},
      {"zero vcpus", [](v1::VmSpec& s) { s.set_vcpus(0); }, "vcpus: 0 vCPUs"},
      {"too many vcpus", [](v1::VmSpec& s) { s.set_vcpus(100); }, "vcpus: 100 vCPUs is above the maximum of 64"},
      {"missing image", [](v1::VmSpec& s) { s.mutable_image()->set_path("/no/such/guest.elf"); },
       "image.path: cannot use '/no/such/guest.elf'"},
      {"unknown workload", [](v1::VmSpec& s) { s.mutable_workload()->set_name("doom"); },
       "workload.name: unknown workload 'doom'"},
      {"memory", [](v1::VmSpec& s) { s.set_memory_mib(1); }, "memory_mib: 1 MiB is outside 4..3072 MiB"},
  };
  for (const auto& k : cases) {
    auto spec = Spec3x2("bad");
    k.mutate(spec);
    auto st = Create(c, spec);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << k.what;
    EXPECT_THAT(st.error_message(), HasSubstr(k.expect)) << k.what;
  }
  grpc::ClientContext ctx;
  v1::ListVmsResponse vms;
  ASSERT_TRUE(c.stub().ListVms(&ctx, {}, &vms).ok());
  EXPECT_EQ(vms.vms_size(), 0) << "nothing was created";

  // A node can hold one VM: a second VM on node a is refused while the first is not stopped; a lost node too.
  ASSERT_TRUE(Create(c, Spec3x2("first")).ok());
  auto second = Create(c, Spec3x2("second", {"a"}));
  EXPECT_EQ(second.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(second.error_message(), HasSubstr("placement[0].node: node 'a' already hosts VM 'first' (CREATED)"));
  auto same_name = Create(c, Spec3x2("first"));
  EXPECT_EQ(same_name.error_code(), grpc::StatusCode::ALREADY_EXISTS);
}

TEST(ControlPlane, TopologyMapsEveryVcpuToItsNodeAndApicId) {
  TestCluster c;
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  auto spec = Spec3x2("topo");
  // Interleaved placement, to see the mapping is not positional.
  spec.mutable_placement(0)->set_vcpus(1, 4);
  spec.mutable_placement(2)->set_vcpus(0, 1);
  v1::VmStatus created;
  ASSERT_TRUE(Create(c, spec, &created).ok());
  EXPECT_EQ(created.state(), v1::VM_STATE_CREATED);
  EXPECT_EQ(created.spec().memory_mib(), 64u) << "defaults filled";
  grpc::ClientContext ctx;
  v1::VmRef ref;
  ref.set_name("topo");
  v1::Topology topo;
  ASSERT_TRUE(c.stub().GetTopology(&ctx, ref, &topo).ok());
  ASSERT_EQ(topo.vcpus_size(), 6);
  const char* want_node[6] = {"a", "c", "b", "b", "a", "c"};
  for (int i = 0; i < 6; ++i) {
    const auto& v = topo.vcpus(i);
    EXPECT_EQ(v.vcpu(), static_cast<uint32_t>(i));
    EXPECT_EQ(v.apic_id(), static_cast<uint32_t>(i));
    EXPECT_EQ(v.node(), want_node[i]) << "vCPU " << i;
    EXPECT_EQ(v.node_id(), c.agent(want_node[i]).node_id().value()) << "vCPU " << i;
  }
}

TEST(ControlPlane, StartPauseStopReachEveryPlacedAgent) {
  TestCluster c;
  for (const char* n : {"a", "b", "c", "idle"}) ASSERT_TRUE(c.StartAgent(n).ok());
  ASSERT_TRUE(Create(c, Spec3x2("vm1")).ok());
  Watch watch(c, "vm1", true);
  v1::VmStatus st;
  auto s = Lifecycle(c, "start", "vm1", &st);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(st.state(), v1::VM_STATE_RUNNING);
  for (const char* n : {"a", "b", "c"}) {
    EXPECT_THAT(c.host(n).calls(), ElementsAre("prepare vm1", "start")) << n;
    const auto plan = c.host(n).plan();
    EXPECT_EQ(plan.node, n);
    EXPECT_EQ(plan.node_id, c.agent(n).node_id());
    ASSERT_EQ(plan.local_vcpus.size(), 2u);
    EXPECT_EQ(plan.topology.vcpus_size(), 6);
    ASSERT_EQ(plan.peers.size(), 4u) << "the master and the three nodes";
    EXPECT_EQ(plan.peers[0].node_id(), 0u);
    EXPECT_FALSE(plan.peers[0].data_plane().tcp_address().empty());
    EXPECT_EQ(plan.spec.memory_mib(), 64u);
  }
  EXPECT_TRUE(c.host("idle").calls().empty()) << "no vCPU placed there";
  // The state changes, in order, and the console line of every vCPU, from its own node.
  std::vector<v1::VmState> states;
  std::map<uint32_t, std::string> hello;
  while (hello.size() < 6 || states.size() < 3) {
    auto e = watch.Until([](const v1::Event&) { return true; });
    ASSERT_TRUE(e) << "stream ended early";
    if (e->has_vm_changed()) states.push_back(e->vm_changed().state());
    if (e->has_console()) hello[e->console().vcpu()] = e->console().node() + ": " + e->console().text();
  }
  EXPECT_THAT(states, ElementsAre(v1::VM_STATE_CREATED, v1::VM_STATE_PREPARED, v1::VM_STATE_RUNNING));
  EXPECT_EQ(hello[0], "a: hello from vCPU 0 on a");
  EXPECT_EQ(hello[3], "b: hello from vCPU 3 on b");
  EXPECT_EQ(hello[5], "c: hello from vCPU 5 on c");

  ASSERT_TRUE(Lifecycle(c, "pause", "vm1", &st).ok());
  EXPECT_EQ(st.state(), v1::VM_STATE_PAUSED);
  ASSERT_TRUE(Lifecycle(c, "start", "vm1", &st).ok());  // resume: no second PrepareVm
  EXPECT_EQ(st.state(), v1::VM_STATE_RUNNING);
  ASSERT_TRUE(Lifecycle(c, "stop", "vm1", &st).ok());
  EXPECT_EQ(st.state(), v1::VM_STATE_STOPPED);
  EXPECT_TRUE(st.error().empty()) << st.error();
  for (const char* n : {"a", "b", "c"}) {
    EXPECT_THAT(c.host(n).calls(), ElementsAre("prepare vm1", "start", "pause", "start", "stop")) << n;
  }
  // Refused transitions say why.
  auto again = Lifecycle(c, "pause", "vm1", &st);
  EXPECT_EQ(again.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(again.error_message(), HasSubstr("cannot pause VM 'vm1': it is STOPPED"));
  EXPECT_EQ(Lifecycle(c, "start", "nope", &st).error_code(), grpc::StatusCode::NOT_FOUND);
  // The nodes are free again: a new VM of the same name can be created and started there.
  ASSERT_TRUE(Create(c, Spec3x2("vm1")).ok());
  ASSERT_TRUE(Lifecycle(c, "start", "vm1", &st).ok());
  EXPECT_EQ(c.host("a").Times("prepare vm1"), 2u);
}

TEST(ControlPlane, AgentRefusesWrongNodeNoVcpusAndSecondVm) {
  TestCluster c;
  ASSERT_TRUE(c.StartAgent("a").ok());
  auto agent = v1::NodeAgent::NewStub(grpc::CreateChannel(fmt::format("127.0.0.1:{}", c.agent("a").port()),
                                                          grpc::InsecureChannelCredentials()));
  auto prepare = [&](const v1::VmSpec& spec, const std::string& node) {
    v1::PrepareVmRequest req;
    *req.mutable_spec() = spec;
    req.set_node(node);
    for (const auto& p : spec.placement()) {
      for (uint32_t v : p.vcpus()) {
        auto* vp = req.mutable_topology()->add_vcpus();
        vp->set_vcpu(v);
        vp->set_node(p.node());
        vp->set_apic_id(v);
      }
    }
    grpc::ClientContext ctx;
    v1::PrepareVmResponse resp;
    return agent->PrepareVm(&ctx, req, &resp);
  };
  auto wrong = prepare(Spec3x2("x", {"a"}), "b");
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(wrong.error_message(), HasSubstr("PrepareVm for node 'b' reached node 'a'"));
  auto none = prepare(Spec3x2("y", {"b", "c"}), "a");
  EXPECT_EQ(none.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(none.error_message(), HasSubstr("VM 'y' places no vCPU on node 'a'"));
  ASSERT_TRUE(prepare(Spec3x2("first", {"a"}), "a").ok());
  auto second = prepare(Spec3x2("second", {"a"}), "a");
  EXPECT_EQ(second.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(second.error_message(), HasSubstr("node 'a' already holds VM 'first' (PREPARED)"));
  EXPECT_THAT(c.host("a").calls(), ElementsAre("prepare first"));
  // Lifecycle calls for a VM the agent does not hold.
  grpc::ClientContext ctx;
  v1::AgentVmRef ref;
  ref.set_vm("second");
  v1::AgentVmState out;
  auto st = agent->StartVm(&ctx, ref, &out);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(st.error_message(), HasSubstr("it holds 'first'"));
  grpc::ClientContext sctx;
  v1::GetStatsRequest sreq;
  v1::Stats stats;
  ASSERT_TRUE(agent->GetStats(&sctx, sreq, &stats).ok());
  EXPECT_EQ(stats.counters().at("control_requests_refused"), 3u);
}

TEST(ControlPlane, FailedPrepareFailsTheVmAndStopsTheOthers) {
  TestCluster c;
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  c.host("c").FailPrepare(absl::ResourceExhaustedError("cannot map 64 MiB of guest memory"));
  ASSERT_TRUE(Create(c, Spec3x2("vm")).ok());
  v1::VmStatus st;
  auto s = Lifecycle(c, "start", "vm", &st);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), AllOf(HasSubstr("node 'c' (PrepareVm)"), HasSubstr("cannot map 64 MiB")));
  // A failed call carries no response body: read the VM back.
  grpc::ClientContext ctx;
  v1::VmRef ref;
  ref.set_name("vm");
  ASSERT_TRUE(c.stub().GetVm(&ctx, ref, &st).ok());
  EXPECT_EQ(st.state(), v1::VM_STATE_FAILED);
  EXPECT_THAT(st.error(), HasSubstr("node 'c' (PrepareVm)"));
  for (const char* n : {"a", "b"}) EXPECT_THAT(c.host(n).calls(), ElementsAre("prepare vm", "stop")) << n;
  EXPECT_THAT(c.host("c").calls(), ElementsAre("prepare vm"));
}

TEST(ControlPlane, LosingANodeFailsItsRunningVm) {
  TestCluster c(absl::Milliseconds(100), 3);
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  ASSERT_TRUE(Create(c, Spec3x2("vm")).ok());
  v1::VmStatus st;
  ASSERT_TRUE(Lifecycle(c, "start", "vm", &st).ok());
  Watch watch(c, "vm", false);
  c.StopAgent("c");  // stops its VM share too, and heartbeats end
  auto failed = watch.Until([](const v1::Event& e) {
    return e.has_vm_changed() && e.vm_changed().state() == v1::VM_STATE_FAILED;
  });
  ASSERT_TRUE(failed);
  EXPECT_THAT(failed->vm_changed().error(), AllOf(HasSubstr("node 'c'"), HasSubstr("lost")));
  // The master stops the VM on the nodes still there, and frees them.
  EXPECT_TRUE(c.host("a").WaitFor("stop", 1, absl::Seconds(5)));
  EXPECT_TRUE(c.host("b").WaitFor("stop", 1, absl::Seconds(5)));
  const auto nodes = Nodes(c);
  for (const auto& n : nodes.nodes()) EXPECT_EQ(n.vm(), "") << n.node();
  auto start = Lifecycle(c, "start", "vm", &st);
  EXPECT_EQ(start.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(start.error_message(), HasSubstr("it is FAILED"));
}

TEST(ControlPlane, RoutingPolicyIsStoredThenAppliedToTheRunningRouter) {
  TestCluster c;
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  ASSERT_TRUE(Create(c, Spec3x2("vm")).ok());
  v1::SetRoutingPolicyRequest req;
  req.set_vm("vm");
  req.set_policy(v1::ROUTING_POLICY_STATIC);
  auto* r = req.add_static_routes();
  r->set_vector(0x50);
  r->set_vcpu(9);
  {
    grpc::ClientContext ctx;
    v1::RoutingTable t;
    auto st = c.stub().SetRoutingPolicy(&ctx, req, &t);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("static_routes[0].vcpu: vCPU 9 does not exist"));
  }
  r->set_vcpu(3);
  {
    grpc::ClientContext ctx;
    v1::RoutingTable t;
    ASSERT_TRUE(c.stub().SetRoutingPolicy(&ctx, req, &t).ok());
    EXPECT_EQ(t.policy(), v1::ROUTING_POLICY_STATIC);
  }
  grpc::ClientContext ctx;
  v1::VmRef ref;
  ref.set_name("vm");
  v1::VmStatus vm;
  ASSERT_TRUE(c.stub().GetVm(&ctx, ref, &vm).ok());
  EXPECT_EQ(vm.spec().routing_policy(), v1::ROUTING_POLICY_STATIC);
  ASSERT_EQ(vm.spec().static_routes_size(), 1);
  {
    // Not running: the stored policy and routes, no IOAPIC entries.
    grpc::ClientContext ctx2;
    v1::RoutingTable t;
    ASSERT_TRUE(c.stub().GetRoutingTable(&ctx2, ref, &t).ok());
    EXPECT_EQ(t.policy(), v1::ROUTING_POLICY_STATIC);
    ASSERT_EQ(t.static_routes_size(), 1);
    EXPECT_EQ(t.entries_size(), 0);
  }
  // Running: the master's global controller serves the live table, with the pin from the stored policy.
  grpc::ClientContext sctx;
  ASSERT_TRUE(c.stub().StartVm(&sctx, ref, &vm).ok());
  {
    grpc::ClientContext ctx3;
    v1::RoutingTable t;
    ASSERT_TRUE(c.stub().GetRoutingTable(&ctx3, ref, &t).ok());
    EXPECT_EQ(t.policy(), v1::ROUTING_POLICY_STATIC);
    ASSERT_EQ(t.static_routes_size(), 1);
    EXPECT_EQ(t.static_routes(0).vector(), 0x50u);
    EXPECT_EQ(t.static_routes(0).vcpu(), 3u);
    EXPECT_TRUE(t.counters().contains("delivered"));
  }
  // Switched at run time: the live router takes the new policy and drops the pins.
  v1::SetRoutingPolicyRequest rr;
  rr.set_vm("vm");
  rr.set_policy(v1::ROUTING_POLICY_ROUND_ROBIN);
  grpc::ClientContext ctx4;
  v1::RoutingTable t;
  ASSERT_TRUE(c.stub().SetRoutingPolicy(&ctx4, rr, &t).ok());
  EXPECT_EQ(t.policy(), v1::ROUTING_POLICY_ROUND_ROBIN);
  EXPECT_EQ(t.static_routes_size(), 0);
}

TEST(ControlPlane, GuestOutputForForeignVcpusIsDropped) {
  TestCluster c;
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  ASSERT_TRUE(Create(c, Spec3x2("vm")).ok());
  v1::VmStatus st;
  Watch watch(c, "vm", true);
  ASSERT_TRUE(Lifecycle(c, "start", "vm", &st).ok());
  // Node a claims vCPU 5 (placed on c) and an unknown VM: neither reaches watchers; its own vCPU 1 does.
  c.agent("a").master().ConsoleLine("vm", VcpuIndex(5), "forged");
  c.agent("a").master().ConsoleLine("ghost", VcpuIndex(0), "forged");
  c.agent("a").master().ConsoleLine("vm", VcpuIndex(1), "genuine");
  auto e = watch.Until([](const v1::Event& ev) {
    return ev.has_console() && ev.console().text().find("hello") == std::string::npos;
  });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->console().text(), "genuine");
}

}  // namespace
}  // namespace aggvm::testing
