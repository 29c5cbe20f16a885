#include "master/vm_spec.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include <fmt/format.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/json_util.h>

#include "absl/strings/str_join.h"
#include "common/types.h"
#include "guest/abi.h"
#include "vcpu/elf_loader.h"

#ifndef AGGVM_PROBE_GUEST_ELF
#define AGGVM_PROBE_GUEST_ELF ""
#endif

namespace aggvm::master {
namespace {

struct WorkloadName {
  std::string_view name;
  uint32_t value;
};
// The same names `aggvm-agent --standalone --workload` accepts (node-agent/probe_vm.h ParseWorkload).
constexpr WorkloadName kWorkloads[] = {
    {"hello", guest::AGGVM_WORKLOAD_HELLO},       {"ipi-pingpong", guest::AGGVM_WORKLOAD_IPI_PINGPONG},
    {"irq-sink", guest::AGGVM_WORKLOAD_IRQ_SINK}, {"spin", guest::AGGVM_WORKLOAD_SPIN},
    {"exit-loop", guest::AGGVM_WORKLOAD_EXIT_LOOP}, {"bad-port", guest::AGGVM_WORKLOAD_BAD_PORT},
    {"unmapped", guest::AGGVM_WORKLOAD_UNMAPPED}, {"triple-fault", guest::AGGVM_WORKLOAD_TRIPLE_FAULT},
    // Issue 6 IPI workloads (their fields are checked by the agent, node-agent/cluster_vm_host.cc).
    {"ipi-broadcast", guest::AGGVM_WORKLOAD_IPI_BROADCAST}, {"nmi", guest::AGGVM_WORKLOAD_NMI},
    {"ipi-nowhere", guest::AGGVM_WORKLOAD_IPI_NOWHERE}, {"lowest-priority", guest::AGGVM_WORKLOAD_LOWEST_PRIORITY},
    {"ap-bringup", guest::AGGVM_WORKLOAD_AP_BRINGUP},
};
static_assert(kMaxVcpus == AGGVM_MAX_VCPUS, "the spec limit is the guest ABI's");

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column, const std::string& message) override {
    errors.push_back(fmt::format("line {}, column {}: {}", line + 1, column + 1, message));
  }
  std::vector<std::string> errors;
};

bool ValidVmName(const std::string& name) {
  if (name.empty() || name.size() > 63) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

// Lists vCPU indices compactly: "4, 5, 7".
std::string JoinIndices(const std::vector<uint32_t>& v) { return absl::StrJoin(v, ", "); }

}  // namespace

std::string DefaultGuestImage() { return AGGVM_PROBE_GUEST_ELF; }

std::optional<uint32_t> WorkloadByName(std::string_view name) {
  for (const auto& w : kWorkloads) {
    if (w.name == name) return w.value;
  }
  return std::nullopt;
}

std::string WorkloadNames() {
  std::vector<std::string> names;
  for (const auto& w : kWorkloads) names.emplace_back(w.name);
  return absl::StrJoin(names, ", ");
}

absl::StatusOr<v1::VmSpec> ParseVmSpec(std::string_view text, SpecFormat format) {
  if (format == SpecFormat::kAuto) {
    auto first = std::find_if(text.begin(), text.end(), [](char c) { return !std::isspace(static_cast<unsigned char>(c)); });
    format = (first != text.end() && *first == '{') ? SpecFormat::kJson : SpecFormat::kText;
  }
  v1::VmSpec spec;
  if (format == SpecFormat::kJson) {
    google::protobuf::util::JsonParseOptions opts;
    opts.ignore_unknown_fields = false;
    auto st = google::protobuf::util::JsonStringToMessage(std::string(text), &spec, opts);
    if (!st.ok()) {
      return absl::InvalidArgumentError(fmt::format("VM spec (JSON): {}", st.ToString()));
    }
    return spec;
  }
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(text), &spec)) {
    return absl::InvalidArgumentError(
        fmt::format("VM spec (protobuf text): {}", errors.errors.empty() ? "parse error" : absl::StrJoin(errors.errors, "; ")));
  }
  return spec;
}

absl::StatusOr<v1::VmSpec> LoadVmSpecFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(fmt::format("cannot open VM spec file '{}'", path));
  std::ostringstream buf;
  buf << in.rdbuf();
  SpecFormat format = SpecFormat::kAuto;
  auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with(".json")) {
    format = SpecFormat::kJson;
  } else if (ends_with(".textproto") || ends_with(".txtpb") || ends_with(".pbtxt")) {
    format = SpecFormat::kText;
  }
  auto spec = ParseVmSpec(buf.str(), format);
  if (!spec.ok()) return absl::InvalidArgumentError(fmt::format("{}: {}", path, std::string(spec.status().message())));
  return spec;
}

void FillDefaults(v1::VmSpec& spec, const SpecContext& ctx) {
  if (spec.memory_mib() == 0) spec.set_memory_mib(kDefaultMemoryMib);
  if (spec.irqchip() == v1::IRQCHIP_MODE_UNSPECIFIED) spec.set_irqchip(v1::IRQCHIP_MODE_KERNEL);
  if (spec.transport() == v1::TRANSPORT_KIND_UNSPECIFIED) spec.set_transport(v1::TRANSPORT_KIND_TCP);
  if (spec.wait_mode() == v1::WAIT_MODE_UNSPECIFIED) spec.set_wait_mode(v1::WAIT_MODE_BUSY_POLL);
  if (spec.routing_policy() == v1::ROUTING_POLICY_UNSPECIFIED) spec.set_routing_policy(v1::ROUTING_POLICY_SDM);
  if (spec.route_mode() == v1::ROUTE_MODE_UNSPECIFIED) spec.set_route_mode(v1::ROUTE_MODE_VIA_MASTER);
  if (spec.image().path().empty()) spec.mutable_image()->set_path(ctx.default_image);
  for (auto& r : *spec.mutable_interrupt_routes()) {
    if (r.delivery() == v1::INTERRUPT_DELIVERY_UNSPECIFIED) r.set_delivery(v1::INTERRUPT_DELIVERY_FIXED);
    if (r.dest_mode() == v1::DESTINATION_MODE_UNSPECIFIED) r.set_dest_mode(v1::DESTINATION_MODE_PHYSICAL);
    if (r.trigger() == v1::INTERRUPT_TRIGGER_UNSPECIFIED) r.set_trigger(v1::INTERRUPT_TRIGGER_EDGE);
  }
  auto* w = spec.mutable_workload();
  if (w->name().empty()) w->set_name("hello");
  if (w->name() == "ipi-pingpong") {
    if (w->ping_vcpu() == 0 && w->pong_vcpu() == 0) w->set_pong_vcpu(1);
    if (w->ipi_vector() == 0) w->set_ipi_vector(kDefaultIpiVector);
  }
}

absl::Status ValidateRouting(v1::RoutingPolicy policy, const google::protobuf::RepeatedPtrField<v1::StaticRoute>& routes,
                             uint32_t vcpus, std::string_view prefix) {
  std::vector<std::string> errs;
  if (!v1::RoutingPolicy_IsValid(policy) || policy == v1::ROUTING_POLICY_UNSPECIFIED) {
    errs.push_back(fmt::format("{}routing_policy: unknown value {}; use ROUTING_POLICY_SDM, _ROUND_ROBIN, "
                               "_NODE_LOCAL_FIRST or _STATIC", prefix, static_cast<int>(policy)));
  }
  if (policy != v1::ROUTING_POLICY_STATIC && !routes.empty()) {
    errs.push_back(fmt::format("{}static_routes: {} route(s) given but routing_policy is {}; set routing_policy: "
                               "ROUTING_POLICY_STATIC or remove them",
                               prefix, routes.size(), v1::RoutingPolicy_Name(policy)));
  }
  if (policy == v1::ROUTING_POLICY_STATIC && routes.empty()) {
    errs.push_back(fmt::format("{}static_routes: empty but routing_policy is ROUTING_POLICY_STATIC; pin at least one "
                               "vector to a vCPU", prefix));
  }
  std::map<uint32_t, int> seen;
  for (int i = 0; i < routes.size(); ++i) {
    const auto& r = routes[i];
    if (r.vector() < kMinVector || r.vector() > kMaxVector) {
      errs.push_back(fmt::format("{}static_routes[{}].vector: {} is outside {}..{}", prefix, i, r.vector(), kMinVector,
                                 kMaxVector));
    }
    if (r.vcpu() >= vcpus) {
      errs.push_back(fmt::format("{}static_routes[{}].vcpu: vCPU {} does not exist (the VM has {} vCPUs)", prefix, i,
                                 r.vcpu(), vcpus));
    }
    auto [it, fresh] = seen.emplace(r.vector(), i);
    if (!fresh) {
      errs.push_back(fmt::format("{}static_routes[{}].vector: vector {} is already routed by static_routes[{}]", prefix,
                                 i, r.vector(), it->second));
    }
  }
  if (errs.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(errs, "; "));
}

absl::StatusOr<uint64_t> ImageEnd(const std::string& path) {
  auto bytes = vcpu::ReadWholeFile(path);
  if (!bytes.ok()) return bytes.status();
  auto image = vcpu::ParseElf(*bytes, GuestAddress(AGGVM_IMAGE_MIN_GPA),
                              GuestAddress(std::numeric_limits<uint64_t>::max()));
  if (!image.ok()) return image.status();
  uint64_t end = 0;
  for (const auto& seg : image->segments) {
    auto seg_end = seg.gpa.checked_add(seg.mem_size);
    if (!seg_end) return absl::InvalidArgumentError(fmt::format("segment at {} wraps around", seg.gpa));
    end = std::max(end, seg_end->raw());
  }
  return end;
}

namespace {

// interrupt_routes: IOAPIC entries the master programs at start (82093AA 3.2.4).
void ValidateInterruptRoutes(const v1::VmSpec& spec, uint32_t vcpus, std::vector<std::string>& errs) {
  std::map<uint32_t, int> by_gsi;
  for (int i = 0; i < spec.interrupt_routes_size(); ++i) {
    const auto& r = spec.interrupt_routes(i);
    const std::string f = fmt::format("interrupt_routes[{}]", i);
    if (r.gsi() >= kIoApicPins) {
      errs.push_back(fmt::format("{}.gsi: {} is not an IOAPIC pin (0..{})", f, r.gsi(), kIoApicPins - 1));
    } else if (auto [it, fresh] = by_gsi.emplace(r.gsi(), i); !fresh) {
      errs.push_back(fmt::format("{}.gsi: GSI {} is already routed by interrupt_routes[{}]; one entry per pin", f,
                                 r.gsi(), it->second));
    }
    if (r.vector() < kMinVector || r.vector() > kMaxVector) {
      errs.push_back(fmt::format("{}.vector: {} is outside {}..{}", f, r.vector(), kMinVector, kMaxVector));
    }
    if (!v1::InterruptDelivery_IsValid(r.delivery()) || r.delivery() == v1::INTERRUPT_DELIVERY_UNSPECIFIED) {
      errs.push_back(fmt::format("{}.delivery: unknown value {}; use INTERRUPT_DELIVERY_FIXED or "
                                 "INTERRUPT_DELIVERY_LOWEST_PRIORITY", f, static_cast<int>(r.delivery())));
    }
    if (!v1::InterruptTrigger_IsValid(r.trigger()) || r.trigger() == v1::INTERRUPT_TRIGGER_UNSPECIFIED) {
      errs.push_back(fmt::format("{}.trigger: unknown value {}; use INTERRUPT_TRIGGER_EDGE or INTERRUPT_TRIGGER_LEVEL",
                                 f, static_cast<int>(r.trigger())));
    }
    if (r.destination() > 0xFF) {
      errs.push_back(fmt::format("{}.destination: {:#x} does not fit the 8-bit RTE destination field", f,
                                 r.destination()));
    }
    switch (r.dest_mode()) {
      case v1::DESTINATION_MODE_PHYSICAL:
        if (vcpus > 0 && r.destination() >= vcpus && r.destination() != 0xFF) {
          errs.push_back(fmt::format("{}.destination: APIC ID {} names no vCPU (vCPU i has APIC ID i; the VM has {}); "
                                     "use 0..{} or 0xFF (broadcast)", f, r.destination(), vcpus, vcpus - 1));
        }
        break;
      case v1::DESTINATION_MODE_LOGICAL:
        if (r.destination() == 0) {
          errs.push_back(fmt::format("{}.destination: logical mask 0 names no vCPU", f));
        }
        if (spec.workload().xapic()) {
          errs.push_back(fmt::format("{}.dest_mode: logical destinations need x2APIC (the probe guest leaves the "
                                     "xAPIC LDR at 0); use DESTINATION_MODE_PHYSICAL or workload.xapic: false", f));
        }
        break;
      default:
        errs.push_back(fmt::format("{}.dest_mode: unknown value {}; use DESTINATION_MODE_PHYSICAL or "
                                   "DESTINATION_MODE_LOGICAL", f, static_cast<int>(r.dest_mode())));
    }
  }
}

}  // namespace

absl::Status ValidateVmSpec(const v1::VmSpec& spec, const SpecContext& ctx) {
  std::vector<std::string> errs;
  auto err = [&](std::string e) { errs.push_back(std::move(e)); };

  if (!ValidVmName(spec.name())) {
    err(fmt::format("name: '{}' is not a VM name; use 1..63 letters, digits, '-', '_' or '.'", spec.name()));
  }
  const uint32_t n = spec.vcpus();
  if (n == 0) err("vcpus: 0 vCPUs; a VM needs at least 1");
  if (n > kMaxVcpus) err(fmt::format("vcpus: {} vCPUs is above the maximum of {}", n, kMaxVcpus));
  const bool n_ok = n > 0 && n <= kMaxVcpus;

  // Placement: known nodes, each node once, each vCPU exactly once.
  if (spec.placement().empty()) {
    err("placement: empty; place every vCPU on a node (placement { node: \"a\" vcpus: [0, 1] })");
  }
  std::map<std::string, int> node_entry;
  std::map<uint32_t, int> owner;  // vCPU -> placement index
  for (int i = 0; i < spec.placement_size(); ++i) {
    const auto& p = spec.placement(i);
    if (p.node().empty()) {
      err(fmt::format("placement[{}].node: empty; name a registered node", i));
    } else {
      auto [it, fresh] = node_entry.emplace(p.node(), i);
      if (!fresh) {
        err(fmt::format("placement[{}].node: node '{}' is already used by placement[{}]; list its vCPUs once", i,
                        p.node(), it->second));
      }
      if (ctx.nodes) {
        auto known = std::find_if(ctx.nodes->begin(), ctx.nodes->end(), [&](const KnownNode& k) { return k.name == p.node(); });
        if (known == ctx.nodes->end()) {
          std::vector<std::string> names;
          for (const auto& k : *ctx.nodes) names.push_back(k.name);
          err(names.empty() ? fmt::format("placement[{}].node: unknown node '{}'; no node is registered yet (start "
                                          "the node agents first; `aggvmctl status` lists them)", i, p.node())
                            : fmt::format("placement[{}].node: unknown node '{}'; registered nodes: [{}]", i, p.node(),
                                          absl::StrJoin(names, ", ")));
        } else if (spec.transport() == v1::TRANSPORT_KIND_RDMA && !known->rdma) {
          err(fmt::format("placement[{}].node: transport is TRANSPORT_KIND_RDMA but node '{}' registered no RDMA "
                          "endpoint; use TRANSPORT_KIND_TCP or start its agent with an RDMA device", i, p.node()));
        }
      }
    }
    if (p.vcpus().empty()) err(fmt::format("placement[{}].vcpus: node '{}' is given no vCPU", i, p.node()));
    for (int j = 0; j < p.vcpus_size(); ++j) {
      const uint32_t v = p.vcpus(j);
      if (n_ok && v >= n) {
        err(fmt::format("placement[{}].vcpus[{}]: vCPU {} does not exist (vcpus = {}, indices 0..{})", i, j, v, n, n - 1));
        continue;
      }
      auto [it, fresh] = owner.emplace(v, i);
      if (!fresh) {
        err(fmt::format("placement[{}].vcpus[{}]: vCPU {} is also placed on node '{}' (placement[{}]); place each vCPU "
                        "on exactly one node", i, j, v, spec.placement(it->second).node(), it->second));
      }
    }
  }
  if (n_ok && !spec.placement().empty()) {
    std::vector<uint32_t> nowhere;
    for (uint32_t v = 0; v < n; ++v) {
      if (!owner.contains(v)) nowhere.push_back(v);
    }
    if (!nowhere.empty()) {
      err(fmt::format("placement: vCPU(s) {} placed on no node; every vCPU 0..{} must be on exactly one node",
                      JoinIndices(nowhere), n - 1));
    }
  }

  // Modes.
  if (!v1::IrqchipMode_IsValid(spec.irqchip()) || spec.irqchip() == v1::IRQCHIP_MODE_UNSPECIFIED) {
    err(fmt::format("irqchip: unknown value {}; use IRQCHIP_MODE_KERNEL or IRQCHIP_MODE_USER", static_cast<int>(spec.irqchip())));
  }
  if (!v1::TransportKind_IsValid(spec.transport()) || spec.transport() == v1::TRANSPORT_KIND_UNSPECIFIED) {
    err(fmt::format("transport: unknown value {}; use TRANSPORT_KIND_TCP or TRANSPORT_KIND_RDMA", static_cast<int>(spec.transport())));
  }
  if (!v1::WaitMode_IsValid(spec.wait_mode()) || spec.wait_mode() == v1::WAIT_MODE_UNSPECIFIED) {
    err(fmt::format("wait_mode: unknown value {}; use WAIT_MODE_BUSY_POLL or WAIT_MODE_EVENT", static_cast<int>(spec.wait_mode())));
  }
  if (!v1::RouteMode_IsValid(spec.route_mode()) || spec.route_mode() == v1::ROUTE_MODE_UNSPECIFIED) {
    err(fmt::format("route_mode: unknown value {}; use ROUTE_MODE_VIA_MASTER or ROUTE_MODE_DIRECT", static_cast<int>(spec.route_mode())));
  }
  if (auto st = ValidateRouting(spec.routing_policy(), spec.static_routes(), n_ok ? n : 0); !st.ok()) {
    err(std::string(st.message()));
  }

  ValidateInterruptRoutes(spec, n_ok ? n : 0, errs);

  // Memory and image.
  const uint64_t mib = spec.memory_mib();
  if (mib < kMinMemoryMib || mib > kMaxMemoryMib) {
    err(fmt::format("memory_mib: {} MiB is outside {}..{} MiB", mib, kMinMemoryMib, kMaxMemoryMib));
  }
  if (spec.image().path().empty()) {
    err("image.path: empty and this build knows no default probe guest; give the guest ELF's path");
  } else {
    auto end = ImageEnd(spec.image().path());
    if (!end.ok()) {
      err(fmt::format("image.path: cannot use '{}': {}", spec.image().path(), std::string(end.status().message())));
    } else if (*end > mib * (1ull << 20)) {
      const uint64_t need_mib = (*end + (1ull << 20) - 1) >> 20;
      err(fmt::format("memory_mib: {} MiB is too small for image '{}', which is loaded up to {:#x}; give at least {} MiB",
                      mib, spec.image().path(), *end, std::max(need_mib, kMinMemoryMib)));
    }
  }

  // Workload.
  const auto& w = spec.workload();
  if (!WorkloadByName(w.name())) {
    err(fmt::format("workload.name: unknown workload '{}'; known: {}", w.name(), WorkloadNames()));
  } else if (w.name() == "ipi-pingpong" && n_ok) {
    if (n < 2) err(fmt::format("workload.name: ipi-pingpong needs at least 2 vCPUs (vcpus = {})", n));
    if (w.ping_vcpu() >= n) err(fmt::format("workload.ping_vcpu: vCPU {} does not exist (vcpus = {})", w.ping_vcpu(), n));
    if (w.pong_vcpu() >= n) err(fmt::format("workload.pong_vcpu: vCPU {} does not exist (vcpus = {})", w.pong_vcpu(), n));
    if (w.ping_vcpu() == w.pong_vcpu()) {
      err(fmt::format("workload.pong_vcpu: same vCPU {} as ping_vcpu; ping and pong must differ", w.pong_vcpu()));
    }
    if (w.ipi_vector() < kMinVector || w.ipi_vector() > kMaxVector) {
      err(fmt::format("workload.ipi_vector: {} is outside {}..{}", w.ipi_vector(), kMinVector, kMaxVector));
    }
  }
  // Issue 6 workload fields (the agent maps them to ProbeVmConfig; the guest checks the rest).
  if (!w.dest_kind().empty() && w.dest_kind() != "all-excluding-self" && w.dest_kind() != "all-including-self" &&
      w.dest_kind() != "physical-broadcast" && w.dest_kind() != "x2apic-logical") {
    err(fmt::format("workload.dest_kind: unknown '{}'; use all-excluding-self, all-including-self, physical-broadcast "
                    "or x2apic-logical", w.dest_kind()));
  }
  if (n_ok && static_cast<uint32_t>(w.tpr_size()) > n) {
    err(fmt::format("workload.tpr: {} entries for {} vCPUs", w.tpr_size(), n));
  }
  for (int i = 0; i < w.tpr_size(); ++i) {
    if (w.tpr(i) > 0xFF) err(fmt::format("workload.tpr[{}]: {} is not a TPR value (0..255)", i, w.tpr(i)));
  }
  if (n_ok && w.has_nowhere_apic_id() && w.nowhere_apic_id() < n) {
    err(fmt::format("workload.nowhere_apic_id: APIC ID {} belongs to vCPU {}; pick one >= vcpus ({})",
                    w.nowhere_apic_id(), w.nowhere_apic_id(), n));
  }

  if (errs.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      fmt::format("VM spec '{}' is invalid: {}", spec.name(), absl::StrJoin(errs, "; ")));
}

absl::StatusOr<v1::VmSpec> NormalizeVmSpec(v1::VmSpec spec, const SpecContext& ctx) {
  FillDefaults(spec, ctx);
  if (auto st = ValidateVmSpec(spec, ctx); !st.ok()) return st;
  return spec;
}

std::string DescribeVmSpec(const v1::VmSpec& spec) {
  std::vector<std::string> parts;
  for (const auto& p : spec.placement()) {
    parts.push_back(fmt::format("{}[{}]", p.node(), absl::StrJoin(p.vcpus(), ",")));
  }
  return fmt::format("{}: {} vCPUs on {}, {} MiB, {}", spec.name(), spec.vcpus(), absl::StrJoin(parts, " "),
                     spec.memory_mib(), spec.workload().name());
}

}  // namespace aggvm::master
