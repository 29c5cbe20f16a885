// aggvm-bench: runs a latency experiment (lab/runner/experiment.h) on the local cluster — aggvm-master and the
// agents started here, as root each in its own network namespace (tests/support/cluster_launcher.h) — or on a
// running cluster (--master host:port), and writes the results: the table on stdout, DIR/NAME.json, DIR/NAME.csv
// and with --plot the CDF and per-hop plots (the same as `aggvm-plot DIR/NAME.json --out DIR`).
//
//   aggvm-bench EXPERIMENT.json [--out DIR] [--master HOST:PORT] [--loopback] [--plot]
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "lab/plot.h"
#include "lab/results.h"
#include "lab/runner/runner.h"
#include "lab/table.h"
#include "tests/support/cluster_launcher.h"

#ifndef AGGVM_MASTER_BIN
#define AGGVM_MASTER_BIN "aggvm-master"
#endif
#ifndef AGGVM_AGENT_BIN
#define AGGVM_AGENT_BIN "aggvm-agent"
#endif

namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "aggvm-bench: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  namespace lab = aggvm::lab;
  CLI::App app{"aggvm-bench: run a latency experiment on the local cluster or on a running one"};
  std::string experiment_path, out_dir = ".", master, master_bin = AGGVM_MASTER_BIN, agent_bin = AGGVM_AGENT_BIN;
  bool loopback = false, plot = false;
  app.add_option("experiment", experiment_path, "experiment file (JSON, see docs/latency-lab.md)")->required();
  app.add_option("--out", out_dir, "directory for NAME.json, NAME.csv and the plots")->capture_default_str();
  app.add_option("--master", master, "host:port of a running aggvm-master (default: start a local cluster)");
  app.add_flag("--loopback", loopback, "local cluster on 127.0.0.1 even as root (no network namespaces)");
  app.add_flag("--plot", plot, "also write the plots (gnuplot)");
  app.add_option("--master-bin", master_bin, "aggvm-master for the local cluster")->capture_default_str();
  app.add_option("--agent-bin", agent_bin, "aggvm-agent for the local cluster")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto text = lab::ReadFile(experiment_path);
  if (!text.ok()) return Fail(std::string(text.status().message()));
  auto experiment = lab::runner::Experiment::FromJsonString(*text);
  if (!experiment.ok()) return Fail(fmt::format("{}: {}", experiment_path, std::string(experiment.status().message())));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return Fail(fmt::format("cannot create --out {}: {}", out_dir, ec.message()));

  const std::string stem = (std::filesystem::path(out_dir) / experiment->name).string();
  if (std::filesystem::weakly_canonical(stem + ".json", ec) == std::filesystem::weakly_canonical(experiment_path, ec)) {
    return Fail(fmt::format("the results would overwrite the experiment file {}; choose another --out directory",
                            experiment_path));
  }

  lab::runner::RunOptions ro;
  ro.progress = [](const std::string& line) {
    std::fprintf(stderr, "%s\n", line.c_str());
  };
  std::unique_ptr<aggvm::testing::ClusterLauncher> cluster;
  std::string logs;
  if (master.empty()) {
    char tmpl[] = "/tmp/aggvm-bench.XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return Fail("mkdtemp failed");
    logs = tmpl;
    aggvm::testing::ClusterOptions co;
    co.agents = static_cast<int>(experiment->nodes);
    co.tag = "lab";
    co.master_bin = master_bin;
    co.agent_bin = agent_bin;
    co.loopback = loopback;
    co.base_port = 18570;
    co.log_dir = logs;
    co.heartbeat_ms = 200;
    auto c = aggvm::testing::ClusterLauncher::Start(co);
    if (!c.ok()) return Fail(fmt::format("local cluster: {} (logs in {})", std::string(c.status().message()), logs));
    cluster = std::move(*c);
    ro.master_address = cluster->grpc_address(0);
    ro.cluster = fmt::format("local: aggvm-master + {} aggvm-agents {}", co.agents,
                             cluster->in_namespaces() ? "each in its own network namespace (veth bridge)"
                                                      : "on 127.0.0.1");
  } else {
    ro.master_address = master;
    ro.cluster = fmt::format("running cluster, master at {}", master);
  }
  std::fprintf(stderr, "aggvm-bench: experiment '%s', %zu configurations, %s\n", experiment->name.c_str(),
               experiment->Expand().size(), ro.cluster.c_str());
  auto result = lab::runner::RunExperiment(*experiment, ro);
  if (cluster) {
    cluster->StopAll();
    cluster.reset();
  }
  if (!result.ok()) {
    return Fail(fmt::format("{}{}", std::string(result.status().message()), logs.empty() ? "" : " (daemon logs in " + logs + ")"));
  }
  if (auto s = lab::WriteFile(stem + ".json", result->ToJsonString()); !s.ok()) return Fail(std::string(s.message()));
  if (auto s = lab::WriteFile(stem + ".csv", result->ToCsv()); !s.ok()) return Fail(std::string(s.message()));
  std::fputs(lab::FormatTable(*result).c_str(), stdout);
  std::printf("results: %s.json, %s.csv\n", stem.c_str(), stem.c_str());
  if (plot) {
    auto images = lab::WritePlots(*result, out_dir, experiment->name);
    if (!images.ok()) return Fail(std::string(images.status().message()));
    for (const auto& p : *images) std::printf("plot: %s\n", p.c_str());
  }
  if (!logs.empty()) std::filesystem::remove_all(logs, ec);
  return 0;
}
