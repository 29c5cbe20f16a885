// Cluster membership on the master: node registration (name -> data-plane NodeId), heartbeats, loss detection.
//
// Pure bookkeeping with the time passed in (tests drive it with made-up times); the master service serialises calls.
// Rules:
//  - a node registers with a unique name; while that name is UP a second registration is refused (ALREADY_EXISTS);
//  - a node keeps its NodeId when it registers again after being LOST (ids 1..65535; 0 is the master);
//  - each registration gets a fresh incarnation; a heartbeat must carry the current one, else NOT_FOUND (register
//    again) — so a stale agent process cannot keep a newer registration alive;
//  - a node whose last heartbeat is older than `lost_after` is marked LOST by Sweep(), once.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/types.h"
#include "proto/aggvm.pb.h"

namespace aggvm::master {

struct NodeRecord {
  std::string name;
  NodeId id;
  uint64_t incarnation = 0;
  std::string control_address;
  v1::DataPlaneEndpoint data_plane;
  v1::NodeCapabilities capabilities;
  std::string software_version;
  v1::NodeHealth health = v1::NODE_HEALTH_UP;
  absl::Time registered_at;
  absl::Time last_heartbeat;
};

class Membership {
 public:
  /// A node is LOST after `lost_after_intervals` heartbeat intervals without a heartbeat.
  Membership(absl::Duration heartbeat_interval, uint32_t lost_after_intervals);

  absl::StatusOr<NodeRecord> Register(const v1::RegisterNodeRequest& req, absl::Time now);
  absl::Status Heartbeat(const v1::HeartbeatRequest& req, absl::Time now);
  /// Marks every UP node whose last heartbeat is older than lost_after() as LOST and returns those nodes.
  std::vector<NodeRecord> Sweep(absl::Time now);

  [[nodiscard]] std::optional<NodeRecord> Find(const std::string& name) const;
  [[nodiscard]] std::vector<NodeRecord> Nodes() const;  // by node id
  /// The status message of `node` (vm is left empty: the master fills it).
  [[nodiscard]] v1::NodeStatus Status(const NodeRecord& node, absl::Time now) const;

  [[nodiscard]] absl::Duration heartbeat_interval() const { return interval_; }
  [[nodiscard]] absl::Duration lost_after() const { return lost_after_; }

 private:
  absl::Duration interval_;
  absl::Duration lost_after_;
  std::map<std::string, NodeRecord> nodes_;
  uint16_t next_id_ = 1;
  uint64_t next_incarnation_ = 1;
};

}  // namespace aggvm::master
