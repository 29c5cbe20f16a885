#include "master/master_service.h"

#include <chrono>
#include <set>

#include <fmt/format.h>

#include "absl/strings/str_join.h"
#include "common/clock.h"

namespace aggvm::master {
namespace {

constexpr size_t kMaxConsoleText = 4096;

grpc::Status ToGrpc(const absl::Status& st) {
  if (st.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(st.code()), std::string(st.message()));
}

grpc::Status Error(grpc::StatusCode code, std::string msg) { return grpc::Status(code, std::move(msg)); }

bool Active(v1::VmState s) { return s != v1::VM_STATE_STOPPED && s != v1::VM_STATE_FAILED; }

std::string StateName(v1::VmState s) {
  std::string n = v1::VmState_Name(s);
  return n.rfind("VM_STATE_", 0) == 0 ? n.substr(9) : n;
}

grpc::Status NoSuchVm(const std::string& name) {
  return Error(grpc::StatusCode::NOT_FOUND, fmt::format("no VM named '{}'; `aggvmctl vm list` shows the VMs", name));
}

}  // namespace

MasterService::MasterService(const MasterOptions& options)
    : options_(options), membership_(options.heartbeat_interval, options.lost_after_intervals) {}

MasterService::~MasterService() { Shutdown(); }

void MasterService::Shutdown() {
  std::vector<std::shared_ptr<VmDataPlane>> to_close;
  {
    std::lock_guard lock(mu_);
    shutting_down_ = true;
    for (auto& [name, vm] : vms_) {
      if (vm.dataplane) to_close.push_back(std::move(vm.dataplane));
    }
  }
  for (auto& dp : to_close) dp->Stop();
  events_.Close();
}

v1::DataPlaneEndpoint MasterService::MasterEndpoint() const {
  v1::DataPlaneEndpoint e;
  e.set_tcp_address(options_.data_listen_address);
  return e;
}

// ------------------------------------------------------------------------------------------------------------------
// Membership.

grpc::Status MasterService::RegisterNode(grpc::ServerContext*, const v1::RegisterNodeRequest* req,
                                         v1::RegisterNodeResponse* resp) {
  std::lock_guard lock(mu_);
  if (shutting_down_) return Error(grpc::StatusCode::UNAVAILABLE, "the master is shutting down");
  const absl::Time now = absl::Now();
  auto rec = membership_.Register(*req, now);
  if (!rec.ok()) return ToGrpc(rec.status());
  agents_[rec->name] =
      v1::NodeAgent::NewStub(grpc::CreateChannel(rec->control_address, grpc::InsecureChannelCredentials()));
  resp->set_node_id(rec->id.value());
  resp->set_heartbeat_interval_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(membership_.heartbeat_interval())));
  resp->set_lost_after_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(membership_.lost_after())));
  resp->set_incarnation(rec->incarnation);
  *resp->mutable_master_data_plane() = MasterEndpoint();
  v1::Event e;
  *e.mutable_node_changed() = membership_.Status(*rec, now);
  events_.Publish(std::move(e));
  return grpc::Status::OK;
}

grpc::Status MasterService::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req, v1::HeartbeatResponse* resp) {
  std::lock_guard lock(mu_);
  if (auto st = membership_.Heartbeat(*req, absl::Now()); !st.ok()) return ToGrpc(st);
  resp->set_master_ns(MonotonicNanos());
  return grpc::Status::OK;
}

grpc::Status MasterService::ListNodes(grpc::ServerContext*, const v1::ListNodesRequest*, v1::ListNodesResponse* resp) {
  std::lock_guard lock(mu_);
  const absl::Time now = absl::Now();
  for (const auto& n : membership_.Nodes()) {
    auto* s = resp->add_nodes();
    *s = membership_.Status(n, now);
    s->set_vm(VmOnNodeLocked(n.name));
  }
  return grpc::Status::OK;
}

void MasterService::Sweep(absl::Time now) {
  std::vector<std::pair<std::string, std::vector<AgentTarget>>> to_stop;
  std::vector<std::shared_ptr<VmDataPlane>> to_close;
  std::vector<DataPlaneLoss> losses;
  {
    std::lock_guard lock(loss_mu_);
    losses.swap(losses_);
  }
  {
    std::lock_guard lock(mu_);
    // Data-plane losses first: they are seen within milliseconds, long before the heartbeats stop.
    for (auto& loss : losses) {
      auto it = vms_.find(loss.vm);
      if (it == vms_.end() || !Active(it->second.state)) continue;
      VmRecord& vm = it->second;
      // Only the data plane of the VM's current run counts (a VM being stopped has none: its agents closing their
      // connections is expected).
      if (!loss.dataplane || vm.dataplane != loss.dataplane) continue;
      const auto* ep = loss.dataplane->node(loss.node);
      FailVmLocked(vm,
                   fmt::format("node '{}' (id {}) lost: its data-plane connection broke ({})",
                               ep ? ep->name : "?", loss.node.value(), loss.why),
                   to_stop, to_close);
    }
    for (const auto& node : membership_.Sweep(now)) {
      v1::Event e;
      *e.mutable_node_changed() = membership_.Status(node, now);
      e.mutable_node_changed()->set_vm(VmOnNodeLocked(node.name));
      events_.Publish(std::move(e));
      for (auto& [name, vm] : vms_) {
        if (!Active(vm.state)) continue;
        bool placed = false;
        for (const auto& p : vm.spec.placement()) placed |= p.node() == node.name;
        if (!placed) continue;
        FailVmLocked(vm,
                     fmt::format("node '{}' (id {}) lost: no heartbeat for {} ms", node.name, node.id,
                                 absl::ToInt64Milliseconds(now - node.last_heartbeat)),
                     to_stop, to_close);
      }
    }
  }
  for (const auto& [name, targets] : to_stop) StopOnAgents(targets, name);
  for (auto& dp : to_close) dp->Stop();
}

void MasterService::FailVmLocked(VmRecord& vm, std::string error,
                                 std::vector<std::pair<std::string, std::vector<AgentTarget>>>& to_stop,
                                 std::vector<std::shared_ptr<VmDataPlane>>& to_close) {
  if (vm.busy) ++vm.failure_epoch;  // the lifecycle call in flight stops the agents and the data plane
  const bool held_by_agents = vm.state != v1::VM_STATE_CREATED;
  SetStateLocked(vm, v1::VM_STATE_FAILED, std::move(error));
  if (held_by_agents) to_stop.emplace_back(vm.spec.name(), TargetsLocked(vm));
  if (!vm.busy && vm.dataplane) to_close.push_back(std::move(vm.dataplane));
}

// ------------------------------------------------------------------------------------------------------------------
// VMs.

grpc::Status MasterService::CreateVm(grpc::ServerContext*, const v1::CreateVmRequest* req, v1::VmStatus* out) {
  SpecContext ctx;
  if (!options_.default_image.empty()) ctx.default_image = options_.default_image;
  {
    std::lock_guard lock(mu_);
    if (shutting_down_) return Error(grpc::StatusCode::UNAVAILABLE, "the master is shutting down");
    ctx.nodes.emplace();
    for (const auto& n : membership_.Nodes()) {
      ctx.nodes->push_back(KnownNode{n.name, n.capabilities.rdma() || n.data_plane.has_rdma()});
    }
  }
  // Validation reads the image file: outside the lock.
  auto spec = NormalizeVmSpec(req->spec(), ctx);
  if (!spec.ok()) return ToGrpc(spec.status());

  std::lock_guard lock(mu_);
  const absl::Time now = absl::Now();
  if (auto it = vms_.find(spec->name()); it != vms_.end() && (Active(it->second.state) || it->second.busy)) {
    return Error(grpc::StatusCode::ALREADY_EXISTS,
                 fmt::format("VM '{}' already exists and is {}; stop it first or pick another name", spec->name(),
                             StateName(it->second.state)));
  }
  std::vector<std::string> errs;
  v1::Topology topo;
  topo.set_vm(spec->name());
  std::map<uint32_t, v1::VcpuPlacement> by_vcpu;
  for (int i = 0; i < spec->placement_size(); ++i) {
    const auto& p = spec->placement(i);
    auto node = membership_.Find(p.node());
    if (!node) {
      errs.push_back(fmt::format("placement[{}].node: node '{}' is no longer registered", i, p.node()));
      continue;
    }
    if (node->health != v1::NODE_HEALTH_UP) {
      errs.push_back(fmt::format("placement[{}].node: node '{}' is LOST (last heartbeat {} ms ago); restart its agent "
                                 "or place the vCPUs elsewhere",
                                 i, p.node(), absl::ToInt64Milliseconds(now - node->last_heartbeat)));
    }
    if (auto other = VmOnNodeLocked(p.node()); !other.empty()) {
      errs.push_back(fmt::format("placement[{}].node: node '{}' already hosts VM '{}' ({}); stop it first", i, p.node(),
                                 other, StateName(vms_.at(other).state)));
    }
    for (uint32_t v : p.vcpus()) {
      v1::VcpuPlacement vp;
      vp.set_vcpu(v);
      vp.set_node(p.node());
      vp.set_node_id(node->id.value());
      vp.set_apic_id(v);  // APIC ID = vCPU index (guest/abi.h BootInfo.apic_ids)
      by_vcpu[v] = vp;
    }
  }
  if (!errs.empty()) {
    return Error(grpc::StatusCode::FAILED_PRECONDITION,
                 fmt::format("VM spec '{}' cannot be placed: {}", spec->name(), absl::StrJoin(errs, "; ")));
  }
  for (auto& [v, vp] : by_vcpu) *topo.add_vcpus() = vp;
  VmRecord rec;
  rec.spec = *spec;
  rec.topology = std::move(topo);
  rec.state = v1::VM_STATE_CREATED;
  auto& stored = vms_[spec->name()] = std::move(rec);
  PublishVmLocked(stored);
  *out = StatusLocked(stored);
  return grpc::Status::OK;
}

grpc::Status MasterService::StartVm(grpc::ServerContext*, const v1::VmRef* req, v1::VmStatus* out) {
  return Lifecycle(req->name(), Op::kStart, out);
}
grpc::Status MasterService::PauseVm(grpc::ServerContext*, const v1::VmRef* req, v1::VmStatus* out) {
  return Lifecycle(req->name(), Op::kPause, out);
}
grpc::Status MasterService::StopVm(grpc::ServerContext*, const v1::VmRef* req, v1::VmStatus* out) {
  return Lifecycle(req->name(), Op::kStop, out);
}

grpc::Status MasterService::Lifecycle(const std::string& name, Op op, v1::VmStatus* out) {
  std::vector<AgentTarget> targets;
  std::map<std::string, v1::PrepareVmRequest> prepares;
  std::shared_ptr<VmDataPlane> dataplane;  // started (CREATED -> start) or being stopped (stop) by this call
  v1::VmState from;
  uint64_t epoch;
  {
    std::lock_guard lock(mu_);
    if (shutting_down_) return Error(grpc::StatusCode::UNAVAILABLE, "the master is shutting down");
    auto it = vms_.find(name);
    if (it == vms_.end()) return NoSuchVm(name);
    VmRecord& vm = it->second;
    if (vm.busy) {
      return Error(grpc::StatusCode::FAILED_PRECONDITION,
                   fmt::format("VM '{}' is busy with another start/pause/stop; retry when it is done", name));
    }
    from = vm.state;
    const char* verb = op == Op::kStart ? "start" : op == Op::kPause ? "pause" : "stop";
    auto refuse = [&](const char* allowed) {
      return Error(grpc::StatusCode::FAILED_PRECONDITION,
                   fmt::format("cannot {} VM '{}': it is {}{}; only a {} VM can be {}", verb, name, StateName(from),
                               vm.error.empty() ? "" : " (" + vm.error + ")", allowed,
                               op == Op::kStart ? "started" : "paused"));
    };
    bool done = false;  // nothing to ask the agents
    switch (op) {
      case Op::kStart:
        if (from == v1::VM_STATE_RUNNING) done = true;
        else if (from != v1::VM_STATE_CREATED && from != v1::VM_STATE_PAUSED) return refuse("CREATED or PAUSED");
        break;
      case Op::kPause:
        if (from == v1::VM_STATE_PAUSED) done = true;
        else if (from != v1::VM_STATE_RUNNING) return refuse("RUNNING");
        break;
      case Op::kStop:
        if (from == v1::VM_STATE_STOPPED) done = true;
        if (from == v1::VM_STATE_CREATED) {  // no agent holds it yet
          SetStateLocked(vm, v1::VM_STATE_STOPPED);
          done = true;
        }
        break;
    }
    if (done) {
      *out = StatusLocked(vm);
      return grpc::Status::OK;
    }
    if (op != Op::kStop) {
      for (const auto& p : vm.spec.placement()) {
        auto node = membership_.Find(p.node());
        if (!node || node->health != v1::NODE_HEALTH_UP) {
          return Error(grpc::StatusCode::FAILED_PRECONDITION,
                       fmt::format("cannot {} VM '{}': its node '{}' is not UP; `aggvmctl status` shows the nodes",
                                   verb, name, p.node()));
        }
      }
    }
    targets = TargetsLocked(vm);
    if (op == Op::kStart && from == v1::VM_STATE_CREATED) {
      for (const auto& t : targets) prepares[t.node] = PrepareRequestLocked(vm, t.node);
      // The master dials the nodes while they prepare (a node's PrepareVm may wait for that connection).
      auto dp = BeginDataPlaneLocked(vm);
      if (!dp.ok()) {
        return Error(static_cast<grpc::StatusCode>(dp.status().code()),
                     fmt::format("cannot start VM '{}': {}", name, std::string(dp.status().message())));
      }
      dataplane = *std::move(dp);
    }
    if (op == Op::kStop) dataplane = std::move(vm.dataplane);
    vm.busy = true;
    epoch = vm.failure_epoch;
  }

  grpc::Status st;
  std::string stop_errors;
  switch (op) {
    case Op::kStart:
      if (from == v1::VM_STATE_CREATED) {
        st = CallAgents(targets, "PrepareVm", [&](const AgentTarget& t, grpc::ClientContext& ctx) {
          v1::PrepareVmResponse r;
          return t.stub->PrepareVm(&ctx, prepares.at(t.node), &r);
        });
        // Every node prepared: the connections are up (or never will be); the global controller runs before any
        // vCPU does.
        if (st.ok()) st = ToGrpc(dataplane->Activate());
      }
      if (st.ok()) {
        {
          std::lock_guard lock(mu_);
          VmRecord& vm = vms_.at(name);
          if (from == v1::VM_STATE_CREATED && vm.failure_epoch == epoch) SetStateLocked(vm, v1::VM_STATE_PREPARED);
        }
        st = CallAgents(targets, "StartVm", [&](const AgentTarget& t, grpc::ClientContext& ctx) {
          v1::AgentVmRef ref;
          ref.set_vm(name);
          v1::AgentVmState r;
          return t.stub->StartVm(&ctx, ref, &r);
        });
      }
      if (st.ok() && dataplane) {  // a node lost between the connection and now is not reported by Sweep
        for (const auto& n : dataplane->nodes()) {
          if (dataplane->controller()->node_lost(n.id)) {
            st = Error(grpc::StatusCode::UNAVAILABLE,
                       fmt::format("node '{}' (id {}) lost its data-plane connection while the VM was starting",
                                   n.name, n.id.value()));
          }
        }
      }
      break;
    case Op::kPause:
      st = CallAgents(targets, "PauseVm", [&](const AgentTarget& t, grpc::ClientContext& ctx) {
        v1::AgentVmRef ref;
        ref.set_vm(name);
        v1::AgentVmState r;
        return t.stub->PauseVm(&ctx, ref, &r);
      });
      break;
    case Op::kStop: {
      std::vector<std::string> errs;
      for (const auto& t : targets) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(options_.agent_call_timeout));
        v1::AgentVmRef ref;
        ref.set_vm(name);
        v1::AgentVmState r;
        auto s = t.stub->StopVm(&ctx, ref, &r);
        if (!s.ok() && s.error_code() != grpc::StatusCode::NOT_FOUND) {
          errs.push_back(fmt::format("node '{}' (StopVm): {}", t.node, s.error_message()));
        }
      }
      stop_errors = absl::StrJoin(errs, "; ");
      break;
    }
  }
  bool lost_meanwhile;
  {
    std::lock_guard lock(mu_);
    lost_meanwhile = vms_.at(name).failure_epoch != epoch;
  }
  // Leave no half-started VM behind (a failed agent call, or a node lost while the agents were being called).
  if (op != Op::kStop && (!st.ok() || lost_meanwhile)) StopOnAgents(targets, name);
  // The master's side of the data plane goes after the agents' (they may still be sending).
  const bool keep_dataplane = op == Op::kStart && st.ok() && !lost_meanwhile;
  if (dataplane && !keep_dataplane) {
    dataplane->Stop();
    dataplane.reset();
  }

  std::lock_guard lock(mu_);
  VmRecord& vm = vms_.at(name);
  vm.busy = false;
  if (dataplane) vm.dataplane = std::move(dataplane);
  if (vm.failure_epoch != epoch && op != Op::kStop) {
    // A node of this VM was lost while the agents were being called: the VM is FAILED and stays so.
    *out = StatusLocked(vm);
    return Error(grpc::StatusCode::ABORTED, fmt::format("VM '{}' failed during the operation: {}", name, vm.error));
  }
  if (op == Op::kStop) {
    SetStateLocked(vm, v1::VM_STATE_STOPPED, stop_errors.empty() ? "" : "stopped with errors: " + stop_errors);
  } else if (st.ok()) {
    SetStateLocked(vm, op == Op::kStart ? v1::VM_STATE_RUNNING : v1::VM_STATE_PAUSED);
  } else {
    SetStateLocked(vm, v1::VM_STATE_FAILED, st.error_message());
  }
  *out = StatusLocked(vm);
  return st;
}

grpc::Status MasterService::CallAgents(
    const std::vector<AgentTarget>& targets, const char* rpc,
    const std::function<grpc::Status(const AgentTarget&, grpc::ClientContext&)>& call) {
  for (const auto& t : targets) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(options_.agent_call_timeout));
    grpc::Status s = call(t, ctx);
    if (!s.ok()) {
      // An unreachable agent is not an unreachable master: UNAVAILABLE would make clients blame the master.
      const auto code = s.error_code() == grpc::StatusCode::UNAVAILABLE ? grpc::StatusCode::FAILED_PRECONDITION
                                                                         : s.error_code();
      return grpc::Status(code, fmt::format("node '{}' ({}): {}", t.node, rpc, s.error_message()));
    }
  }
  return grpc::Status::OK;
}

void MasterService::StopOnAgents(const std::vector<AgentTarget>& targets, const std::string& vm) {
  for (const auto& t : targets) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(options_.agent_call_timeout));
    v1::AgentVmRef ref;
    ref.set_vm(vm);
    v1::AgentVmState r;
    (void)t.stub->StopVm(&ctx, ref, &r);  // best effort: the VM is already FAILED or being stopped
  }
}

grpc::Status MasterService::GetVm(grpc::ServerContext*, const v1::VmRef* req, v1::VmStatus* out) {
  std::lock_guard lock(mu_);
  auto it = vms_.find(req->name());
  if (it == vms_.end()) return NoSuchVm(req->name());
  *out = StatusLocked(it->second);
  return grpc::Status::OK;
}

grpc::Status MasterService::ListVms(grpc::ServerContext*, const v1::ListVmsRequest*, v1::ListVmsResponse* resp) {
  std::lock_guard lock(mu_);
  for (const auto& [name, vm] : vms_) *resp->add_vms() = StatusLocked(vm);
  return grpc::Status::OK;
}

grpc::Status MasterService::GetTopology(grpc::ServerContext*, const v1::VmRef* req, v1::Topology* out) {
  std::lock_guard lock(mu_);
  auto it = vms_.find(req->name());
  if (it == vms_.end()) return NoSuchVm(req->name());
  *out = it->second.topology;
  return grpc::Status::OK;
}

namespace {

std::string DeliveryModeName(irqchip::DeliveryMode m) {
  switch (m) {
    case irqchip::DeliveryMode::kFixed: return "fixed";
    case irqchip::DeliveryMode::kLowestPriority: return "lowest-priority";
    case irqchip::DeliveryMode::kSmi: return "smi";
    case irqchip::DeliveryMode::kNmi: return "nmi";
    case irqchip::DeliveryMode::kInit: return "init";
    case irqchip::DeliveryMode::kStartup: return "startup";
    case irqchip::DeliveryMode::kExtInt: return "extint";
  }
  return fmt::format("mode {}", static_cast<int>(m));
}

void AddCounters(const GlobalControllerCounters& c, v1::RoutingTable* out) {
  auto& m = *out->mutable_counters();
  m["frames_received"] = c.frames_received;
  m["gsi_changes"] = c.gsi_changes;
  m["msis"] = c.msis;
  m["ipis"] = c.ipis;
  m["ipis_proxy_resolved"] = c.ipis_proxy_resolved;
  m["priorities"] = c.priorities;
  m["raised"] = c.raised;
  m["routed"] = c.routed;
  m["delivered"] = c.delivered;
  m["level_delivered"] = c.level_delivered;
  m["eois"] = c.eois;
  m["io_requests"] = c.io_requests;
  m["io_no_device"] = c.io_no_device;
  m["rings"] = c.rings;
  m["nodes_lost"] = c.nodes_lost;
  m["dropped_unknown_node"] = c.dropped_unknown_node;
  m["dropped_unknown_vcpu"] = c.dropped_unknown_vcpu;
  m["dropped_wrong_node"] = c.dropped_wrong_node;
  m["dropped_unknown_gsi"] = c.dropped_unknown_gsi;
  m["dropped_bad_msi"] = c.dropped_bad_msi;
  m["dropped_no_destination"] = c.dropped_no_destination;
  m["dropped_illegal_vector"] = c.dropped_illegal_vector;
  m["dropped_unexpected_type"] = c.dropped_unexpected_type;
  m["dropped_send_failed"] = c.dropped_send_failed;
}

// The live table of a running VM's controller.
absl::Status FillRoutingTable(GlobalController& gc, v1::RoutingTable* out) {
  auto t = gc.GetRoutingTable();
  if (!t.ok()) return t.status();
  out->set_policy(FromRoutingPolicy(t->policy));
  for (const auto& p : t->pins) {
    if (p.entry == 0 || (p.masked && p.vector.value() == 0)) continue;  // never programmed: reset state
    auto* e = out->add_entries();
    e->set_gsi(p.gsi.value());
    e->set_source("ioapic");
    e->set_vector(p.vector.value());
    e->set_delivery_mode(DeliveryModeName(p.mode));
    e->set_destination(fmt::format("{} {:#x}", p.dest_mode == irqchip::DestMode::kLogical ? "logical" : "physical",
                                   p.destination));
    e->set_masked(p.masked);
    e->set_level(p.trigger == irqchip::TriggerMode::kLevel);
    e->set_remote_irr(p.remote_irr);
    e->set_input(p.input);
  }
  for (const auto& [vector, vcpu] : t->vector_pins) {
    auto* r = out->add_static_routes();
    r->set_vector(vector.value());
    r->set_vcpu(vcpu.value());
  }
  AddCounters(gc.counters(), out);
  return absl::OkStatus();
}

}  // namespace

grpc::Status MasterService::GetRoutingTable(grpc::ServerContext*, const v1::VmRef* req, v1::RoutingTable* out) {
  std::shared_ptr<VmDataPlane> dp;
  {
    std::lock_guard lock(mu_);
    auto it = vms_.find(req->name());
    if (it == vms_.end()) return NoSuchVm(req->name());
    out->set_vm(req->name());
    out->set_policy(it->second.spec.routing_policy());
    dp = it->second.dataplane;
    if (!dp || !dp->controller()) {
      // Not running: the stored policy and routes only (the IOAPIC exists while the VM runs).
      *out->mutable_static_routes() = it->second.spec.static_routes();
      return grpc::Status::OK;
    }
  }
  return ToGrpc(FillRoutingTable(*dp->controller(), out));
}

grpc::Status MasterService::SetRoutingPolicy(grpc::ServerContext*, const v1::SetRoutingPolicyRequest* req,
                                             v1::RoutingTable* out) {
  std::shared_ptr<VmDataPlane> dp;
  const v1::RoutingPolicy policy =
      req->policy() == v1::ROUTING_POLICY_UNSPECIFIED ? v1::ROUTING_POLICY_SDM : req->policy();
  {
    std::lock_guard lock(mu_);
    auto it = vms_.find(req->vm());
    if (it == vms_.end()) return NoSuchVm(req->vm());
    VmRecord& vm = it->second;
    if (auto st = ValidateRouting(policy, req->static_routes(), vm.spec.vcpus()); !st.ok()) {
      return Error(grpc::StatusCode::INVALID_ARGUMENT,
                   fmt::format("routing policy for VM '{}' is invalid: {}", req->vm(), std::string(st.message())));
    }
    vm.spec.set_routing_policy(policy);
    *vm.spec.mutable_static_routes() = req->static_routes();
    PublishVmLocked(vm);
    out->set_vm(req->vm());
    out->set_policy(policy);
    *out->mutable_static_routes() = req->static_routes();
    dp = vm.dataplane;
  }
  if (!dp || !dp->controller()) return grpc::Status::OK;  // applied when the VM starts
  // Running: switch the Router now (pins first, so a static policy never runs without its pins).
  GlobalController& gc = *dp->controller();
  absl::Status st = ApplyStaticRoutes(gc, req->static_routes());
  if (st.ok()) st = gc.SetRoutingPolicy(ToRoutingPolicy(policy));
  if (!st.ok()) {
    return Error(static_cast<grpc::StatusCode>(st.code()),
                 fmt::format("VM '{}': the policy is stored but the running router did not take it: {}", req->vm(),
                             std::string(st.message())));
  }
  out->clear_static_routes();
  return ToGrpc(FillRoutingTable(gc, out));
}

grpc::Status MasterService::RingDoorbell(grpc::ServerContext*, const v1::RingDoorbellRequest* req,
                                         v1::RingDoorbellResponse* resp) {
  std::shared_ptr<VmDataPlane> dp;
  {
    std::lock_guard lock(mu_);
    auto it = vms_.find(req->vm());
    if (it == vms_.end()) return NoSuchVm(req->vm());
    const VmRecord& vm = it->second;
    if (vm.state != v1::VM_STATE_RUNNING && vm.state != v1::VM_STATE_PAUSED) {
      return Error(grpc::StatusCode::FAILED_PRECONDITION,
                   fmt::format("cannot ring a doorbell of VM '{}': it is {}{}; start it first", req->vm(),
                               StateName(vm.state), vm.error.empty() ? "" : " (" + vm.error + ")"));
    }
    dp = vm.dataplane;
  }
  if (!dp || !dp->controller()) {
    return Error(grpc::StatusCode::FAILED_PRECONDITION,
                 fmt::format("VM '{}' has no running data plane on the master", req->vm()));
  }
  const VmNodeEndpoint* node = dp->node(req->node());
  if (node == nullptr) {
    std::vector<std::string> names;
    for (const auto& n : dp->nodes()) names.push_back(n.name);
    return Error(grpc::StatusCode::NOT_FOUND, fmt::format("VM '{}' has no vCPU on node '{}'; its nodes: [{}]",
                                                          req->vm(), req->node(), absl::StrJoin(names, ", ")));
  }
  if (req->gsi() >= transport::kMaxGsi) {
    return Error(grpc::StatusCode::INVALID_ARGUMENT,
                 fmt::format("gsi: {} is out of range (0..{}; IOAPIC pins are 0..{})", req->gsi(),
                             transport::kMaxGsi - 1, kIoApicPins - 1));
  }
  if (!req->level() && !req->asserted()) {
    return Error(grpc::StatusCode::INVALID_ARGUMENT,
                 "asserted: an edge doorbell is one rising edge; deassert only applies to --level");
  }
  resp->set_node_id(node->id.value());
  resp->set_sent_ns(MonotonicNanos());
  const absl::Status st =
      dp->controller()->Ring(node->id, Gsi(req->gsi()),
                             req->level() ? irqchip::TriggerMode::kLevel : irqchip::TriggerMode::kEdge,
                             req->asserted(), req->traced(), absl::Seconds(2),
                             master::RingTrain{.count = req->count(), .interval_us = req->interval_us()});
  if (!st.ok()) {
    return Error(static_cast<grpc::StatusCode>(st.code()),
                 fmt::format("doorbell of VM '{}' on node '{}' (GSI {}): {}", req->vm(), req->node(), req->gsi(),
                             std::string(st.message())));
  }
  return grpc::Status::OK;
}

// ------------------------------------------------------------------------------------------------------------------
// Events and guest output.

grpc::Status MasterService::WatchEvents(grpc::ServerContext* ctx, const v1::WatchEventsRequest* req,
                                        grpc::ServerWriter<v1::Event>* writer) {
  const std::string vm = req->vm();
  const bool console = req->console();
  auto sub = events_.Subscribe([vm, console](const v1::Event& e) {
    switch (e.kind_case()) {
      case v1::Event::kNodeChanged: return vm.empty();
      case v1::Event::kVmChanged: return vm.empty() || e.vm_changed().name() == vm;
      case v1::Event::kConsole: return console && (vm.empty() || e.console().vm() == vm);
      case v1::Event::kRecord: return console && (vm.empty() || e.record().vm() == vm);
      default: return false;
    }
  });
  // Snapshot of the current state first (the subscription is live already, so nothing falls in between).
  std::vector<v1::Event> snapshot;
  {
    std::lock_guard lock(mu_);
    if (vm.empty()) {
      const absl::Time now = absl::Now();
      for (const auto& n : membership_.Nodes()) {
        v1::Event e;
        *e.mutable_node_changed() = membership_.Status(n, now);
        e.mutable_node_changed()->set_vm(VmOnNodeLocked(n.name));
        snapshot.push_back(std::move(e));
      }
    }
    for (const auto& [name, rec] : vms_) {
      if (!vm.empty() && name != vm) continue;
      v1::Event e;
      *e.mutable_vm_changed() = StatusLocked(rec);
      snapshot.push_back(std::move(e));
    }
  }
  writer->SendInitialMetadata();  // tells the client the subscription is live
  for (auto& e : snapshot) {
    e.set_time_ns(MonotonicNanos());
    if (!writer->Write(e)) return grpc::Status::OK;
  }
  while (!ctx->IsCancelled()) {
    auto e = sub->Next(absl::Milliseconds(200));
    if (!e) {
      if (sub->closed()) return grpc::Status::OK;
      continue;
    }
    if (!writer->Write(*e)) return grpc::Status::OK;  // client went away
  }
  return grpc::Status::OK;
}

grpc::Status MasterService::ReportGuestOutput(grpc::ServerContext*, grpc::ServerReader<v1::Event>* reader,
                                              v1::ReportGuestOutputResponse*) {
  v1::Event e;
  while (reader->Read(&e)) {
    std::lock_guard lock(mu_);
    if (shutting_down_) break;
    std::string vm_name, node;
    uint32_t vcpu = 0;
    if (e.has_console()) {
      vm_name = e.console().vm();
      node = e.console().node();
      vcpu = e.console().vcpu();
      if (e.console().text().size() > kMaxConsoleText) e.mutable_console()->mutable_text()->resize(kMaxConsoleText);
    } else if (e.has_record()) {
      vm_name = e.record().vm();
      node = e.record().node();
      vcpu = e.record().vcpu();
    } else {
      ++guest_output_dropped_;
      continue;
    }
    // Accept output only for a vCPU that this VM places on the reporting node.
    auto it = vms_.find(vm_name);
    bool ok = it != vms_.end() && Active(it->second.state);
    if (ok) {
      ok = false;
      for (const auto& vp : it->second.topology.vcpus()) ok |= vp.vcpu() == vcpu && vp.node() == node;
    }
    if (!ok) {
      ++guest_output_dropped_;
      continue;
    }
    e.set_time_ns(0);
    events_.Publish(e);
  }
  return grpc::Status::OK;
}

// ------------------------------------------------------------------------------------------------------------------
// Helpers (mu_ held).

std::vector<MasterService::AgentTarget> MasterService::TargetsLocked(const VmRecord& vm) const {
  std::vector<AgentTarget> out;
  for (const auto& p : vm.spec.placement()) {
    auto node = membership_.Find(p.node());
    auto stub = agents_.find(p.node());
    if (!node || node->health != v1::NODE_HEALTH_UP || stub == agents_.end()) continue;
    out.push_back(AgentTarget{p.node(), stub->second});
  }
  return out;
}

v1::PrepareVmRequest MasterService::PrepareRequestLocked(const VmRecord& vm, const std::string& node) const {
  v1::PrepareVmRequest req;
  *req.mutable_spec() = vm.spec;
  *req.mutable_topology() = vm.topology;
  req.set_node(node);
  *req.mutable_master_data_plane() = MasterEndpoint();
  const absl::Time now = absl::Now();
  auto* master = req.add_peers();  // the master (NodeId 0): its data-plane endpoint, as the proto promises
  master->set_node("master");
  master->set_node_id(0);
  *master->mutable_data_plane() = MasterEndpoint();
  master->set_health(v1::NODE_HEALTH_UP);
  for (const auto& p : vm.spec.placement()) {
    if (auto n = membership_.Find(p.node())) *req.add_peers() = membership_.Status(*n, now);
  }
  return req;
}

v1::VmStatus MasterService::StatusLocked(const VmRecord& vm) const {
  v1::VmStatus s;
  s.set_name(vm.spec.name());
  *s.mutable_spec() = vm.spec;
  s.set_state(vm.state);
  s.set_error(vm.error);
  return s;
}

void MasterService::PublishVmLocked(const VmRecord& vm) {
  v1::Event e;
  *e.mutable_vm_changed() = StatusLocked(vm);
  events_.Publish(std::move(e));
}

void MasterService::SetStateLocked(VmRecord& vm, v1::VmState state, std::string error) {
  vm.state = state;
  vm.error = std::move(error);
  PublishVmLocked(vm);
}

absl::StatusOr<std::shared_ptr<VmDataPlane>> MasterService::BeginDataPlaneLocked(const VmRecord& vm) {
  std::vector<VmNodeEndpoint> nodes;
  for (const auto& p : vm.spec.placement()) {
    auto n = membership_.Find(p.node());
    if (!n) return absl::FailedPreconditionError(fmt::format("node '{}' is not registered", p.node()));
    nodes.push_back(VmNodeEndpoint{n->id, n->name, n->data_plane.tcp_address()});
  }
  VmDataPlaneOptions o;
  o.listen_address = options_.data_listen_address;
  o.connect_timeout = options_.agent_call_timeout;
  o.rdma = options_.rdma;
  o.cpus = options_.dataplane_cpus;
  const std::string name = vm.spec.name();
  std::map<uint32_t, std::string> node_of;  // vCPU -> node name, for console lines
  for (const auto& vp : vm.topology.vcpus()) node_of[vp.vcpu()] = vp.node();
  o.console = [this, name, node_of = std::move(node_of)](VcpuIndex vcpu, std::string_view text) {
    v1::Event e;
    auto* c = e.mutable_console();
    c->set_vm(name);
    c->set_vcpu(vcpu.value());
    if (auto it = node_of.find(vcpu.value()); it != node_of.end()) c->set_node(it->second);
    c->set_text(std::string(text.substr(0, kMaxConsoleText)));
    events_.Publish(std::move(e));
  };
  // Set once the data plane exists: the callback names the run it belongs to.
  auto self = std::make_shared<std::weak_ptr<VmDataPlane>>();
  o.on_node_lost = [this, name, self](NodeId node, const absl::Status& why) {
    std::lock_guard lock(loss_mu_);
    losses_.push_back(DataPlaneLoss{name, self->lock(), node, std::string(why.message())});
  };
  auto dp = VmDataPlane::Begin(vm.spec, vm.topology, std::move(nodes), std::move(o));
  if (!dp.ok()) return dp.status();
  std::shared_ptr<VmDataPlane> shared = *std::move(dp);
  *self = shared;
  return shared;
}

std::string MasterService::VmOnNodeLocked(const std::string& node) const {
  for (const auto& [name, vm] : vms_) {
    if (!Active(vm.state)) continue;
    for (const auto& p : vm.spec.placement()) {
      if (p.node() == node) return name;
    }
  }
  return "";
}

}  // namespace aggvm::master
