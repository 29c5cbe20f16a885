// The latency lab against a real cluster: aggvm-master and two aggvm-agents as processes (each in its own network
// namespace as root, tests/support/cluster_launcher.h) with --metrics-listen, a probe-guest VM of 2 nodes x 1 vCPU,
// traced doorbells on node-a routed to the vCPU on node-b.
//  - the Prometheus endpoints of the master and both agents parse, and their counters move by what was rung;
//  - every trace record of the cross-node run has non-decreasing stamps along raised -> master -> target -> injected;
//  - Lab.ProbeClocks: on one machine every offset is 0 within its (RTT/2) uncertainty.
// Needs root (namespaces; loopback otherwise) and /dev/kvm.
#include <cmath>
#include <filesystem>
#include <memory>
#include <regex>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "lab/results.h"
#include "lab/trace_record.h"
#include "proto/aggvm.grpc.pb.h"
#include "tests/lab/scrape.h"
#include "tests/support/cluster_launcher.h"
#include "tests/support/require.h"

namespace aggvm::testing {
namespace {

namespace v1 = ::aggvm::v1;

constexpr uint32_t kIrqRecord = 2, kHelloRecord = 1;
constexpr uint32_t kGsi = 4, kVector = 0x44;

// "metrics on ... (port N)" from a daemon's log.
int MetricsPort(const std::string& log_dir, const std::string& who) {
  for (int tries = 0; tries < 100; ++tries) {
    auto log = lab::ReadFile(fmt::format("{}/{}.log", log_dir, who));
    const std::string text = log.ok() ? *log : "";
    std::smatch m;
    static const std::regex re(R"(metrics on \S+ \(port (\d+)\))");
    if (std::regex_search(text, m, re)) return std::stoi(m[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

class LabCluster : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/aggvm-labtest.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    log_dir_ = tmpl;
    ClusterOptions o;
    o.agents = 2;
    o.tag = "labt";
    o.master_bin = AGGVM_MASTER_BIN;
    o.agent_bin = AGGVM_AGENT_BIN;
    o.base_port = 19570;
    o.log_dir = log_dir_;
    o.master_args = {"--metrics-listen", "0.0.0.0:0"};
    o.agent_args = {"--metrics-listen", "0.0.0.0:0"};
    auto c = ClusterLauncher::Start(o);
    if (!c.ok()) {
      error_ = c.status().ToString();
      return;
    }
    cluster_ = std::move(*c);
  }
  static void TearDownTestSuite() {
    cluster_.reset();
    std::error_code ec;
    if (!::testing::Test::HasFailure()) std::filesystem::remove_all(log_dir_, ec);
  }
  void SetUp() override {
    AGGVM_REQUIRE_KVM();
    ASSERT_NE(cluster_, nullptr) << error_;
  }

  std::map<std::string, double> Scrape(int i) {
    const int port = MetricsPort(log_dir_, ClusterLauncher::NodeName(i));
    EXPECT_NE(port, 0) << "no metrics port in " << ClusterLauncher::NodeName(i) << ".log";
    auto body = HttpGetMetrics(cluster_->host(i), port);
    EXPECT_TRUE(body.ok()) << body.status();
    if (!body.ok()) return {};
    auto parsed = ParseExposition(*body);
    EXPECT_TRUE(parsed.ok()) << parsed.status();
    return parsed.ok() ? *parsed : std::map<std::string, double>{};
  }

  static inline std::unique_ptr<ClusterLauncher> cluster_;
  static inline std::string log_dir_, error_;
};

v1::VmSpec Spec(const std::string& name) {
  v1::VmSpec spec;
  spec.set_name(name);
  spec.set_vcpus(2);
  for (int i = 0; i < 2; ++i) {
    auto* p = spec.add_placement();
    p->set_node(ClusterLauncher::NodeName(i + 1));
    p->add_vcpus(i);
  }
  spec.set_memory_mib(64);
  spec.set_transport(v1::TRANSPORT_KIND_TCP);
  spec.set_wait_mode(v1::WAIT_MODE_EVENT);
  spec.mutable_workload()->set_name("irq-sink");
  auto* r = spec.add_interrupt_routes();
  r->set_gsi(kGsi);
  r->set_vector(kVector);
  r->set_delivery(v1::INTERRUPT_DELIVERY_FIXED);
  r->set_dest_mode(v1::DESTINATION_MODE_PHYSICAL);
  r->set_destination(1);  // vCPU 1 on node-b
  return spec;
}

grpc::Status RingTraced(v1::Master::Stub& stub, const std::string& vm) {
  v1::RingDoorbellRequest req;
  req.set_vm(vm);
  req.set_node("node-a");
  req.set_gsi(kGsi);
  req.set_asserted(true);
  req.set_traced(true);
  v1::RingDoorbellResponse resp;
  return Call([&](grpc::ClientContext& c) { return stub.RingDoorbell(&c, req, &resp); }, 5);
}

TEST_F(LabCluster, MetricsMoveWithInterruptsAndTraceStampsAreNonDecreasing) {
  const std::string vm = "labmetrics";
  ASSERT_TRUE(CreateVm(cluster_->stub(), Spec(vm)).ok());
  VmWatch watch(cluster_->stub(), vm);
  ASSERT_TRUE(Lifecycle(cluster_->stub(), "start", vm).ok());
  ASSERT_TRUE(watch.RecordAt(kHelloRecord, 1, absl::Seconds(60))) << "both vCPUs say HELLO";

  auto m0 = Scrape(0), a0 = Scrape(1), b0 = Scrape(2);
  // The endpoints describe the running VM.
  EXPECT_EQ(Sum(m0, "aggvm_vms_running"), 1);
  EXPECT_EQ(Sum(m0, "aggvm_nodes", {R"(health="up")"}), 2);
  EXPECT_EQ(Sum(b0, "aggvm_agent_vm_held", {R"(vm="labmetrics")"}), 1);

  constexpr int kRings = 25;
  for (int i = 0; i < kRings; ++i) {
    ASSERT_TRUE(RingTraced(cluster_->stub(), vm).ok());
    ASSERT_TRUE(watch.RecordAt(kIrqRecord, static_cast<size_t>(i), absl::Seconds(5))) << "ring " << i;
    ASSERT_TRUE(watch.RecordAt(lab::kTraceRecordType, static_cast<size_t>(i), absl::Seconds(5))) << "trace " << i;
  }
  auto m1 = Scrape(0), a1 = Scrape(1), b1 = Scrape(2);
  const std::string on_vm = R"(vm="labmetrics")";
  // node-a raised them, the master routed and delivered them, node-b injected them.
  EXPECT_GE(Sum(a1, "aggvm_interrupts_raised_total", {on_vm}) - Sum(a0, "aggvm_interrupts_raised_total", {on_vm}),
            kRings);
  EXPECT_GE(Sum(m1, "aggvm_interrupts_routed_total", {on_vm}) - Sum(m0, "aggvm_interrupts_routed_total", {on_vm}),
            kRings);
  EXPECT_GE(Sum(m1, "aggvm_interrupts_delivered_total", {on_vm}) -
                Sum(m0, "aggvm_interrupts_delivered_total", {on_vm}),
            kRings);
  EXPECT_GE(Sum(b1, "aggvm_interrupts_delivered_total", {on_vm}) -
                Sum(b0, "aggvm_interrupts_delivered_total", {on_vm}),
            kRings);
  EXPECT_GE(Sum(b1, "aggvm_frames_received_total", {on_vm}) - Sum(b0, "aggvm_frames_received_total", {on_vm}), kRings);
  EXPECT_GE(Sum(a1, "aggvm_frames_sent_total", {on_vm}) - Sum(a0, "aggvm_frames_sent_total", {on_vm}), kRings);
  EXPECT_EQ(Sum(b1, "aggvm_frames_bad_total", {on_vm}), 0);
  EXPECT_EQ(Sum(b1, "aggvm_interrupts_dropped_total", {on_vm}), 0);
  EXPECT_EQ(Sum(m1, "aggvm_interrupts_dropped_total", {on_vm}), 0);
  // node-b's hop histograms saw every traced interrupt.
  EXPECT_GE(Sum(b1, "aggvm_hop_latency_seconds_count", {R"(hop="raised->injected")"}) -
                Sum(b0, "aggvm_hop_latency_seconds_count", {R"(hop="raised->injected")"}),
            kRings);
  EXPECT_GT(Sum(b1, "aggvm_hop_latency_seconds_sum", {R"(hop="raised->injected")"}), 0);
  EXPECT_GE(Sum(b1, "aggvm_hop_latency_seconds_count", {R"(hop="raised->local_controller")"}) -
                Sum(b0, "aggvm_hop_latency_seconds_count", {R"(hop="raised->local_controller")"}),
            kRings)
      << "the record carries the local controller's stamp (word d)";
  EXPECT_GE(Sum(b1, "aggvm_traced_interrupts_total"), kRings);

  // Every trace record: raised (node-a) <= master_received <= master_decided (master) <= target_received <= injected
  // (node-b), all stamped, on the one CLOCK_MONOTONIC these processes share.
  const auto traces = watch.records(lab::kTraceRecordType);
  ASSERT_GE(traces.size(), static_cast<size_t>(kRings));
  for (const auto& r : traces) {
    EXPECT_EQ(r.node(), "node-b");
    const transport::TraceBlock t = lab::DecodeTraceRecord(r.a(), r.b(), r.c(), r.d());
    const uint64_t path[] = {t.raised,         t.local_controller, t.master_received,
                             t.master_decided, t.target_received,  t.injected};
    for (size_t i = 0; i < std::size(path); ++i) {
      EXPECT_NE(path[i], 0u) << "stamp " << i << " missing";
      if (i > 0) {
        EXPECT_LE(path[i - 1], path[i]) << "stamp " << i << " earlier than stamp " << i - 1;
      }
    }
    EXPECT_LT(t.injected - t.raised, 1'000'000'000u) << "a cross-node interrupt took more than a second";
  }
  ASSERT_TRUE(Lifecycle(cluster_->stub(), "stop", vm).ok());
}

TEST_F(LabCluster, ClockOffsetsOnOneMachineAreZeroWithinTheirUncertainty) {
  auto lab = v1::Lab::NewStub(grpc::CreateChannel(cluster_->grpc_address(0), grpc::InsecureChannelCredentials()));
  v1::ProbeClocksRequest req;
  req.set_samples(32);
  v1::ProbeClocksResponse resp;
  ASSERT_TRUE(Call([&](grpc::ClientContext& c) { return lab->ProbeClocks(&c, req, &resp); }).ok());
  ASSERT_EQ(resp.nodes_size(), 2) << resp.DebugString();
  for (const auto& n : resp.nodes()) {
    SCOPED_TRACE(n.DebugString());
    EXPECT_EQ(n.error(), "");
    EXPECT_EQ(n.samples(), 32u);
    EXPECT_GT(n.rtt_min_ns(), 0u);
    // RTT_min/2, or more when several probes share the minimum RTT (lab/clock_offset.h): their midpoint offsets,
    // each within RTT_min/2 of the true one, are averaged, and the bound is widened by the average's distance to the
    // nearest of them — at most RTT_min/2 — so it stays within [RTT_min/2, RTT_min].
    const double half = static_cast<double>(n.rtt_min_ns()) / 2;
    EXPECT_GE(n.uncertainty_ns(), half);
    EXPECT_LE(n.uncertainty_ns(), 2 * half + 1.0);
    // The true offset is 0 here and the bound is hard (t_remote lies between send and receive).
    EXPECT_LE(std::abs(n.offset_ns()), n.uncertainty_ns() + 1.0);
    EXPECT_LT(n.uncertainty_ns(), 50e6) << "a control-plane round trip under 100 ms";
    EXPECT_GT(n.node_tsc(), 0u);
    EXPECT_GT(n.node_tsc_monotonic_ns(), 0u);
  }
  // aggvmctl shows the same, one line per node.
  std::string out;
  FILE* p = ::popen(fmt::format("{} --master {} clocks --samples 8 2>&1", AGGVMCTL_BIN, cluster_->grpc_address(0)).c_str(),
                    "r");
  ASSERT_NE(p, nullptr);
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  EXPECT_EQ(::pclose(p), 0) << out;
  EXPECT_NE(out.find("8 probes per node"), std::string::npos) << out;
  for (const char* node : {"node-a", "node-b"}) EXPECT_NE(out.find(node), std::string::npos) << out;
  // Too many samples are refused with the limit.
  req.set_samples(100000);
  auto st = Call([&](grpc::ClientContext& c) { return lab->ProbeClocks(&c, req, &resp); });
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("limit"), std::string::npos) << st.error_message();
}

}  // namespace
}  // namespace aggvm::testing
