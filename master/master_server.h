// aggvm-master's control plane as an object: the gRPC Master service (membership, VM lifecycle, topology, events)
// listening on one address, plus the thread that detects lost nodes. No gRPC types in this header: main.cc and the
// tests start it, clients talk to it through proto/aggvm.grpc.pb.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/rdma/verbs.h"

namespace aggvm::master {

struct MasterOptions {
  /// host:port to listen on; port 0 picks a free port (see MasterServer::port()).
  std::string listen_address = "0.0.0.0:7070";
  /// Heartbeat period the agents are told to use, and how many missed periods make a node LOST.
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  uint32_t lost_after_intervals = 3;
  /// Deadline of each call the master makes to an agent (PrepareVm, StartVm, ...).
  absl::Duration agent_call_timeout = absl::Seconds(30);
  /// Guest image for specs that name none ("" = this build's probe guest).
  std::string default_image;
  /// host:port of the master's data-plane transport (NodeId 0), announced to the agents in RegisterNodeResponse and
  /// PrepareVmRequest. Each running VM's data plane listens there (the nodes never dial it over TCP: the master
  /// dials them; a second VM running at the same time gets a free port of the same host).
  std::string data_listen_address = "0.0.0.0:7071";
  /// The verbs device for VMs whose spec asks for TRANSPORT_KIND_RDMA (--rdma-device, --rdma-port, --rdma-gid-index).
  transport::rdma::DeviceSelection rdma;
  /// CPUs of each VM's data-plane thread (--dataplane-cpus; empty = wherever the process may run).
  std::vector<int> dataplane_cpus;
  /// Called with a one-line description of every event (node joined/lost, VM state, console), from one thread.
  std::function<void(const std::string&)> event_log;
  /// host:port of a Prometheus /metrics endpoint ("" = off; port 0 picks a free port, see metrics_port()). The
  /// running VMs' GlobalController counters are read at scrape time (docs/latency-lab.md "Metrics").
  std::string metrics_listen;
};

class MasterServer {
 public:
  /// Binds, starts serving and starts the loss detector. Fails with the address when it cannot bind.
  static absl::StatusOr<std::unique_ptr<MasterServer>> Start(const MasterOptions& options);
  ~MasterServer();
  MasterServer(const MasterServer&) = delete;
  MasterServer& operator=(const MasterServer&) = delete;

  /// The bound port. The same server also serves the Lab service (clock offsets, proto/aggvm.proto).
  [[nodiscard]] int port() const;
  /// The metrics endpoint's port (0 when MasterOptions::metrics_listen is empty).
  [[nodiscard]] int metrics_port() const;
  /// Ends event streams, stops serving (in-flight calls get up to `grace` to finish) and joins the detector.
  /// Idempotent; the destructor calls it.
  void Shutdown(absl::Duration grace = absl::Seconds(2));
  /// Blocks until Shutdown() (from another thread or a signal handler's helper thread).
  void Wait();

 private:
  struct Impl;
  explicit MasterServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace aggvm::master
