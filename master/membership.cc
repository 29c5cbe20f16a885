#include "master/membership.h"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

namespace aggvm::master {
namespace {

bool ValidNodeName(const std::string& name) {
  if (name.empty() || name.size() > 63) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

int64_t MillisSince(absl::Time then, absl::Time now) { return std::max<int64_t>(0, absl::ToInt64Milliseconds(now - then)); }

}  // namespace

Membership::Membership(absl::Duration heartbeat_interval, uint32_t lost_after_intervals)
    : interval_(heartbeat_interval), lost_after_(heartbeat_interval * std::max<uint32_t>(1, lost_after_intervals)) {}

absl::StatusOr<NodeRecord> Membership::Register(const v1::RegisterNodeRequest& req, absl::Time now) {
  if (!ValidNodeName(req.node())) {
    return absl::InvalidArgumentError(fmt::format(
        "node: '{}' is not a node name; use 1..63 letters, digits, '-', '_' or '.'", req.node()));
  }
  if (req.control_address().empty() || req.control_address().find(':') == std::string::npos) {
    return absl::InvalidArgumentError(fmt::format(
        "control_address: '{}' of node '{}' is not host:port", req.control_address(), req.node()));
  }
  auto it = nodes_.find(req.node());
  if (it != nodes_.end() && it->second.health == v1::NODE_HEALTH_UP) {
    const NodeRecord& old = it->second;
    return absl::AlreadyExistsError(fmt::format(
        "node '{}' is already registered and alive (node id {}, control address {}, last heartbeat {} ms ago); "
        "stop the other agent or start this one with another node name",
        old.name, old.id, old.control_address, MillisSince(old.last_heartbeat, now)));
  }
  NodeRecord rec;
  if (it != nodes_.end()) {
    rec.id = it->second.id;  // a node that comes back keeps its id
  } else {
    if (next_id_ == 0) {
      return absl::ResourceExhaustedError(fmt::format("no node id left for node '{}' (65535 registered)", req.node()));
    }
    rec.id = NodeId(next_id_++);
  }
  rec.name = req.node();
  rec.incarnation = next_incarnation_++;
  rec.control_address = req.control_address();
  rec.data_plane = req.data_plane();
  rec.capabilities = req.capabilities();
  rec.software_version = req.software_version();
  rec.health = v1::NODE_HEALTH_UP;
  rec.registered_at = now;
  rec.last_heartbeat = now;
  nodes_[rec.name] = rec;
  return rec;
}

absl::Status Membership::Heartbeat(const v1::HeartbeatRequest& req, absl::Time now) {
  auto it = nodes_.find(req.node());
  if (it == nodes_.end()) {
    return absl::NotFoundError(fmt::format("node '{}' is not registered; register first", req.node()));
  }
  NodeRecord& rec = it->second;
  if (rec.incarnation != req.incarnation() || rec.id.value() != req.node_id()) {
    return absl::NotFoundError(fmt::format(
        "node '{}': heartbeat for registration (id {}, incarnation {}) but the current one is (id {}, incarnation {}); "
        "register again",
        req.node(), req.node_id(), req.incarnation(), rec.id, rec.incarnation));
  }
  if (rec.health != v1::NODE_HEALTH_UP) {
    return absl::NotFoundError(fmt::format(
        "node '{}' was marked LOST (no heartbeat for {} ms); register again", req.node(), MillisSince(rec.last_heartbeat, now)));
  }
  rec.last_heartbeat = std::max(rec.last_heartbeat, now);
  return absl::OkStatus();
}

std::vector<NodeRecord> Membership::Sweep(absl::Time now) {
  std::vector<NodeRecord> lost;
  for (auto& [name, rec] : nodes_) {
    if (rec.health == v1::NODE_HEALTH_UP && now - rec.last_heartbeat > lost_after_) {
      rec.health = v1::NODE_HEALTH_LOST;
      lost.push_back(rec);
    }
  }
  return lost;
}

std::optional<NodeRecord> Membership::Find(const std::string& name) const {
  auto it = nodes_.find(name);
  if (it == nodes_.end()) return std::nullopt;
  return it->second;
}

std::vector<NodeRecord> Membership::Nodes() const {
  std::vector<NodeRecord> out;
  for (const auto& [name, rec] : nodes_) out.push_back(rec);
  std::sort(out.begin(), out.end(), [](const NodeRecord& a, const NodeRecord& b) { return a.id < b.id; });
  return out;
}

v1::NodeStatus Membership::Status(const NodeRecord& node, absl::Time now) const {
  v1::NodeStatus s;
  s.set_node(node.name);
  s.set_node_id(node.id.value());
  s.set_control_address(node.control_address);
  *s.mutable_data_plane() = node.data_plane;
  s.set_health(node.health);
  s.set_last_heartbeat_ms_ago(static_cast<uint64_t>(MillisSince(node.last_heartbeat, now)));
  *s.mutable_capabilities() = node.capabilities;
  return s;
}

}  // namespace aggvm::master
