// ClusterVmHost — the node agent's VM runner — against a real GlobalController (master/global_controller.h) in this
// process, everything over real TcpTransports on 127.0.0.1: two nodes (ids 1 and 2), each a ClusterVmHost running its
// two vCPUs of a 4-vCPU probe-guest VM on the real /dev/kvm.
//   - hello: every vCPU's console line arrives at the master's UART (forwarded port I/O), records come back through
//     GuestOutput::Record;
//   - irq-sink: a doorbell interrupt raised on node 1 reaches the vCPU the master's router chose — on node 2 and on
//     node 1 itself — proven by the guest's IRQ records; a level-triggered one is re-delivered after each guest EOI
//     (kernel mode: KVM_EXIT_IOAPIC_EOI through the level route the host installs) while node 1 holds it, and stops
//     after the deassert.
// Both irqchip modes.
#include <gtest/gtest.h>

#include <sched.h>

#include <algorithm>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <cstdio>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "common/thread.h"
#include "master/global_controller.h"
#include "node-agent/cluster_vm_host.h"
#include "node-agent/local_controller.h"
#include "node-agent/probe_vm.h"
#include "tests/support/require.h"
#include "transport/tcp_transport.h"

namespace aggvm::testing {
namespace {

namespace v1 = ::aggvm::v1;
using irqchip::DeliveryMode;
using irqchip::DestMode;
using irqchip::TriggerMode;
using master::RedirectionEntry;

constexpr uint32_t kVcpus = 4;
constexpr uint32_t kNodes = 2;  // node n (1-based) runs vCPUs 2(n-1), 2(n-1)+1

bool WaitUntil(const std::function<bool()>& pred, absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return pred();
}

struct GuestRecord {
  uint32_t vcpu;
  uint32_t type;
  uint64_t a;
};

class RecordingOutput final : public agent::control::GuestOutput {
 public:
  void ConsoleLine(const std::string&, VcpuIndex vcpu, std::string_view text) override {
    std::lock_guard l(mu_);
    lines_.push_back(fmt::format("{}: {}", vcpu.value(), text));
  }
  void Record(const std::string&, VcpuIndex vcpu, uint32_t type, uint64_t a, uint64_t, uint64_t, uint64_t) override {
    std::lock_guard l(mu_);
    records_.push_back({vcpu.value(), type, a});
  }
  size_t Count(uint32_t vcpu, uint32_t type, std::optional<uint64_t> a = std::nullopt) {
    std::lock_guard l(mu_);
    size_t n = 0;
    for (const auto& r : records_) n += r.vcpu == vcpu && r.type == type && (!a || r.a == *a);
    return n;
  }
  std::vector<std::string> lines() {
    std::lock_guard l(mu_);
    return lines_;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> lines_;
  std::vector<GuestRecord> records_;
};

// A master data plane (GlobalController on node 0) and kNodes ClusterVmHosts, set up in the order the real control
// plane uses: Prepare on every node (each starts connecting), the master connects, then Start on every node.
class Cluster {
 public:
  static std::unique_ptr<Cluster> Make(const std::string& workload, v1::IrqchipMode irqchip,
                                       std::vector<master::PinProgram> pins = {},
                                       const std::function<void(uint32_t, agent::ClusterVmHostOptions&)>& tweak = {}) {
    auto c = std::unique_ptr<Cluster>(new Cluster());
    transport::TcpTransportOptions mo;
    mo.listen_address = "127.0.0.1:0";
    auto mt = transport::TcpTransport::Create(NodeId(0), mo);
    EXPECT_TRUE(mt.ok()) << mt.status();
    if (!mt.ok()) return nullptr;
    c->master_transport_ = *std::move(mt);

    v1::VmSpec spec;
    spec.set_name("agent-test");
    spec.set_vcpus(kVcpus);
    spec.set_memory_mib(64);
    spec.set_irqchip(irqchip);
    spec.set_transport(v1::TRANSPORT_KIND_TCP);
    spec.set_wait_mode(v1::WAIT_MODE_EVENT);
    spec.mutable_image()->set_path(AGGVM_PROBE_GUEST_ELF);
    spec.mutable_workload()->set_name(workload);
    v1::Topology topo;
    topo.set_vm(spec.name());
    for (uint32_t v = 0; v < kVcpus; ++v) {
      auto* p = topo.add_vcpus();
      p->set_vcpu(v);
      p->set_node(fmt::format("node-{}", 1 + v / 2));
      p->set_node_id(1 + v / 2);
      p->set_apic_id(v);
    }
    for (uint32_t n = 0; n < kNodes; ++n) {
      agent::ClusterVmHostOptions ho;
      ho.data_listen = "127.0.0.1:0";
      ho.connect_timeout = absl::Seconds(10);
      ho.log = [](const std::string& line) { std::fprintf(stderr, "[host] %s\n", line.c_str()); };
      if (tweak) tweak(n, ho);
      auto h = agent::ClusterVmHost::Create(ho);
      EXPECT_TRUE(h.ok()) << h.status();
      if (!h.ok()) return nullptr;
      c->hosts_.push_back(*std::move(h));
      c->outputs_.push_back(std::make_unique<RecordingOutput>());
    }
    std::vector<v1::NodeStatus> peers;
    {
      v1::NodeStatus m;
      m.set_node("master");
      m.set_node_id(0);
      m.mutable_data_plane()->set_tcp_address(fmt::format("127.0.0.1:{}", c->master_transport_->listen_port()));
      peers.push_back(m);
    }
    for (uint32_t n = 0; n < kNodes; ++n) {
      v1::NodeStatus s;
      s.set_node(fmt::format("node-{}", n + 1));
      s.set_node_id(n + 1);
      s.mutable_data_plane()->set_tcp_address(c->hosts_[n]->data_address());
      peers.push_back(s);
    }
    for (uint32_t n = 0; n < kNodes; ++n) {
      agent::control::LocalVmPlan plan;
      plan.spec = spec;
      plan.node = fmt::format("node-{}", n + 1);
      plan.node_id = NodeId(n + 1);
      plan.local_vcpus = {VcpuIndex(2 * n), VcpuIndex(2 * n + 1)};
      plan.topology = topo;
      plan.peers = peers;
      const absl::Status s = c->hosts_[n]->Prepare(plan, *c->outputs_[n]);
      EXPECT_TRUE(s.ok()) << s;
      if (!s.ok()) return nullptr;
    }

    // The master dials every node (lower id dials higher), then its controller runs.
    std::vector<transport::PeerEndpoint> nodes;
    for (uint32_t n = 0; n < kNodes; ++n) nodes.push_back({NodeId(n + 1), c->hosts_[n]->data_address()});
    if (auto s = c->master_transport_->Connect(nodes, absl::Seconds(10)); !s.ok()) {
      ADD_FAILURE() << s;
      return nullptr;
    }
    master::GlobalControllerConfig mc;
    for (uint32_t n = 0; n < kNodes; ++n) mc.nodes.push_back(NodeId(n + 1));
    for (uint32_t v = 0; v < kVcpus; ++v) mc.vcpus.push_back(master::X2apicVcpu(NodeId(1 + v / 2), ApicId(v)));
    mc.pins = std::move(pins);
    mc.wait_mode = transport::WaitMode::kEvent;
    Cluster* raw = c.get();
    mc.console = [raw](VcpuIndex v, std::string_view line) {
      std::lock_guard l(raw->mu_);
      raw->console_[v.value()].emplace_back(line);
    };
    auto gc = master::GlobalController::Create(std::move(mc), c->master_transport_.get());
    EXPECT_TRUE(gc.ok()) << gc.status();
    if (!gc.ok()) return nullptr;
    c->gc_ = *std::move(gc);
    c->master_thread_ = std::jthread([raw](std::stop_token st) { (void)raw->gc_->Run(st); });

    for (auto& h : c->hosts_) {
      const absl::Status s = h->Start();
      EXPECT_TRUE(s.ok()) << s;
      if (!s.ok()) return nullptr;
    }
    return c;
  }

  ~Cluster() {
    for (auto& h : hosts_) (void)h->Stop();
    master_thread_.request_stop();
    if (master_thread_.joinable()) master_thread_.join();
    gc_.reset();
    if (master_transport_) master_transport_->Close();
  }

  master::GlobalController& master() { return *gc_; }
  agent::ClusterVmHost& host(uint32_t n) { return *hosts_[n]; }
  RecordingOutput& output(uint32_t n) { return *outputs_[n]; }
  std::vector<std::string> console(uint32_t vcpu) {
    std::lock_guard l(mu_);
    return console_[vcpu];
  }
  /// Records of `type` (and value a) the guest's vCPU sent, on whichever node runs it.
  size_t Records(uint32_t vcpu, uint32_t type, std::optional<uint64_t> a = std::nullopt) {
    return outputs_[vcpu / 2]->Count(vcpu, type, a);
  }
  size_t AllIrqs(uint32_t vcpu) { return Records(vcpu, guest::AGGVM_REC_IRQ); }

 private:
  Cluster() = default;
  std::unique_ptr<transport::TcpTransport> master_transport_;
  std::vector<std::unique_ptr<agent::ClusterVmHost>> hosts_;
  std::vector<std::unique_ptr<RecordingOutput>> outputs_;
  std::unique_ptr<master::GlobalController> gc_;
  std::jthread master_thread_;
  std::mutex mu_;
  std::map<uint32_t, std::vector<std::string>> console_;
};

agent::ClusterVmHostOptions LoopbackHostOptions() {
  agent::ClusterVmHostOptions o;
  o.data_listen = "127.0.0.1:0";
  return o;
}

class ClusterHostTest : public ::testing::TestWithParam<v1::IrqchipMode> {};

TEST_P(ClusterHostTest, HelloFromEveryVcpuReachesTheMastersUart) {
  AGGVM_REQUIRE_KVM();
  auto c = Cluster::Make("hello", GetParam());
  ASSERT_TRUE(c);
  for (uint32_t n = 0; n < kNodes; ++n) {
    agent::ProbeVm* vm = c->host(n).vm();
    ASSERT_NE(vm, nullptr);
    const absl::Status s = vm->WaitDone(absl::Seconds(60));
    ASSERT_TRUE(s.ok()) << "node " << n + 1 << ": " << s;
  }
  ASSERT_TRUE(WaitUntil([&] {
    for (uint32_t v = 0; v < kVcpus; ++v) {
      if (c->console(v).empty()) return false;
    }
    return true;
  })) << "not every vCPU's line reached the master's UART";
  for (uint32_t v = 0; v < kVcpus; ++v) {
    EXPECT_EQ(c->console(v), std::vector<std::string>{fmt::format("hello from vcpu {} apic {}", v, v)});
    EXPECT_EQ(c->Records(v, guest::AGGVM_REC_HELLO, v), 1u) << "vCPU " << v << "'s HELLO record (a = its APIC ID)";
    // The other node never ran this vCPU.
    EXPECT_EQ(c->output(1 - v / 2).Count(v, guest::AGGVM_REC_HELLO), 0u);
  }
  for (uint32_t n = 0; n < kNodes; ++n) {
    EXPECT_TRUE(c->output(n).lines().empty()) << "the paravirtual console port is unused in cluster mode";
    const auto stats = c->host(n).Stats();
    EXPECT_EQ(stats.at("dataplane.connected"), 1u);
    EXPECT_EQ(stats.at("vm.local_vcpus"), 2u);
    EXPECT_GE(stats.at("io_forwarder.responses"), 2u * 24u) << "LSR + THR per character";
    EXPECT_EQ(stats.at("io_forwarder.timeouts"), 0u);
    EXPECT_EQ(stats.at("vm.forwarded_no_device"), 0u);
    EXPECT_EQ(stats.at("vm.failed"), 0u);
  }
}

TEST_P(ClusterHostTest, DoorbellRaisedOnNodeOneReachesTheChosenVcpu) {
  AGGVM_REQUIRE_KVM();
  constexpr uint32_t kToNode2 = 4, kToNode1 = 6, kLevel = 5;
  constexpr uint8_t kVecRemote = 0x44, kVecLocal = 0x46, kVecLevel = 0x55;
  auto c = Cluster::Make(
      "irq-sink", GetParam(),
      {{kToNode2, RedirectionEntry(Vector(kVecRemote), DeliveryMode::kFixed, DestMode::kPhysical, TriggerMode::kEdge, 3)},
       {kToNode1, RedirectionEntry(Vector(kVecLocal), DeliveryMode::kFixed, DestMode::kPhysical, TriggerMode::kEdge, 1)},
       {kLevel, RedirectionEntry(Vector(kVecLevel), DeliveryMode::kFixed, DestMode::kPhysical, TriggerMode::kLevel, 2)}});
  ASSERT_TRUE(c);
  // HELLO = IDT loaded and LAPIC enabled: an interrupt before it would be lost.
  for (uint32_t v = 0; v < kVcpus; ++v) {
    ASSERT_TRUE(WaitUntil([&] { return c->Records(v, guest::AGGVM_REC_HELLO) == 1; }, absl::Seconds(30)))
        << "vCPU " << v << " never became ready";
  }
  constexpr NodeId kNode1{1};

  // Edge raised on node 1, routed to vCPU 3 (node 2).
  ASSERT_TRUE(c->master().Ring(kNode1, Gsi(kToNode2), TriggerMode::kEdge, true).ok());
  ASSERT_TRUE(WaitUntil([&] { return c->Records(3, guest::AGGVM_REC_IRQ, kVecRemote) == 1; }))
      << "the guest's vCPU 3 on node 2 never handled the doorbell interrupt";
  // Edge raised on node 1, routed to its own vCPU 1.
  ASSERT_TRUE(c->master().Ring(kNode1, Gsi(kToNode1), TriggerMode::kEdge, true).ok());
  ASSERT_TRUE(WaitUntil([&] { return c->Records(1, guest::AGGVM_REC_IRQ, kVecLocal) == 1; }))
      << "the guest's vCPU 1 on node 1 never handled the doorbell interrupt";
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(c->AllIrqs(0), 0u);
  EXPECT_EQ(c->AllIrqs(1), 1u);
  EXPECT_EQ(c->AllIrqs(2), 0u);
  EXPECT_EQ(c->AllIrqs(3), 1u);
  EXPECT_EQ(c->host(0).Stats().at("local_controller.control_raises"), 2u);
  EXPECT_EQ(c->host(1).Stats().at("local_controller.delivered"), 1u);

  // Level raised on node 1 and held, routed to vCPU 2 (node 2): each guest EOI goes back to the master, which
  // re-delivers while the pin is asserted. After the deassert, deliveries stop.
  ASSERT_TRUE(c->master().Ring(kNode1, Gsi(kLevel), TriggerMode::kLevel, true).ok());
  ASSERT_TRUE(WaitUntil([&] { return c->Records(2, guest::AGGVM_REC_IRQ, kVecLevel) >= 3; }))
      << "level interrupt handled " << c->Records(2, guest::AGGVM_REC_IRQ, kVecLevel)
      << " times; EOIs sent by node 2: " << c->host(1).Stats().at("local_controller.eois_sent");
  ASSERT_TRUE(c->master().Ring(kNode1, Gsi(kLevel), TriggerMode::kLevel, false).ok());
  ASSERT_TRUE(WaitUntil([&] {
    auto table = c->master().GetRoutingTable();
    return table.ok() && !table->pins[kLevel].input && !table->pins[kLevel].remote_irr;
  })) << "the master never saw the last EOI";
  // Every delivery the master made has been handled by the guest (its record precedes its EOI). Then nothing more
  // comes: the pin is deasserted. (The routing-table snapshot above has been seen, rarely, one delivery early: the
  // count is taken from the master's counter, not from that snapshot; see the report of issue 5.)
  ASSERT_TRUE(WaitUntil([&] {
    return c->Records(2, guest::AGGVM_REC_IRQ, kVecLevel) == c->master().counters().level_delivered &&
           c->master().counters().eois == c->master().counters().level_delivered;
  })) << "records " << c->Records(2, guest::AGGVM_REC_IRQ, kVecLevel) << ", master level deliveries "
      << c->master().counters().level_delivered << ", master EOIs " << c->master().counters().eois;
  const size_t settled = c->master().counters().level_delivered;
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(c->master().counters().level_delivered, settled) << "re-delivered after the deassert";
  EXPECT_EQ(c->Records(2, guest::AGGVM_REC_IRQ, kVecLevel), settled);
  const auto s2 = c->host(1).Stats();
  EXPECT_EQ(s2.at("local_controller.eois_sent"), settled);
  EXPECT_EQ(s2.at("local_controller.eois_unmatched"), 0u);
  if (GetParam() == v1::IRQCHIP_MODE_KERNEL) {
    EXPECT_EQ(s2.at("vm.level_routes"), 1u);
  }
  EXPECT_EQ(c->AllIrqs(0), 0u);
  EXPECT_EQ(c->AllIrqs(3), 1u);
  for (uint32_t n = 0; n < kNodes; ++n) {
    agent::ProbeVm* vm = c->host(n).vm();
    EXPECT_TRUE(vm->error().ok()) << vm->error();
  }
}

TEST(ClusterHost, PauseStopsTheVcpusAndStartResumesThem) {
  AGGVM_REQUIRE_KVM();
  auto c = Cluster::Make("spin", v1::IRQCHIP_MODE_KERNEL);
  ASSERT_TRUE(c);
  agent::ProbeVm* vm = c->host(1).vm();
  ASSERT_TRUE(WaitUntil([&] { return vm->Heartbeat(VcpuIndex(3)) > 1000; }, absl::Seconds(30)));
  ASSERT_TRUE(c->host(1).Pause().ok());
  const uint64_t h = vm->Heartbeat(VcpuIndex(3));
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(vm->Heartbeat(VcpuIndex(3)), h) << "spinning while paused";
  ASSERT_TRUE(c->host(1).Start().ok());
  EXPECT_TRUE(WaitUntil([&] { return vm->Heartbeat(VcpuIndex(3)) > h + 1000; }));
  ASSERT_TRUE(c->host(1).Stop().ok());
  EXPECT_EQ(c->host(1).vm(), nullptr);
  EXPECT_TRUE(c->host(1).Stats().empty());
}

// CPUs thread `tid` of this process may run on.
std::vector<int> AllowedCpus(pid_t tid) {
  cpu_set_t s;
  return sched_getaffinity(tid, sizeof s, &s) == 0 ? CpusIn(s) : std::vector<int>{};
}

// name -> the CPU sets of this process's threads of that name.
std::multimap<std::string, std::vector<int>> ThreadPlacement() {
  std::multimap<std::string, std::vector<int>> out;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    std::string name;
    std::ifstream(e.path() / "comm") >> name;
    out.emplace(name, AllowedCpus(static_cast<pid_t>(std::stol(e.path().filename().string()))));
  }
  return out;
}

TEST(ClusterHost, PlacementPutsTheVcpuAndDataPlaneThreadsOnTheirCpus) {
  AGGVM_REQUIRE_KVM();
  const std::vector<int> all = AllowedCpus(0);
  if (all.size() < 2) GTEST_SKIP() << "placement needs two CPUs to be told apart; this process may use one";
  const std::vector<int> vcpu_cpus{all.back()}, dataplane_cpus{all.front()};
  // Node 2 places its threads; node 1 does not.
  auto c = Cluster::Make("irq-sink", v1::IRQCHIP_MODE_KERNEL, {}, [&](uint32_t n, agent::ClusterVmHostOptions& o) {
    if (n == 1) {
      o.vcpu_cpus = vcpu_cpus;
      o.dataplane_cpus = dataplane_cpus;
    }
  });
  ASSERT_TRUE(c);
  // A doorbell train raised on node 2: its thread is started by node 2's data-plane thread and inherits its CPUs.
  ASSERT_TRUE(c->master()
                  .Ring(NodeId(2), Gsi(3), TriggerMode::kEdge, true, false, absl::Seconds(2),
                        master::RingTrain{.count = 200, .interval_us = 10'000})
                  .ok());
  // A thread has its name once it runs (until then it carries its creator's): wait for every expected one.
  const std::map<std::string, size_t> expected = {
      {"vcpu-0", 1},  {"vcpu-1", 1},  {"vcpu-2", 1},  {"vcpu-3", 1},  {"proxy-0", 1},   {"proxy-1", 1},
      {"proxy-2", 1}, {"proxy-3", 1}, {"proxy-4", 2}, {"proxy-5", 2}, {"dataplane", 2}, {"train", 1}};
  std::multimap<std::string, std::vector<int>> placed;
  ASSERT_TRUE(WaitUntil([&] {
    placed = ThreadPlacement();
    for (const auto& [name, n] : expected) {
      if (placed.count(name) != n) return false;
    }
    return true;
  })) << "not every vCPU, proxy, data-plane and train thread is running under its name";
  auto sets_of = [&](const std::string& name) {
    std::vector<std::vector<int>> v;
    for (auto [it, end] = placed.equal_range(name); it != end; ++it) v.push_back(it->second);
    return v;
  };
  using Sets = std::vector<std::vector<int>>;
  EXPECT_EQ(sets_of("vcpu-2"), Sets{vcpu_cpus}) << "node 2's vCPUs";
  EXPECT_EQ(sets_of("vcpu-3"), Sets{vcpu_cpus});
  EXPECT_EQ(sets_of("vcpu-0"), Sets{all}) << "node 1 places nothing";
  EXPECT_EQ(sets_of("vcpu-1"), Sets{all});
  // Proxies: node 2's for APIC IDs 0, 1 and the two nowhere IDs 4, 5; node 1's for 2..5.
  for (const char* p : {"proxy-0", "proxy-1"}) EXPECT_EQ(sets_of(p), Sets{vcpu_cpus}) << p;
  for (const char* p : {"proxy-2", "proxy-3"}) EXPECT_EQ(sets_of(p), Sets{all}) << p;
  for (const char* p : {"proxy-4", "proxy-5"}) {
    auto s = sets_of(p);
    std::sort(s.begin(), s.end());
    Sets want{vcpu_cpus, all};
    std::sort(want.begin(), want.end());
    EXPECT_EQ(s, want) << p << ": one on each node";
  }
  auto dp = sets_of("dataplane");
  std::sort(dp.begin(), dp.end());
  Sets want_dp{dataplane_cpus, all};
  std::sort(want_dp.begin(), want_dp.end());
  EXPECT_EQ(dp, want_dp) << "node 2's data-plane thread placed, node 1's not";
  EXPECT_EQ(sets_of("train"), Sets{dataplane_cpus}) << "the train inherits the data-plane thread's CPUs";
}

TEST(ClusterHost, PrepareRefusesAPlanWithoutTheMastersEndpoint) {
  auto h = agent::ClusterVmHost::Create(LoopbackHostOptions());
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_NE((*h)->data_address(), "127.0.0.1:0") << "port 0 is resolved at Create";
  agent::control::LocalVmPlan plan;
  plan.spec.set_name("x");
  plan.spec.set_vcpus(1);
  plan.spec.mutable_image()->set_path(AGGVM_PROBE_GUEST_ELF);
  plan.node = "node-1";
  plan.node_id = NodeId(1);
  plan.local_vcpus = {VcpuIndex(0)};
  auto* p = plan.topology.add_vcpus();
  p->set_vcpu(0);
  p->set_node_id(1);
  p->set_apic_id(0);
  RecordingOutput out;
  const absl::Status s = (*h)->Prepare(plan, out);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("the master"), std::string::npos) << s;
  EXPECT_EQ((*h)->Start().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ClusterHost, RdmaWithoutADeviceIsAClearError) {
  AGGVM_REQUIRE_KVM();
  auto caps = agent::ProbeNodeCapabilities({});
  ASSERT_TRUE(caps.ok()) << caps.status();
  if (caps->rdma()) GTEST_SKIP() << "this host has an RDMA device";
  auto h = agent::ClusterVmHost::Create(LoopbackHostOptions());
  ASSERT_TRUE(h.ok()) << h.status();
  agent::control::LocalVmPlan plan;
  plan.spec.set_name("r");
  plan.spec.set_vcpus(1);
  plan.spec.set_transport(v1::TRANSPORT_KIND_RDMA);
  plan.spec.mutable_image()->set_path(AGGVM_PROBE_GUEST_ELF);
  plan.node = "node-1";
  plan.node_id = NodeId(1);
  plan.local_vcpus = {VcpuIndex(0)};
  auto* p = plan.topology.add_vcpus();
  p->set_vcpu(0);
  p->set_node_id(1);
  p->set_apic_id(0);
  v1::NodeStatus m;
  m.set_node_id(0);
  m.mutable_data_plane()->set_tcp_address("127.0.0.1:1");
  plan.peers = {m};
  RecordingOutput out;
  const absl::Status s = (*h)->Prepare(plan, out);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("rdma"), std::string::npos) << s;
  EXPECT_NE(s.message().find("no RDMA device"), std::string::npos) << s;  // the transport says what to do
}

std::string ModeName(const ::testing::TestParamInfo<v1::IrqchipMode>& p) {
  return p.param == v1::IRQCHIP_MODE_USER ? "user" : "kernel";
}
INSTANTIATE_TEST_SUITE_P(Irqchip, ClusterHostTest, ::testing::Values(v1::IRQCHIP_MODE_KERNEL, v1::IRQCHIP_MODE_USER),
                         ModeName);

}  // namespace
}  // namespace aggvm::testing
