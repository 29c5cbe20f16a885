#include "node-agent/control/node_agent_service.h"

#include <algorithm>
#include <set>

#include <fmt/format.h>

#include "absl/strings/str_join.h"
#include "common/clock.h"

namespace aggvm::agent::control {
namespace {

grpc::Status Error(grpc::StatusCode code, std::string msg) { return grpc::Status(code, std::move(msg)); }

std::string StateName(v1::VmState s) {
  std::string n = v1::VmState_Name(s);
  return n.rfind("VM_STATE_", 0) == 0 ? n.substr(9) : n;
}

grpc::Status FromAbsl(const absl::Status& st, std::string_view what) {
  if (st.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(st.code()), fmt::format("{}: {}", what, std::string(st.message())));
}

}  // namespace

NodeAgentService::NodeAgentService(std::string node, VmHost& host, GuestOutput& output)
    : node_(std::move(node)), host_(host), output_(output) {}

void NodeAgentService::set_node_id(NodeId id) {
  std::lock_guard lock(mu_);
  node_id_ = id;
}

std::string NodeAgentService::vm() const {
  std::lock_guard lock(mu_);
  return vm_;
}

v1::VmState NodeAgentService::state() const {
  std::lock_guard lock(mu_);
  return state_;
}

grpc::Status NodeAgentService::PrepareVm(grpc::ServerContext*, const v1::PrepareVmRequest* req, v1::PrepareVmResponse*) {
  std::lock_guard lock(mu_);
  const v1::VmSpec& spec = req->spec();
  auto refuse = [&](grpc::StatusCode code, std::string msg) {
    ++refused_;
    return Error(code, std::move(msg));
  };
  if (!req->node().empty() && req->node() != node_) {
    return refuse(grpc::StatusCode::FAILED_PRECONDITION,
                  fmt::format("PrepareVm for node '{}' reached node '{}'; the master has a wrong control address for "
                              "one of them",
                              req->node(), node_));
  }
  if (!vm_.empty()) {
    if (vm_ == spec.name() && state_ == v1::VM_STATE_PREPARED) return grpc::Status::OK;  // a retried call
    return refuse(grpc::StatusCode::FAILED_PRECONDITION,
                  fmt::format("node '{}' already holds VM '{}' ({}); stop it before preparing VM '{}'", node_, vm_,
                              StateName(state_), spec.name()));
  }
  // The topology must list every vCPU once; this node's share must match the spec's placement for it.
  LocalVmPlan plan;
  std::set<uint32_t> seen;
  for (const auto& vp : req->topology().vcpus()) {
    if (vp.vcpu() >= spec.vcpus() || !seen.insert(vp.vcpu()).second) {
      return refuse(grpc::StatusCode::INVALID_ARGUMENT,
                    fmt::format("PrepareVm for VM '{}': topology lists vCPU {} twice or beyond vcpus = {}", spec.name(),
                                vp.vcpu(), spec.vcpus()));
    }
    if (vp.node() == node_) plan.local_vcpus.emplace_back(vp.vcpu());
  }
  if (seen.size() != spec.vcpus()) {
    return refuse(grpc::StatusCode::INVALID_ARGUMENT,
                  fmt::format("PrepareVm for VM '{}': topology lists {} vCPUs, the spec has {}", spec.name(),
                              seen.size(), spec.vcpus()));
  }
  if (plan.local_vcpus.empty()) {
    return refuse(grpc::StatusCode::FAILED_PRECONDITION,
                  fmt::format("VM '{}' places no vCPU on node '{}'; this agent has nothing to run for it", spec.name(),
                              node_));
  }
  std::vector<uint32_t> placed;
  for (const auto& p : spec.placement()) {
    if (p.node() == node_) placed.assign(p.vcpus().begin(), p.vcpus().end());
  }
  std::sort(placed.begin(), placed.end());
  std::sort(plan.local_vcpus.begin(), plan.local_vcpus.end());
  std::vector<uint32_t> local;
  for (auto v : plan.local_vcpus) local.push_back(v.value());
  if (placed != local) {
    return refuse(grpc::StatusCode::INVALID_ARGUMENT,
                  fmt::format("PrepareVm for VM '{}': topology gives node '{}' vCPUs [{}] but its placement says [{}]",
                              spec.name(), node_, absl::StrJoin(local, ","), absl::StrJoin(placed, ",")));
  }
  plan.spec = spec;
  plan.node = node_;
  plan.node_id = node_id_;
  plan.topology = req->topology();
  plan.peers.assign(req->peers().begin(), req->peers().end());
  if (auto st = host_.Prepare(plan, output_); !st.ok()) {
    return FromAbsl(st, fmt::format("node '{}' cannot prepare VM '{}'", node_, spec.name()));
  }
  vm_ = spec.name();
  state_ = v1::VM_STATE_PREPARED;
  return grpc::Status::OK;
}

grpc::Status NodeAgentService::HeldLocked(const std::string& vm) const {
  if (!vm_.empty() && vm_ == vm) return grpc::Status::OK;
  return Error(grpc::StatusCode::NOT_FOUND,
               fmt::format("node '{}' holds no VM '{}' ({})", node_, vm,
                           vm_.empty() ? std::string("it holds none") : fmt::format("it holds '{}'", vm_)));
}

grpc::Status NodeAgentService::StartVm(grpc::ServerContext*, const v1::AgentVmRef* req, v1::AgentVmState* out) {
  std::lock_guard lock(mu_);
  if (auto st = HeldLocked(req->vm()); !st.ok()) return st;
  if (state_ != v1::VM_STATE_RUNNING) {
    if (auto st = host_.Start(); !st.ok()) return FromAbsl(st, fmt::format("node '{}' cannot start VM '{}'", node_, vm_));
    state_ = v1::VM_STATE_RUNNING;
  }
  out->set_vm(vm_);
  out->set_state(state_);
  return grpc::Status::OK;
}

grpc::Status NodeAgentService::PauseVm(grpc::ServerContext*, const v1::AgentVmRef* req, v1::AgentVmState* out) {
  std::lock_guard lock(mu_);
  if (auto st = HeldLocked(req->vm()); !st.ok()) return st;
  if (state_ == v1::VM_STATE_PREPARED) {
    return Error(grpc::StatusCode::FAILED_PRECONDITION,
                 fmt::format("node '{}': VM '{}' is PREPARED, not running; start it first", node_, vm_));
  }
  if (state_ == v1::VM_STATE_RUNNING) {
    if (auto st = host_.Pause(); !st.ok()) return FromAbsl(st, fmt::format("node '{}' cannot pause VM '{}'", node_, vm_));
    state_ = v1::VM_STATE_PAUSED;
  }
  out->set_vm(vm_);
  out->set_state(state_);
  return grpc::Status::OK;
}

grpc::Status NodeAgentService::StopVm(grpc::ServerContext*, const v1::AgentVmRef* req, v1::AgentVmState* out) {
  std::lock_guard lock(mu_);
  if (auto st = HeldLocked(req->vm()); !st.ok()) return st;
  // The VM is released even when the host reports an error: the master marks it STOPPED either way.
  const absl::Status st = host_.Stop();
  out->set_vm(vm_);
  out->set_state(v1::VM_STATE_STOPPED);
  vm_.clear();
  state_ = v1::VM_STATE_UNSPECIFIED;
  return FromAbsl(st, fmt::format("node '{}' stopped VM '{}' with an error", node_, req->vm()));
}

void NodeAgentService::StopHeldVm() {
  std::lock_guard lock(mu_);
  if (vm_.empty()) return;
  (void)host_.Stop();  // shutting down: nothing to report the error to
  vm_.clear();
  state_ = v1::VM_STATE_UNSPECIFIED;
}

grpc::Status NodeAgentService::GetStats(grpc::ServerContext*, const v1::GetStatsRequest* req, v1::Stats* out) {
  std::lock_guard lock(mu_);
  if (!req->vm().empty()) {
    if (auto st = HeldLocked(req->vm()); !st.ok()) return st;
  }
  auto& counters = *out->mutable_counters();
  if (!vm_.empty()) {
    for (const auto& [k, v] : host_.Stats()) counters[k] = v;
  }
  counters["control_requests_refused"] = refused_;
  return grpc::Status::OK;
}

grpc::Status NodeAgentService::GetClock(grpc::ServerContext*, const v1::GetClockRequest*, v1::ClockReading* out) {
  // No lock: the reading must not wait behind a slow VmHost call (it would widen the RTT, not bias the offset).
  out->set_monotonic_ns(MonotonicNanos());
  out->set_tsc(ReadTsc());
  return grpc::Status::OK;
}

std::map<std::string, uint64_t> NodeAgentService::Counters() {
  std::lock_guard lock(mu_);
  std::map<std::string, uint64_t> m;
  if (!vm_.empty()) m = host_.Stats();
  m["control_requests_refused"] = refused_;
  return m;
}

}  // namespace aggvm::agent::control
