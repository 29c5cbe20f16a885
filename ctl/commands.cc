#include "ctl/commands.h"

#include <chrono>
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
    } else if (!e.has_record()) {
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
  fmt::print(out, "vm {} policy {}\n", table.vm(), v1::RoutingPolicy_Name(table.policy()));
  fmt::print(out, "{:>4} {:<6} {:>6} {:<10} {:<34} {}\n", "GSI", "SOURCE", "VECTOR", "DELIVERY", "DESTINATION", "FLAGS");
  for (const auto& e : table.entries()) {
    fmt::print(out, "{:>4} {:<6} {:>6} {:<10} {:<34} {}{}{}\n", e.gsi(), e.source(), e.vector(), e.delivery_mode(),
               e.destination(), e.masked() ? "masked " : "", e.level() ? "level " : "edge ",
               e.remote_irr() ? "remote-irr" : "");
  }
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
