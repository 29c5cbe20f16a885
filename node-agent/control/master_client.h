// The agent's side of membership: registers this node with the master, heartbeats from a background thread
// (registering again when the master answers NOT_FOUND, e.g. after it marked the node LOST), and streams guest output
// to the master (ReportGuestOutput). No gRPC types in this header.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/types.h"
#include "node-agent/control/vm_host.h"
#include "proto/aggvm.pb.h"

namespace aggvm::agent::control {

struct MasterClientOptions {
  std::string master_address;   // host:port of aggvm-master
  std::string node;             // this node's unique name
  std::string control_address;  // host:port where this node's NodeAgent service listens
  v1::DataPlaneEndpoint data_plane;
  v1::NodeCapabilities capabilities;
  std::string software_version;
  absl::Duration rpc_timeout = absl::Seconds(5);
  absl::Duration register_retry = absl::Milliseconds(200);
  /// Called (from the registering thread) after each successful registration.
  std::function<void(NodeId)> on_registered;
  /// Called with one line per notable event (registered, heartbeat refused, master unreachable); may be empty.
  std::function<void(const std::string&)> log;
};

class MasterClient final : public GuestOutput {
 public:
  explicit MasterClient(MasterClientOptions options);
  ~MasterClient() override;
  MasterClient(const MasterClient&) = delete;
  MasterClient& operator=(const MasterClient&) = delete;

  /// Registers, retrying while the master is unreachable or still holds a live registration of this name, until
  /// `deadline` has passed; then starts the heartbeat and output threads. The last error on timeout.
  absl::Status Start(absl::Duration deadline);
  /// Sets the NodeAgent address sent at registration (when it is known only after the client exists). Before Start.
  void set_control_address(std::string address);
  /// One registration attempt (no threads).
  absl::StatusOr<NodeId> RegisterOnce();
  /// Stops the threads (no further heartbeats: the master will mark this node LOST). Idempotent.
  void Stop();

  [[nodiscard]] NodeId node_id() const;
  [[nodiscard]] uint64_t heartbeats_ok() const { return heartbeats_ok_.load(); }
  [[nodiscard]] uint64_t heartbeat_failures() const { return heartbeat_failures_.load(); }
  [[nodiscard]] uint64_t registrations() const { return registrations_.load(); }
  [[nodiscard]] uint64_t output_dropped() const { return output_dropped_.load(); }

  // GuestOutput: queued for the output thread (dropped and counted when the queue is full or the master is away).
  void ConsoleLine(const std::string& vm, VcpuIndex vcpu, std::string_view text) override;
  void Record(const std::string& vm, VcpuIndex vcpu, uint32_t type, uint64_t a, uint64_t b, uint64_t c,
              uint64_t d) override;

 private:
  struct Impl;
  void Enqueue(v1::Event e);
  std::unique_ptr<Impl> impl_;
  std::atomic<uint64_t> heartbeats_ok_{0};
  std::atomic<uint64_t> heartbeat_failures_{0};
  std::atomic<uint64_t> registrations_{0};
  std::atomic<uint64_t> output_dropped_{0};
};

}  // namespace aggvm::agent::control
