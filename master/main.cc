// aggvm-master: the cluster's control plane (membership, VM lifecycle, topology, events) and, for each running VM,
// the global interrupt controller on the data plane (NodeId 0). Parses flags, starts the MasterServer and runs until
// SIGINT/SIGTERM.
#include <csignal>
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/thread.h"
#include "master/master_server.h"

int main(int argc, char** argv) {
  CLI::App app{"aggvm master: membership, VM lifecycle and events of an aggvm cluster"};
  aggvm::master::MasterOptions opt;
  uint32_t heartbeat_ms = 500;
  double agent_timeout_s = 30;
  app.add_option("--listen", opt.listen_address, "gRPC listen address host:port")->capture_default_str();
  app.add_option("--heartbeat-ms", heartbeat_ms, "heartbeat interval the agents use")
      ->check(CLI::Range(10u, 60000u))->capture_default_str();
  app.add_option("--lost-after", opt.lost_after_intervals, "missed heartbeat intervals before a node is LOST")
      ->check(CLI::Range(1u, 1000u))->capture_default_str();
  app.add_option("--agent-timeout", agent_timeout_s, "seconds allowed for each call to an agent")
      ->check(CLI::Range(0.1, 3600.0))->capture_default_str();
  app.add_option("--data-listen", opt.data_listen_address,
                 "data-plane (interrupt frames) listen address host:port, announced to the agents as NodeId 0")
      ->capture_default_str();
  int rdma_port = 1;
  app.add_option("--rdma-device", opt.rdma.device, "verbs device for VMs with transport rdma (default: the first)");
  app.add_option("--rdma-port", rdma_port, "its port")->check(CLI::Range(1, 255))->capture_default_str();
  app.add_option("--rdma-gid-index", opt.rdma.gid_index, "GID index (default: automatic, RoCE v2 IPv4 first)");
  app.add_option("--metrics-listen", opt.metrics_listen,
                 "host:port of a Prometheus /metrics endpoint (off unless given; port 0: any)");
  app.add_option("--guest", opt.default_image, "guest ELF for specs that name no image (default: this build's probe guest)");
  std::string cpus, dataplane_cpus;
  app.add_option("--cpus", cpus, "CPUs the master's threads may run on, e.g. 0-1,4 (default: all it may use)");
  app.add_option("--dataplane-cpus", dataplane_cpus,
                 "CPUs of each VM's data-plane thread (the global interrupt controller; default: as --cpus)");
  CLI11_PARSE(app, argc, argv);
  auto process_cpus = aggvm::CpuListFlag("--cpus", cpus);
  auto dp_cpus = aggvm::CpuListFlag("--dataplane-cpus", dataplane_cpus);
  for (const auto* s : {&process_cpus.status(), &dp_cpus.status()}) {
    if (!s->ok()) {
      spdlog::error("{}", std::string(s->message()));
      return 2;
    }
  }
  opt.dataplane_cpus = *dp_cpus;
  // Before any thread starts: every thread inherits the main thread's CPUs.
  if (!process_cpus->empty()) (void)aggvm::PinThisThread(*process_cpus);
  opt.rdma.port = static_cast<uint8_t>(rdma_port);
  opt.heartbeat_interval = absl::Milliseconds(heartbeat_ms);
  opt.agent_call_timeout = absl::Seconds(agent_timeout_s);
  opt.event_log = [](const std::string& line) { spdlog::info("{}", line); };

  // Block the stop signals before any thread starts; the main thread waits for them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  auto server = aggvm::master::MasterServer::Start(opt);
  if (!server.ok()) {
    spdlog::error("{}", std::string(server.status().message()));
    return 1;
  }
  spdlog::info("aggvm-master listening on port {} (heartbeat {} ms, LOST after {} missed); data plane {}{}{}",
               (*server)->port(), heartbeat_ms, opt.lost_after_intervals, opt.data_listen_address,
               process_cpus->empty() ? "" : "; CPUs " + aggvm::FormatCpuList(*process_cpus),
               dp_cpus->empty() ? "" : ", data-plane threads on CPUs " + aggvm::FormatCpuList(*dp_cpus));
  if ((*server)->metrics_port() != 0) {
    spdlog::info("metrics on {} (port {}), GET /metrics", opt.metrics_listen, (*server)->metrics_port());
  }
  int sig = 0;
  sigwait(&stop, &sig);
  spdlog::info("signal {}: shutting down", sig);
  (*server)->Shutdown();
  return 0;
}
