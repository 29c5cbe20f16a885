// aggvm-agent: the node agent.
//   --standalone   run the probe guest on this node only and print what it measured (no master).
//   --master ...   cluster mode: register with aggvm-master, serve the NodeAgent gRPC service and run this node's
//                  vCPUs of the VMs the master places here (ClusterVmHost). SIGINT/SIGTERM stop it cleanly.
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/thread.h"
#include "node-agent/cluster_vm_host.h"
#include "lab/trace_record.h"
#include "node-agent/control/agent_control.h"
#include "node-agent/control/agent_metrics.h"
#include "node-agent/standalone.h"

#ifndef AGGVM_DEFAULT_GUEST_ELF
#define AGGVM_DEFAULT_GUEST_ELF ""
#endif

namespace {

struct ClusterFlags {
  std::string master;
  std::string node;
  std::string listen = "0.0.0.0:0";
  std::string data_listen = "0.0.0.0:0";
  std::string advertise_host = "127.0.0.1";
  std::string guest_elf = AGGVM_DEFAULT_GUEST_ELF;
  std::string rdma_device;
  int rdma_port = 1;
  int rdma_gid_index = -1;
  double register_timeout_s = 10;
  double connect_timeout_s = 20;
  std::string metrics_listen;  // "" = no metrics endpoint
  std::string cpus, vcpu_cpus, dataplane_cpus;  // CPU lists ("" = no placement)
};

static_assert(aggvm::lab::kTraceRecordType == aggvm::agent::kTraceRecordType,
              "lab/trace_record.h decodes the records node-agent/cluster_vm_host.h reports");

// Cluster mode: wires ClusterVmHost behind AgentControlPlane, then waits for SIGINT/SIGTERM.
int RunCluster(const ClusterFlags& f) {
  // Block the stop signals in every thread (the ones started below inherit the mask); sigwait takes them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  aggvm::agent::ClusterVmHostOptions hopt;
  std::vector<int> process_cpus;
  {
    auto p = aggvm::CpuListFlag("--cpus", f.cpus);
    auto v = aggvm::CpuListFlag("--vcpu-cpus", f.vcpu_cpus);
    auto d = aggvm::CpuListFlag("--dataplane-cpus", f.dataplane_cpus);
    for (const auto* s : {&p.status(), &v.status(), &d.status()}) {
      if (!s->ok()) {
        spdlog::error("node '{}': {}", f.node, std::string(s->message()));
        return 2;
      }
    }
    process_cpus = *p;
    hopt.vcpu_cpus = *v;
    hopt.dataplane_cpus = *d;
    // Before any thread starts: every thread inherits the main thread's CPUs (the placed ones then move).
    if (!process_cpus.empty()) (void)aggvm::PinThisThread(process_cpus);
  }

  aggvm::transport::rdma::DeviceSelection rdma;
  rdma.device = f.rdma_device;
  rdma.port = static_cast<uint8_t>(f.rdma_port);
  rdma.gid_index = f.rdma_gid_index;
  auto caps = aggvm::agent::ProbeNodeCapabilities(rdma);
  if (!caps.ok()) {
    spdlog::error("node '{}': {}", f.node, std::string(caps.status().message()));
    return 1;
  }
  hopt.data_listen = f.data_listen;
  hopt.advertise_host = f.advertise_host;
  hopt.default_guest_elf = f.guest_elf;
  hopt.rdma = rdma;
  hopt.connect_timeout = absl::Seconds(f.connect_timeout_s);
  hopt.log = [](const std::string& line) { spdlog::info("{}", line); };
  auto host = aggvm::agent::ClusterVmHost::Create(hopt);
  if (!host.ok()) {
    spdlog::error("node '{}': {}", f.node, std::string(host.status().message()));
    return 1;
  }

  // The metrics endpoint starts before the control plane so that it sees the first trace record; it reads the
  // control plane's counters once that exists.
  std::atomic<aggvm::agent::control::AgentControlPlane*> plane{nullptr};
  std::unique_ptr<aggvm::agent::control::AgentMetrics> metrics;
  if (!f.metrics_listen.empty()) {
    auto m = aggvm::agent::control::AgentMetrics::Start(
        f.node, f.metrics_listen,
        [&plane]() -> std::map<std::string, uint64_t> {
          auto* p = plane.load();
          return p ? p->Counters() : std::map<std::string, uint64_t>{};
        },
        [&plane]() -> std::string {
          auto* p = plane.load();
          return p ? p->vm() : std::string();
        });
    if (!m.ok()) {
      spdlog::error("node '{}': {}", f.node, std::string(m.status().message()));
      return 1;
    }
    metrics = std::move(*m);
    spdlog::info("node '{}': metrics on {} (port {}), GET /metrics", f.node, f.metrics_listen, metrics->port());
  }

  aggvm::agent::control::AgentControlOptions copt;
  copt.node = f.node;
  copt.master_address = f.master;
  copt.listen_address = f.listen;
  copt.advertise_host = f.advertise_host;
  copt.data_plane.set_tcp_address((*host)->data_address());
  copt.capabilities = *caps;
  copt.register_deadline = absl::Seconds(f.register_timeout_s);
  copt.log = [](const std::string& line) { spdlog::info("{}", line); };
  if (metrics) {
    copt.record_tap = [m = metrics.get()](uint32_t type, uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
      m->OnRecord(type, a, b, c, d);
    };
  }
  auto agent = aggvm::agent::control::AgentControlPlane::Start(copt, **host);
  if (!agent.ok()) {
    const absl::Status& st = agent.status();
    switch (st.code()) {
      case absl::StatusCode::kUnavailable:
      case absl::StatusCode::kDeadlineExceeded:
        spdlog::error("node '{}': cannot register with the master at {} within {} s: {}; is aggvm-master running "
                      "there? (--master host:port)",
                      f.node, f.master, f.register_timeout_s, std::string(st.message()));
        break;
      case absl::StatusCode::kAlreadyExists:
        spdlog::error("node '{}': the master at {} refused the registration: {}; another agent runs under this name "
                      "(choose another --node, or stop it and wait until the master marks it LOST)",
                      f.node, f.master, std::string(st.message()));
        break;
      default:
        spdlog::error("node '{}': cannot start the agent: {}", f.node, st.ToString());
    }
    return 1;
  }
  plane.store(agent->get());
  std::string placement;
  if (!process_cpus.empty()) placement += "; CPUs " + aggvm::FormatCpuList(process_cpus);
  if (!hopt.vcpu_cpus.empty()) placement += "; vCPU threads on CPUs " + aggvm::FormatCpuList(hopt.vcpu_cpus);
  if (!hopt.dataplane_cpus.empty()) placement += "; data-plane thread on CPUs " + aggvm::FormatCpuList(hopt.dataplane_cpus);
  spdlog::info("node '{}' (id {}) serving on port {}, data plane {} (listening on {}), kvm{}{}{}", f.node,
               (*agent)->node_id().value(), (*agent)->port(), (*host)->data_address(), (*host)->listen_address(),
               caps->split_irqchip() ? ", split irqchip" : "", caps->rdma() ? ", rdma" : "", placement);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  spdlog::info("node '{}': {} received, stopping", f.node, sig == SIGINT ? "SIGINT" : "SIGTERM");
  (*agent)->Shutdown();     // stops heartbeats and the service; stops a held VM through the host
  (void)(*host)->Stop();    // idempotent: vCPUs, data-plane thread, transport
  plane.store(nullptr);
  metrics.reset();          // nothing reports records any more; no scrape reads the control plane from here on
  agent->reset();
  host->reset();
  spdlog::info("node '{}' stopped", f.node);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"aggvm node agent"};
  bool standalone = false;
  aggvm::agent::StandaloneOptions opt;
  opt.guest_elf = AGGVM_DEFAULT_GUEST_ELF;
  std::string json_file;
  double timeout_s = 120;
  app.add_flag("--standalone", standalone, "run the probe guest on this node only (no master)");
  app.add_option("--vcpus", opt.vcpus, "number of vCPUs")->check(CLI::Range(1, 64));
  app.add_option("--workload", opt.workload, "hello | ipi-pingpong | irq-sink | exit-loop | bad-port | unmapped | triple-fault");
  app.add_option("--iterations", opt.iterations, "rounds / samples (default 1000)");
  app.add_flag("--xapic", opt.xapic, "guest uses its LAPIC in xAPIC (MMIO) mode instead of x2APIC");
  std::string irqchip = "kernel";
  app.add_option("--irqchip", irqchip,
                 "where the local APICs live: kernel (KVM's, split irqchip) | user (LAPIC models in userspace, "
                 "KVM_INTERRUPT)")
      ->check(CLI::IsMember({"kernel", "user"}))
      ->capture_default_str();
  app.add_option("--guest", opt.guest_elf, "probe guest ELF")->capture_default_str();
  app.add_option("--timeout", timeout_s, "seconds before the run is declared hung")->capture_default_str();
  app.add_option("--json", json_file, "also write the results as JSON to this file");

  ClusterFlags cf;
  app.add_option("--master", cf.master, "cluster mode: host:port of aggvm-master");
  app.add_option("--node", cf.node, "cluster mode: this node's unique name");
  app.add_option("--listen", cf.listen, "cluster mode: host:port of the NodeAgent gRPC service (port 0: any)")
      ->capture_default_str();
  app.add_option("--data-listen", cf.data_listen,
                 "cluster mode: host:port of the data plane (tcp transport / rdma bootstrap; port 0: any)")
      ->capture_default_str();
  app.add_option("--advertise-host", cf.advertise_host,
                 "cluster mode: host the master uses to reach this node's wildcard listen addresses")
      ->capture_default_str();
  app.add_option("--rdma-device", cf.rdma_device, "cluster mode: RDMA device for VMs with transport rdma (default: first)");
  app.add_option("--rdma-port", cf.rdma_port, "cluster mode: RDMA port")->capture_default_str();
  app.add_option("--rdma-gid-index", cf.rdma_gid_index, "cluster mode: RDMA GID index (-1: automatic)")
      ->capture_default_str();
  app.add_option("--register-timeout", cf.register_timeout_s, "cluster mode: seconds to keep trying to register")
      ->capture_default_str();
  app.add_option("--metrics-listen", cf.metrics_listen,
                 "cluster mode: host:port of a Prometheus /metrics endpoint (off unless given; port 0: any)");
  app.add_option("--connect-timeout", cf.connect_timeout_s, "cluster mode: seconds for a VM's data-plane mesh set-up")
      ->capture_default_str();
  app.add_option("--cpus", cf.cpus, "cluster mode: CPUs this agent's threads may run on, e.g. 0-1,4 (default: all)");
  app.add_option("--vcpu-cpus", cf.vcpu_cpus, "cluster mode: CPUs of the VM's vCPU threads and proxy vCPUs");
  app.add_option("--dataplane-cpus", cf.dataplane_cpus,
                 "cluster mode: CPUs of the data-plane thread (interrupt frames in and out; a doorbell train's thread "
                 "inherits them)");
  CLI11_PARSE(app, argc, argv);
  if (!standalone) {
    if (cf.master.empty() || cf.node.empty()) {
      spdlog::error("choose a mode: --standalone, or --master HOST:PORT --node NAME [--listen HOST:PORT] "
                    "[--data-listen HOST:PORT]");
      return 2;
    }
    if (!opt.guest_elf.empty()) cf.guest_elf = opt.guest_elf;
    return RunCluster(cf);
  }
  opt.timeout = absl::Seconds(timeout_s);
  auto mode = aggvm::vcpu::ParseIrqchipMode(irqchip);
  if (!mode.ok()) {
    spdlog::error("{}", mode.status().ToString());
    return 2;
  }
  opt.irqchip = *mode;

  spdlog::info("running workload {} on {} vCPU(s), {} irqchip, with {}", opt.workload, opt.vcpus, irqchip,
               opt.guest_elf);
  auto result = aggvm::agent::RunStandalone(opt);
  if (!result.ok()) {
    spdlog::error("{}", result.status().ToString());
    return 1;
  }
  std::fputs(aggvm::agent::FormatResult(*result).c_str(), stdout);
  if (!json_file.empty()) {
    std::ofstream out(json_file);
    out << aggvm::agent::ResultToJson(*result).dump(2) << "\n";
    if (!out) {
      spdlog::error("cannot write {}", json_file);
      return 1;
    }
  }
  return 0;
}
