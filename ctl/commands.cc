#include "ctl/commands.h"

#include <cctype>
#include <chrono>
#include <map>
#include <stdexcept>
#include <ostream>
#include <thread>

#include <fmt/format.h>
#include <fmt/ostream.h>
#include <google/protobuf/text_format.h>
#include <grpcpp/grpcpp.h>

#include "master/describe.h"
#include "master/vm_spec.h"
#include "proto/aggvm.grpc.pb.h"

namespace aggvm::ctl {
namespace {

namespace v1 = ::aggvm::v1;
using master::ShortName;

class Client {
 public:
  explicit Client(const CtlOptions& opt)
      : opt_(opt), stub_(v1::Master::NewStub(grpc::CreateChannel(opt.master, grpc::InsecureChannelCredentials()))) {}

  v1::Master::Stub& stub() { return *stub_; }

  void Prepare(grpc::ClientContext& ctx) const {
    ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(opt_.timeout));
  }

  // A gRPC failure as an absl::Status that says what to do when the master is not there.
  absl::Status Fail(const grpc::Status& st, std::string_view what) const {
    if (st.error_code() == grpc::StatusCode::UNAVAILABLE) {
      return absl::UnavailableError(fmt::format(
          "cannot reach the master at {} ({}: {}); is aggvm-master running there? Use --master host:port",
          opt_.master, what, st.error_message()));
    }
    if (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      return absl::DeadlineExceededError(fmt::format(
          "the master at {} did not answer in time ({}); raise --timeout or check `aggvmctl status`", opt_.master, what));
    }
    return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  }

 private:
  const CtlOptions& opt_;
  std::unique_ptr<v1::Master::Stub> stub_;
};

// ROUTING_POLICY_NODE_LOCAL_FIRST -> node-local-first (the names aggvmctl vm policy takes).
std::string PolicyName(v1::RoutingPolicy p) {
  std::string n = v1::RoutingPolicy_Name(p);
  if (n.rfind("ROUTING_POLICY_", 0) == 0) n = n.substr(15);
  for (auto& ch : n) ch = ch == '_' ? '-' : static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return n;
}

void PrintRoutingTable(const v1::RoutingTable& table, std::ostream& out) {
  fmt::print(out, "vm {} policy {}\n", table.vm(), PolicyName(table.policy()));
  fmt::print(out, "{:>4} {:<6} {:>6} {:<15} {:<16} {}\n", "GSI", "SOURCE", "VECTOR", "DELIVERY", "DESTINATION", "FLAGS");
  for (const auto& e : table.entries()) {
    fmt::print(out, "{:>4} {:<6} {:>#6x} {:<15} {:<16} {}{}{}{}\n", e.gsi(), e.source(), e.vector(), e.delivery_mode(),
               e.destination(), e.masked() ? "masked " : "", e.level() ? "level " : "edge ",
               e.input() ? "asserted " : "", e.remote_irr() ? "remote-irr" : "");
  }
  for (const auto& r : table.static_routes()) fmt::print(out, "static pin: vector {:#x} -> vCPU {}\n", r.vector(), r.vcpu());
  if (!table.counters().empty()) {
    std::map<std::string, uint64_t> sorted(table.counters().begin(), table.counters().end());
    std::string line;
    for (const auto& [k, v] : sorted) {
      if (v != 0) line += fmt::format(" {}={}", k, v);
    }
    fmt::print(out, "counters:{}\n", line.empty() ? " (all zero)" : line);
  }
}

std::string Placement(const v1::VmSpec& spec) {
  std::string s;
  for (const auto& p : spec.placement()) {
    if (!s.empty()) s += " ";
    s += p.node() + "[";
    for (int i = 0; i < p.vcpus_size(); ++i) s += (i ? "," : "") + std::to_string(p.vcpus(i));
    s += "]";
  }
  return s;
}

void PrintVm(const v1::VmStatus& vm, std::ostream& out) {
  fmt::print(out, "vm {} {}{}\n", vm.name(), ShortName(vm.state()), vm.error().empty() ? "" : ": " + vm.error());
}

absl::Status Follow(const CtlOptions& opt, const v1::WatchEventsRequest& req, const FollowOptions& follow,
                    std::ostream& out) {
  Client c(opt);
  grpc::ClientContext ctx;
  if (follow.duration != absl::InfiniteDuration()) {
    ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(follow.duration));
  }
  auto reader = c.stub().WatchEvents(&ctx, req);
  v1::Event e;
  uint64_t lines = 0;
  while (reader->Read(&e)) {
    if (e.has_console()) {
      fmt::print(out, "{}\n", req.vm().empty() ? master::DescribeEvent(e)
                                               : fmt::format("[vcpu {} @ {}] {}", e.console().vcpu(),
                                                             e.console().node(), e.console().text()));
      if (follow.max_lines && ++lines >= follow.max_lines) {
        out.flush();
        ctx.TryCancel();
        break;
      }
    } else if (e.has_record()) {
      if (follow.records) {
        fmt::print(out, "{}\n", req.vm().empty() ? master::DescribeEvent(e)
                                                 : fmt::format("[vcpu {} @ {}] {}", e.record().vcpu(),
                                                               e.record().node(), master::DescribeRecord(e.record())));
      }
    } else {
      fmt::print(out, "-- {}\n", master::DescribeEvent(e));
    }
    out.flush();
  }
  const grpc::Status st = reader->Finish();
  if (st.ok() || st.error_code() == grpc::StatusCode::CANCELLED ||
      (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED && follow.duration != absl::InfiniteDuration())) {
    return absl::OkStatus();
  }
  return c.Fail(st, "watch events");
}

}  // namespace

absl::Status Status(const CtlOptions& opt, std::ostream& out) {
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::ListNodesResponse nodes;
  if (auto st = c.stub().ListNodes(&ctx, {}, &nodes); !st.ok()) return c.Fail(st, "list nodes");
  grpc::ClientContext ctx2;
  c.Prepare(ctx2);
  v1::ListVmsResponse vms;
  if (auto st = c.stub().ListVms(&ctx2, {}, &vms); !st.ok()) return c.Fail(st, "list VMs");
  fmt::print(out, "master {}: {} node(s), {} VM(s)\n", opt.master, nodes.nodes_size(), vms.vms_size());
  fmt::print(out, "{:<16} {:>4} {:<6} {:>14} {:<22} {}\n", "NODE", "ID", "HEALTH", "LAST-HEARTBEAT", "CONTROL", "VM");
  for (const auto& n : nodes.nodes()) {
    fmt::print(out, "{:<16} {:>4} {:<6} {:>11} ms {:<22} {}\n", n.node(), n.node_id(), ShortName(n.health()),
               n.last_heartbeat_ms_ago(), n.control_address(), n.vm().empty() ? "-" : n.vm());
  }
  for (const auto& vm : vms.vms()) PrintVm(vm, out);
  return absl::OkStatus();
}

absl::Status Clocks(const CtlOptions& opt, uint32_t samples, std::ostream& out) {
  Client c(opt);
  auto lab = v1::Lab::NewStub(grpc::CreateChannel(opt.master, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  // Each node takes `samples` round trips: allow for them on top of the usual timeout.
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(opt.timeout) +
                   std::chrono::milliseconds(10 * samples));
  v1::ProbeClocksRequest req;
  req.set_samples(samples);
  v1::ProbeClocksResponse resp;
  if (auto st = lab->ProbeClocks(&ctx, req, &resp); !st.ok()) return c.Fail(st, "probe clocks");
  fmt::print(out, "clock offsets against the master (node - master, RTT/2 method, {} probes per node)\n", samples);
  fmt::print(out, "{:<16} {:>14} {:>16} {:>14}\n", "NODE", "OFFSET-US", "UNCERTAINTY-US", "MIN-RTT-US");
  for (const auto& n : resp.nodes()) {
    if (!n.error().empty()) {
      fmt::print(out, "{:<16} {}\n", n.node(), n.error());
      continue;
    }
    fmt::print(out, "{:<16} {:>14.1f} {:>16.1f} {:>14.1f}\n", n.node(), n.offset_ns() / 1e3, n.uncertainty_ns() / 1e3,
               static_cast<double>(n.rtt_min_ns()) / 1e3);
  }
  return absl::OkStatus();
}

absl::Status VmValidate(const std::string& spec_file, std::ostream& out) {
  auto spec = master::LoadVmSpecFile(spec_file);
  if (!spec.ok()) return spec.status();
  auto normal = master::NormalizeVmSpec(*spec, master::SpecContext{});
  if (!normal.ok()) return normal.status();
  fmt::print(out, "{} is valid: {}\n", spec_file, master::DescribeVmSpec(*normal));
  return absl::OkStatus();
}

absl::Status VmCreate(const CtlOptions& opt, const std::string& spec_file, std::ostream& out) {
  auto spec = master::LoadVmSpecFile(spec_file);
  if (!spec.ok()) return spec.status();
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::CreateVmRequest req;
  *req.mutable_spec() = *spec;
  v1::VmStatus vm;
  if (auto st = c.stub().CreateVm(&ctx, req, &vm); !st.ok()) return c.Fail(st, "create");
  fmt::print(out, "created {}\n", master::DescribeVmSpec(vm.spec()));
  PrintVm(vm, out);
  return absl::OkStatus();
}

absl::Status VmLifecycle(const CtlOptions& opt, const std::string& verb, const std::string& name, std::ostream& out) {
  Client c(opt);
  grpc::ClientContext ctx;
  // Starting a VM prepares every node's share of it: allow more than a plain query.
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(opt.timeout * 12));
  v1::VmRef ref;
  ref.set_name(name);
  v1::VmStatus vm;
  grpc::Status st;
  if (verb == "start") {
    st = c.stub().StartVm(&ctx, ref, &vm);
  } else if (verb == "pause") {
    st = c.stub().PauseVm(&ctx, ref, &vm);
  } else if (verb == "stop") {
    st = c.stub().StopVm(&ctx, ref, &vm);
  } else {
    return absl::InvalidArgumentError(fmt::format("unknown verb '{}'; use start, pause or stop", verb));
  }
  if (!st.ok()) return c.Fail(st, verb);
  PrintVm(vm, out);
  return absl::OkStatus();
}

absl::Status VmList(const CtlOptions& opt, std::ostream& out) {
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::ListVmsResponse vms;
  if (auto st = c.stub().ListVms(&ctx, {}, &vms); !st.ok()) return c.Fail(st, "list VMs");
  fmt::print(out, "{:<20} {:<9} {:>5} {:>8} {:<14} {}\n", "VM", "STATE", "VCPUS", "MEM-MIB", "WORKLOAD", "PLACEMENT");
  for (const auto& vm : vms.vms()) {
    fmt::print(out, "{:<20} {:<9} {:>5} {:>8} {:<14} {}\n", vm.name(), ShortName(vm.state()), vm.spec().vcpus(),
               vm.spec().memory_mib(), vm.spec().workload().name(), Placement(vm.spec()));
  }
  return absl::OkStatus();
}

absl::Status VmGet(const CtlOptions& opt, const std::string& name, std::ostream& out) {
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::VmRef ref;
  ref.set_name(name);
  v1::VmStatus vm;
  if (auto st = c.stub().GetVm(&ctx, ref, &vm); !st.ok()) return c.Fail(st, "get VM");
  PrintVm(vm, out);
  std::string text;
  google::protobuf::TextFormat::PrintToString(vm.spec(), &text);
  out << text;
  return absl::OkStatus();
}

absl::Status VmTopology(const CtlOptions& opt, const std::string& name, std::ostream& out) {
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::VmRef ref;
  ref.set_name(name);
  v1::Topology topo;
  if (auto st = c.stub().GetTopology(&ctx, ref, &topo); !st.ok()) return c.Fail(st, "get topology");
  fmt::print(out, "{:>4} {:<16} {:>7} {:>7}\n", "VCPU", "NODE", "NODE-ID", "APIC-ID");
  for (const auto& v : topo.vcpus()) {
    fmt::print(out, "{:>4} {:<16} {:>7} {:>7}\n", v.vcpu(), v.node(), v.node_id(), v.apic_id());
  }
  return absl::OkStatus();
}

absl::Status VmRouting(const CtlOptions& opt, const std::string& name, std::ostream& out) {
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::VmRef ref;
  ref.set_name(name);
  v1::RoutingTable table;
  if (auto st = c.stub().GetRoutingTable(&ctx, ref, &table); !st.ok()) return c.Fail(st, "get routing table");
  PrintRoutingTable(table, out);
  return absl::OkStatus();
}

absl::Status VmPolicy(const CtlOptions& opt, const std::string& name, const std::string& policy,
                      const std::vector<std::string>& pins, std::ostream& out) {
  v1::SetRoutingPolicyRequest req;
  req.set_vm(name);
  std::string full = "ROUTING_POLICY_" + policy;
  for (auto& ch : full) ch = ch == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  v1::RoutingPolicy p;
  if (!v1::RoutingPolicy_Parse(full, &p) || p == v1::ROUTING_POLICY_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        fmt::format("unknown routing policy '{}'; use sdm, round-robin, node-local-first or static", policy));
  }
  req.set_policy(p);
  for (const auto& pin : pins) {  // VECTOR=VCPU, vector in decimal or 0x hex
    const auto eq = pin.find('=');
    unsigned long vector = 0, vcpu = 0;
    try {
      if (eq == std::string::npos) throw std::invalid_argument("no '='");
      size_t used = 0;
      vector = std::stoul(pin.substr(0, eq), &used, 0);
      if (used != eq) throw std::invalid_argument("vector");
      vcpu = std::stoul(pin.substr(eq + 1), &used, 0);
      if (used != pin.size() - eq - 1) throw std::invalid_argument("vcpu");
    } catch (const std::exception&) {
      return absl::InvalidArgumentError(fmt::format("--pin '{}': expected VECTOR=VCPU, e.g. --pin 0x44=5", pin));
    }
    auto* r = req.add_static_routes();
    r->set_vector(static_cast<uint32_t>(vector));
    r->set_vcpu(static_cast<uint32_t>(vcpu));
  }
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::RoutingTable table;
  if (auto st = c.stub().SetRoutingPolicy(&ctx, req, &table); !st.ok()) return c.Fail(st, "set routing policy");
  PrintRoutingTable(table, out);
  return absl::OkStatus();
}

absl::Status Doorbell(const CtlOptions& opt, const DoorbellOptions& d, std::ostream& out) {
  v1::RingDoorbellRequest req;
  req.set_vm(d.vm);
  req.set_node(d.node);
  req.set_gsi(d.gsi);
  req.set_level(d.level);
  req.set_asserted(!d.deassert);
  req.set_traced(d.traced);
  req.set_count(d.count);
  req.set_interval_us(d.interval_us);
  Client c(opt);
  grpc::ClientContext ctx;
  c.Prepare(ctx);
  v1::RingDoorbellResponse resp;
  if (auto st = c.stub().RingDoorbell(&ctx, req, &resp); !st.ok()) return c.Fail(st, "ring doorbell");
  if (d.count > 0) {
    fmt::print(out, "node {} (id {}) raises GSI {}: a train of {} edges, one every {} µs\n", d.node, resp.node_id(),
               d.gsi, d.count, d.interval_us);
    return absl::OkStatus();
  }
  fmt::print(out, "rang GSI {} on node {} (id {}): {}\n", d.gsi, d.node, resp.node_id(),
             d.level ? (d.deassert ? "level deasserted" : "level asserted") : "edge");
  return absl::OkStatus();
}

absl::Status Console(const CtlOptions& opt, const std::string& vm, const FollowOptions& follow, std::ostream& out) {
  v1::WatchEventsRequest req;
  req.set_vm(vm);
  req.set_console(true);
  {
    // Refuse an unknown VM (WatchEvents itself would just stay silent).
    Client c(opt);
    grpc::ClientContext ctx;
    c.Prepare(ctx);
    v1::VmRef ref;
    ref.set_name(vm);
    v1::VmStatus status;
    if (auto st = c.stub().GetVm(&ctx, ref, &status); !st.ok()) return c.Fail(st, "get VM");
  }
  return Follow(opt, req, follow, out);
}

absl::Status Events(const CtlOptions& opt, const FollowOptions& follow, std::ostream& out) {
  v1::WatchEventsRequest req;
  req.set_console(true);
  return Follow(opt, req, follow, out);
}

}  // namespace aggvm::ctl
