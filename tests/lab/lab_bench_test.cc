// aggvm-bench end to end: a tiny experiment file (2 configurations that run on tcp, 2 that ask for rdma) runs on the
// local cluster the binary starts itself (master + 2 agents as processes, in namespaces as root); the results file
// parses, records the configuration, software version, machine and clock offsets; the rdma configurations are
// refused with a status that says why; the cross-node trace hops have no clock anomaly; aggvm-plot turns the file
// into non-empty PNG and SVG images. Needs /dev/kvm (and root for the namespaces).
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "lab/results.h"
#include "lab/runner/experiment.h"
#include "tests/support/require.h"

namespace aggvm::lab {
namespace {

int RunCommand(const std::string& cmd, std::string* output) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) output->append(buf, n);
  const int st = ::pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// Writes `json` as DIR/NAME-experiment.json, runs aggvm-bench on it (results into DIR) and parses DIR/NAME.json.
// `output` gets what aggvm-bench printed (for failure messages).
absl::StatusOr<ExperimentResult> RunBench(const std::string& dir, const std::string& name, const std::string& json,
                                          std::string* output) {
  const std::string path = fmt::format("{}/{}-experiment.json", dir, name);
  std::ofstream(path) << json;
  if (const int rc = RunCommand(fmt::format("{} {} --out {}", AGGVM_BENCH_BIN, path, dir), output); rc != 0) {
    return absl::InternalError(fmt::format("aggvm-bench exited with {}: {}", rc, *output));
  }
  auto text = ReadFile(fmt::format("{}/{}.json", dir, name));
  if (!text.ok()) return text.status();
  return ExperimentResult::FromJsonString(*text);
}

TEST(LabBench, TinyExperimentRunsEndToEndAndPlots) {
  AGGVM_REQUIRE_KVM();
  char tmpl[] = "/tmp/aggvm-labbench.XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  std::string out;
  auto r = RunBench(dir, "tiny", R"({
    // comments are allowed in experiment files
    "name": "tiny", "workload": "doorbell", "samples": 24, "warmup": 4, "max_seconds": 60,
    "trace_cost": true, "clock_samples": 8,
    "matrix": {"transport": ["tcp-epoll", "rdma"], "routing_policy": ["sdm", "round-robin"]}
  })", &out);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->name, "tiny");
  EXPECT_EQ(r->software_version, SoftwareVersion());
  EXPECT_GT(r->machine.cores, 0u);
  EXPECT_NE(r->machine.cpu_model, "");
  EXPECT_NE(r->cluster.find("local"), std::string::npos) << r->cluster;
  // The experiment as run, defaults filled, is in the file: it parses back into the same experiment.
  auto again = runner::Experiment::FromJsonString(r->experiment_json);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->Expand().size(), 4u);
  // Clock offsets of both nodes at the start and the end; one machine: 0 within the uncertainty.
  ASSERT_EQ(r->clocks.size(), 4u);
  for (const auto& c : r->clocks) {
    EXPECT_EQ(c.error, "") << c.node;
    EXPECT_LE(std::abs(c.offset_ns), c.uncertainty_ns + 1.0) << c.node << " " << c.phase;
  }
  ASSERT_EQ(r->configurations.size(), 4u);
  int ran = 0;
  for (const auto& c : r->configurations) {
    SCOPED_TRACE(c.Label());
    EXPECT_EQ(c.config.at("workload"), "doorbell");
    if (c.config.at("transport") == "rdma") {  // no RDMA device on these machines: refused, and says why
      EXPECT_NE(c.status.find("skipped: node 'node-a' has no RDMA device"), std::string::npos) << c.status;
      EXPECT_EQ(c.hops.samples(), 0u);
      continue;
    }
    ran += 1;
    ASSERT_EQ(c.status, "ok");
    // trace_cost alternates traced and untraced rings: half of them carry a trace block.
    EXPECT_GE(c.hops.samples(), 8u);
    EXPECT_GT(c.measurements.at("trace_off_samples"), 0);
    EXPECT_GT(c.measurements.at("trace_cost_ratio_p50"), 0);
    // The trace block's stamps (raising node, master, target node) are non-decreasing along the path once each node's
    // clock mapping is refined by causality within the probes' uncertainty (on one machine nothing needs more).
    EXPECT_EQ(c.measurements.at("clock_causal_violations"), 0);
    for (const auto& node : {"node-a", "node-b"}) {
      EXPECT_TRUE(c.measurements.contains(fmt::format("clock_causal_correction_ns.{}", node))) << node;
    }
    for (Hop h : {Hop::kRaisedToLocalController, Hop::kLocalControllerToMasterReceived, Hop::kMasterReceivedToDecided,
                  Hop::kDecidedToTargetReceived, Hop::kTargetReceivedToInjected}) {
      EXPECT_EQ(c.hops.hop(h).clock_anomalies, 0u) << HopName(h);
      EXPECT_EQ(c.hops.hop(h).missing, 0u) << HopName(h);
    }
    const auto& e2e = c.hops.hop(Hop::kEndToEnd).histogram;
    EXPECT_EQ(e2e.count(), c.hops.samples());
    EXPECT_GT(e2e.Percentile(50), 1'000u) << "a cross-node interrupt takes more than a microsecond";
    EXPECT_LT(e2e.Percentile(50), 1'000'000'000u);
  }
  EXPECT_EQ(ran, 2);
  // The CSV next to it is the file's own CSV.
  auto csv = ReadFile(dir + "/tiny.csv");
  ASSERT_TRUE(csv.ok());
  EXPECT_EQ(*csv, r->ToCsv());

  // One command turns the file into its plots.
  std::string plot_out;
  ASSERT_EQ(RunCommand(fmt::format("{} {}/tiny.json --out {}/plots", AGGVM_PLOT_BIN, dir, dir), &plot_out), 0) << plot_out;
  for (const char* name : {"tiny-cdf.png", "tiny-hops.png", "tiny-cdf.svg", "tiny-hops.svg"}) {
    const std::string path = fmt::format("{}/plots/{}", dir, name);
    auto bytes = ReadFile(path);
    ASSERT_TRUE(bytes.ok()) << path;
    EXPECT_GT(bytes->size(), 1000u) << path;
    if (std::string(name).ends_with(".png")) {
      EXPECT_EQ(bytes->substr(1, 3), "PNG") << path;
    } else {
      EXPECT_NE(bytes->find("<svg"), std::string::npos) << path;
    }
  }
  if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
}

// The IPI workloads: rounds come back from the sender's guest records and land in end_to_end, each within what a
// cross-node round can take; a broadcast over three nodes counts its two recipients.
TEST(LabBench, IpiWorkloadsMeasureGuestRounds) {
  AGGVM_REQUIRE_KVM();
  char tmpl[] = "/tmp/aggvm-labipi.XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  struct Run {
    const char* name;
    const char* json;
    size_t configurations;
    double recipients;  // 0: not a broadcast
  };
  const Run runs[] = {
      {"pp", R"({"name": "pp", "workload": "ipi-pingpong", "samples": 20, "warmup": 2, "clock_samples": 4})", 1, 0},
      {"bc", R"({"name": "bc", "workload": "ipi-broadcast", "nodes": 3, "samples": 20, "warmup": 2,
                 "clock_samples": 4, "matrix": {"irqchip": ["kernel", "user"]}})",
       2, 2},
  };
  for (const auto& run : runs) {
    SCOPED_TRACE(run.name);
    std::string out;
    auto r = RunBench(dir, run.name, run.json, &out);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->configurations.size(), run.configurations);
    for (const auto& c : r->configurations) {
      SCOPED_TRACE(c.Label());
      ASSERT_EQ(c.status, "ok") << out;
      EXPECT_EQ(c.measurements.at("metric_end_to_end_is_round_trip"), 1);
      if (run.recipients > 0) {
        EXPECT_EQ(c.measurements.at("recipients"), run.recipients);
      }
      const auto& e2e = c.hops.hop(Hop::kEndToEnd).histogram;
      EXPECT_EQ(e2e.count(), 20u) << "one sample per measured round (warm-up rounds left out)";
      EXPECT_GT(e2e.Percentile(50), 1'000u) << "a cross-node round takes more than a microsecond";
      EXPECT_LT(e2e.Percentile(50), 1'000'000'000u);
    }
  }
  if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
}

// The A/A control of the tracing-cost comparison: two groups of doorbells, neither traced — no trace record comes
// back, both groups are timed, and the ratio is near 1 (a loose bound: it only has to catch a group that is traced).
TEST(LabBench, TraceCostControlTracesNeitherGroup) {
  AGGVM_REQUIRE_KVM();
  char tmpl[] = "/tmp/aggvm-labaa.XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  std::string out;
  auto r = RunBench(dir, "aa", R"({"name": "aa", "workload": "doorbell", "samples": 20, "warmup": 2,
                                   "clock_samples": 4, "trace_cost": true, "trace_cost_control": true})",
                    &out);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->configurations.size(), 1u);
  const auto& c = r->configurations.front();
  ASSERT_EQ(c.status, "ok") << out;
  EXPECT_EQ(c.measurements.at("trace_cost_control"), 1);
  EXPECT_EQ(c.hops.samples(), 0u) << "no ring of an A/A run is traced";
  EXPECT_EQ(c.measurements.at("trace_on_samples"), 10);
  EXPECT_EQ(c.measurements.at("trace_off_samples"), 10);
  EXPECT_GT(c.measurements.at("trace_cost_ratio_p50"), 0.2);
  EXPECT_LT(c.measurements.at("trace_cost_ratio_p50"), 5.0);
  if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace aggvm::lab
