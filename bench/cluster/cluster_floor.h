// What the cluster benches share: starting the cluster of processes, and the floors they compare against, measured
// in the same run as the cross-node samples: transport one-way latency between two of the cluster's hosts, and the
// local single-node paths (KVM_SIGNAL_MSI to a guest handler; an IPI round trip between two local vCPUs).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/stats.h"
#include "node-agent/irq_probe.h"
#include "tests/support/cluster_launcher.h"
#include "vcpu/interrupt_injector.h"

namespace aggvm::bench {

/// A bench's cluster: aggvm-master + 3 aggvm-agents (tests/support/cluster_launcher.h), their logs in `logdir`.
struct BenchCluster {
  std::unique_ptr<testing::ClusterLauncher> cluster;
  std::string logdir;   // /tmp/aggvm-<tag>.XXXXXX
  std::string network;  // "netns" or "loopback"
};
/// What every cluster bench does first: checks /dev/kvm, makes SIGINT / SIGTERM set StopRequested() (SIGPIPE
/// ignored), and starts the cluster — as root each process in its own network namespace, this thread in the
/// master's; else (or with `loopback`) on 127.0.0.1. `master_args` / `agent_args` are added to every daemon's flags.
absl::StatusOr<BenchCluster> StartBenchCluster(const std::string& tag, bool loopback,
                                               std::vector<std::string> master_args = {},
                                               std::vector<std::string> agent_args = {});
/// True once SIGINT or SIGTERM arrived.
bool StopRequested();
/// Removes the log directory (after a successful run).
void RemoveLogs(const BenchCluster& b);

/// How TcpOneWayUs measures one way.
enum class OneWay {
  kRoundTripHalf,  // round trip / 2: the far side echoes each frame. Its TCP ACK rides on the echo, and the way back
                   // finds the sender's thread just gone to sleep.
  kStream,         // frames one way only, as a cluster hop sends them: arrival (stamped by the far side after its
                   // recv) - send, on the one CLOCK_MONOTONIC both hosts of this machine share. The receiver's TCP
                   // acknowledges on its own (every second frame, from inside its recv on this kernel).
};
/// TcpTransport one-way latency (64-byte control frames, event wait mode) from host `from` to host `to` of the
/// launcher's topology (namespaces, or loopback), on ports `port` and `port + 1`. Run it with the daemons stopped.
/// pace == 0: back to back (each side's thread has just run when the next frame comes); pace > 0: one frame every
/// `pace` (from the previous send), so the threads sleep in epoll in between, as the data-plane threads do between
/// the cluster's samples. `cpus` non-empty: both threads run on these CPUs (the calling thread's own placement is
/// restored before returning), as a placed cluster's data-plane threads do.
absl::StatusOr<std::vector<double>> TcpOneWayUs(const testing::ClusterLauncher& cluster, int from, int to, size_t n,
                                                int port = 17700, absl::Duration pace = absl::ZeroDuration(),
                                                const std::vector<int>& cpus = {},
                                                OneWay how = OneWay::kRoundTripHalf);

struct LocalMsi {
  std::vector<double> to_handler_us;  // KVM_SIGNAL_MSI (or the user irqchip's MSI) -> guest handler entry
  uint64_t tsc_khz = 0;
};
/// Local MSI -> guest handler entry on a 2-vCPU probe VM (irq-sink), one in flight at a time, the host thread
/// polling for the record. pace == 0: back to back (the vCPU is still halt-polling when the next MSI comes);
/// pace > 0: one MSI every `pace` (measured from the previous injection), so the vCPU has gone to sleep in between,
/// as in the cluster samples.
/// `waiter`: how the injecting thread waits for each record (agent::IrqProbe::Waiter; spinning by default).
/// `cpus` non-empty: the injecting thread and the VM's vCPU threads run on these CPUs (the calling thread's own
/// placement is restored before returning), as a placed node's data-plane and vCPU threads do.
absl::StatusOr<LocalMsi> MeasureLocalMsi(vcpu::IrqchipMode irqchip, size_t n, absl::Duration pace,
                                         agent::IrqProbe::Waiter waiter = agent::IrqProbe::Waiter::kSpin,
                                         const std::vector<int>& cpus = {});

struct LocalIpi {
  std::vector<double> round_trip_us;
  uint64_t tsc_khz = 0;  // KVM_GET_TSC_KHZ of the VM
};
/// IPI round trips (guest rdtsc, ipi-pingpong's PING_ROUND records) between vCPUs 0 and 1 of a local 2-vCPU VM.
absl::StatusOr<LocalIpi> MeasureLocalIpiRoundTrip(vcpu::IrqchipMode irqchip, uint32_t rounds);

/// The median gap between consecutive values (sorted copy), 0 for fewer than two.
double MedianGap(std::vector<double> stamps);

/// A (TSC, CLOCK_MONOTONIC) pair read back to back: the tightest of a few tries.
struct ClockPair {
  uint64_t tsc = 0, ns = 0;
};
ClockPair ReadPair();

nlohmann::json ToJson(const Summary& s);

}  // namespace aggvm::bench
