#include "node-agent/cluster_vm_host.h"

#include <linux/kvm.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <bitset>
#include <condition_variable>
#include <mutex>
#include <stop_token>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/thread.h"
#include "irqchip/destination.h"
#include "lab/trace_record.h"
#include "node-agent/injector_vm_port.h"
#include "node-agent/io_forwarder.h"
#include "node-agent/local_controller.h"
#include "node-agent/probe_vm.h"
#include "node-agent/trace_reporter.h"
#include "transport/rdma/rdma_transport.h"
#include "transport/rdma/tcp_bootstrap.h"
#include "transport/tcp_transport.h"
#include "vcpu/kvm.h"
#include "vcpu/msi.h"
#include "vcpu/proxy_vcpu.h"
#include "vcpu/user_irqchip.h"
#include "vcpu/vm.h"

namespace aggvm::agent {

namespace v1 = ::aggvm::v1;
using control::GuestOutput;
using control::LocalVmPlan;

namespace {

// The master devices the guest reaches with forwarded I/O (master/devices/: console UART at COM1, the doorbell; the
// IOAPIC registers of GlobalControllerConfig::ioapic_mmio_base).
constexpr std::pair<uint16_t, uint16_t> kUartPorts{0x3F8, 0x3FF};
constexpr std::pair<uint16_t, uint16_t> kDoorbellPorts{0x0A70, 0x0A77};
constexpr std::pair<uint64_t, uint64_t> kIoapicMmio{0xFEC00000, 0xFEC000FF};
constexpr uint32_t kDefaultIterations = 1000;
// GSIs below the split irqchip's reserved IOAPIC pins (ProbeVm enables 24) are the only ones KVM scans for level
// routes (kvm_scan_ioapic_routes).
constexpr uint32_t kLevelRouteGsis = 24;
// ProxySet's limit (proxy_stub_abi.h: 64 KiB of 1 KiB stacks).
constexpr size_t kMaxProxies = 64;

struct HostPort {
  std::string host;
  std::string port;
};

absl::StatusOr<HostPort> SplitHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(
        fmt::format("address '{}' is not host:port (e.g. 0.0.0.0:7100 or 10.0.0.2:7100)", address));
  }
  return HostPort{address.substr(0, colon), address.substr(colon + 1)};
}

// Binds a throw-away socket to host:0 to learn a free port. (Another process could take it before the transport binds
// it; the transport then fails with a message naming the address.)
absl::StatusOr<std::string> ResolveListenAddress(const std::string& address) {
  auto hp = SplitHostPort(address);
  if (!hp.ok()) return hp.status();
  if (hp->port != "0") return address;
  std::string host = hp->host;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* res = nullptr;
  if (const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), "0", &hints, &res); rc != 0) {
    return absl::InvalidArgumentError(fmt::format("data-plane address '{}': {}", address, gai_strerror(rc)));
  }
  const int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return absl::UnavailableError(fmt::format("data-plane address '{}': socket: errno {}", address, errno));
  }
  const int rc = ::bind(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (rc != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::UnavailableError(
        fmt::format("data-plane address '{}' cannot be bound (errno {}); pass --data-listen with a free address", address,
                    err));
  }
  ::close(fd);
  const uint16_t port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                                       : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return fmt::format("{}:{}", hp->host, port);
}

// The local vCPUs as the LocalController sees them: InjectorVmPort (KVM_SIGNAL_MSI / the user irqchip), plus, in
// `kernel` mode, the level MSI route that makes KVM report the EOI of a level-triggered vector (see the header).
// Inject runs on the data-plane thread only: the route table needs no lock.
class ClusterVmPort final : public VmPort {
 public:
  ClusterVmPort(ProbeVm& vm, std::vector<ApicId> apic_ids, bool x2apic)
      : vm_(vm), apic_ids_(apic_ids), inner_(&vm.injector(), std::move(apic_ids)), x2apic_(x2apic) {}

  absl::Status Inject(VcpuIndex vcpu, Vector vector, irqchip::DeliveryMode mode, bool level_triggered) override {
    if (level_triggered && vm_.irqchip_mode() == vcpu::IrqchipMode::kKernel && !routed_.test(vector.value())) {
      if (routes_.size() < kLevelRouteGsis) {
        // Broadcast destination: every local vCPU gets the vector in its EOI-exit set (x2APIC mode: 0xFFFFFFFF with
        // KVM_X2APIC_API_USE_32BIT_IDS; xAPIC: 0xFF), so one route per vector serves whichever vCPU the master chose.
        const ApicId broadcast(x2apic_ ? 0xFFFFFFFFu : 0xFFu);
        routes_.push_back({Gsi(static_cast<uint32_t>(routes_.size())),
                           vcpu::FixedMsi(broadcast, vector, vcpu::MsiTrigger::kLevel)});
        if (auto s = vm_.vm().SetGsiRouting(routes_); !s.ok()) {
          routes_.pop_back();
          route_failures_.fetch_add(1, std::memory_order_relaxed);
        } else {
          routed_.set(vector.value());
          level_routes_.store(routes_.size(), std::memory_order_relaxed);
        }
      } else {
        exhausted_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (vcpu::UserIrqchip* chip = vm_.user_irqchip()) {
      // `user` mode: straight into the userspace router (fixed, NMI, INIT, SIPI; the master / the sender already
      // chose this one vCPU), physical destination = its APIC ID.
      if (vcpu.value() >= apic_ids_.size()) {
        return absl::InvalidArgumentError(fmt::format("inject: vCPU {} is not a vCPU of this VM", vcpu));
      }
      irqchip::InterruptMessage m;
      m.vector = vector;
      m.mode = mode;
      m.dest_mode = irqchip::DestMode::kPhysical;
      m.trigger = level_triggered ? irqchip::TriggerMode::kLevel : irqchip::TriggerMode::kEdge;
      m.destination = apic_ids_[vcpu.value()].value();
      m.x2apic_destination = true;
      if (chip->Deliver(m) == 0) {
        return absl::UnavailableError(fmt::format("inject: no local APIC accepted vector {} for vCPU {}", vector, vcpu));
      }
      return absl::OkStatus();
    }
    return inner_.Inject(vcpu, vector, mode, level_triggered);
  }

  [[nodiscard]] uint64_t level_routes() const { return level_routes_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t exhausted() const { return exhausted_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t route_failures() const { return route_failures_.load(std::memory_order_relaxed); }

 private:
  ProbeVm& vm_;
  const std::vector<ApicId> apic_ids_;
  InjectorVmPort inner_;
  const bool x2apic_;
  std::bitset<256> routed_;
  std::vector<vcpu::GsiRoute> routes_;  // reserved once (kLevelRouteGsis)
  std::atomic<uint64_t> level_routes_{0};
  std::atomic<uint64_t> exhausted_{0};
  std::atomic<uint64_t> route_failures_{0};
};

// `kernel` mode: what the proxy vCPUs caught goes to the LocalController, which forwards it per route mode. APIC
// IDs at or above `first_nowhere` belong to no vCPU of the VM (the "nowhere" proxies): counted, dropped. Proxy
// threads call this; no allocation, no lock but the send spinlock.
class ProxyForwarder final : public vcpu::ProxySink {
 public:
  ProxyForwarder(LocalController* const* lc, uint32_t first_nowhere) : lc_(lc), first_nowhere_(first_nowhere) {}
  void OnRemoteIpi(ApicId remote, Vector vector) override { Forward(remote, irqchip::DeliveryMode::kFixed, vector); }
  void OnRemoteNmi(ApicId remote) override { Forward(remote, irqchip::DeliveryMode::kNmi, Vector(0)); }
  void OnRemoteInit(ApicId remote) override { Forward(remote, irqchip::DeliveryMode::kInit, Vector(0)); }
  void OnRemoteSipi(ApicId remote, uint8_t vector) override {
    Forward(remote, irqchip::DeliveryMode::kStartup, Vector(vector));
  }

 private:
  void Forward(ApicId remote, irqchip::DeliveryMode mode, Vector vector) {
    LocalController* lc = *lc_;
    if (remote.value() >= first_nowhere_) {
      lc->CountNowhere();
      return;
    }
    lc->ForwardIpi(remote, mode, vector);
  }
  LocalController* const* lc_;
  const uint32_t first_nowhere_;
};

// `user` mode: ICR messages the user irqchip hands over (they may name remote vCPUs). `source` is the sender's
// position in the UserIrqchip, i.e. in the local vCPU list.
//
// It also keeps the master's copy of each local vCPU's priority (PPR) current for lowest-priority arbitration: at
// each TPR write, and before forwarding a vCPU's IPI if its PPR changed (the frame precedes the IPI on the link to
// the master, so the EOI of a handler is known to the Router before anything that IPI causes — e.g. another vCPU's
// lowest-priority IPI sent once this one answered). Without them the Router arbitrates with the poller's values, 5
// to 10 ms old: TPRs not yet reported after boot, or a PPR sampled while a slow handler had its vector in service.
// The poller (ReportIfStable) still reports the other changes. One mutex orders the three so that a stale sample
// never overwrites a fresher report.
class IcrForwarder final : public vcpu::RemoteIpiSink {
 public:
  IcrForwarder(LocalController* const* lc, std::vector<VcpuIndex> local, vcpu::UserIrqchip* chip)
      : lc_(lc), local_(std::move(local)), chip_(chip), reported_(local_.size(), 0) {}
  void OnRemoteIcr(VcpuIndex source, const irqchip::InterruptMessage& message) override {
    const bool local = source.value() < local_.size();
    if (local) {
      std::lock_guard l(mu_);  // held for one PPR read and one frame; the poller holds it no longer
      ReportLocked(source.value(), chip_->Priority(source));
    }
    (*lc_)->ForwardIcr(local ? local_[source.value()] : source, message);
  }
  // A TPR write: reported at once, before the guest runs on (it may tell other vCPUs by a local IPI or in memory).
  void OnTprWrite(VcpuIndex vcpu) override {
    if (vcpu.value() >= local_.size()) return;
    std::lock_guard l(mu_);
    ReportLocked(vcpu.value(), chip_->Priority(vcpu));
  }
  // Poller: reports local vCPU `i`'s PPR if it still equals `sampled` (two samples agreed on it) and changed.
  void ReportIfStable(size_t i, uint8_t sampled) {
    std::lock_guard l(mu_);
    const uint8_t ppr = chip_->Priority(VcpuIndex(static_cast<uint32_t>(i)));
    if (ppr == sampled) ReportLocked(i, ppr);
  }

 private:
  void ReportLocked(size_t i, uint8_t ppr) {
    if (ppr == reported_[i]) return;
    reported_[i] = ppr;
    (*lc_)->ReportPriority(local_[i], ppr);
  }
  LocalController* const* lc_;
  const std::vector<VcpuIndex> local_;
  vcpu::UserIrqchip* const chip_;
  std::mutex mu_;
  std::vector<uint8_t> reported_;  // (mu_) the master starts every vCPU at priority 0
};

}  // namespace

// One prepared VM. Teardown order (~Runtime): vCPUs, data-plane thread, transport, then the objects.
struct ClusterVmHost::Runtime {
  std::string vm_name;
  std::string node;
  GuestOutput* output = nullptr;
  std::unique_ptr<transport::Transport> transport;
  std::unique_ptr<ProbeVm> vm;
  std::unique_ptr<ClusterVmPort> port;
  std::unique_ptr<TraceReporter> traces;        // what lc's on_trace feeds; outlives lc (reset after it)
  std::unique_ptr<LocalController> lc;
  std::unique_ptr<IoForwarder> io;
  LocalController* lc_raw = nullptr;            // what the forwarders read (set once lc exists, before any start)
  std::unique_ptr<ProxyForwarder> proxy_sink;   // kernel mode
  std::unique_ptr<vcpu::ProxySet> proxies;      // kernel mode: one proxy per remote vCPU + the nowhere proxies
  std::vector<ApicId> proxy_ids;
  std::unique_ptr<IcrForwarder> icr_sink;       // user mode
  std::vector<transport::PeerEndpoint> peers;
  std::jthread dataplane;
  std::jthread priority_reporter;  // user mode with remote vCPUs: local PPR changes -> master (lowest priority)

  std::mutex mu;
  std::condition_variable cv;
  bool connect_done = false;       // guarded by mu
  absl::Status connect_status;     // guarded by mu
  absl::Status dataplane_status;   // guarded by mu: why the data-plane thread ended early
  bool started = false;            // VmHost calls only (serialised by the host's mu_)
  bool paused = false;
  std::atomic<uint64_t> io_no_device{0};

  ~Runtime() {
    if (priority_reporter.joinable()) {
      priority_reporter.request_stop();
      priority_reporter.join();
    }
    if (proxies) proxies->Stop();  // before the VM (they are vCPUs of it) and before lc / transport (they send)
    if (vm) vm->Stop();
    if (dataplane.joinable()) {
      dataplane.request_stop();
      dataplane.join();
    }
    if (transport) transport->Close();
    io.reset();
    proxies.reset();
    lc.reset();
    traces.reset();  // reports what is still queued
    port.reset();
    vm.reset();
    transport.reset();
  }
};

ClusterVmHost::ClusterVmHost(ClusterVmHostOptions options, std::string listen)
    : options_(std::move(options)), listen_(std::move(listen)) {}

ClusterVmHost::~ClusterVmHost() { (void)Stop(); }

absl::StatusOr<std::unique_ptr<ClusterVmHost>> ClusterVmHost::Create(ClusterVmHostOptions options) {
  auto listen = ResolveListenAddress(options.data_listen);
  if (!listen.ok()) return listen.status();
  return std::unique_ptr<ClusterVmHost>(new ClusterVmHost(std::move(options), *std::move(listen)));
}

std::string ClusterVmHost::data_address() const {
  auto hp = SplitHostPort(listen_);
  if (!hp.ok()) return listen_;
  if (hp->host.empty() || hp->host == "0.0.0.0" || hp->host == "[::]" || hp->host == "::") {
    return fmt::format("{}:{}", options_.advertise_host, hp->port);
  }
  return listen_;
}

void ClusterVmHost::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

absl::Status ClusterVmHost::Prepare(const LocalVmPlan& plan, GuestOutput& output) {
  std::lock_guard lock(mu_);
  if (rt_) {
    return absl::FailedPreconditionError(
        fmt::format("this node already holds VM '{}'; stop it before preparing '{}'", rt_->vm_name, plan.spec.name()));
  }
  const v1::VmSpec& spec = plan.spec;
  const std::string& name = spec.name();
  auto bad = [&](std::string what) {
    return absl::InvalidArgumentError(fmt::format("VM '{}' on node '{}': {}", name, plan.node, what));
  };
  if (plan.local_vcpus.empty()) return bad("no vCPU of the VM is placed on this node");
  if (plan.node_id.value() == 0) return bad("node id 0 is the master's; this node has no valid registration");

  // The topology: vCPU i must have APIC ID i (the probe guest's convention, and KVM vCPU id = APIC ID).
  std::vector<ApicId> apic_ids(spec.vcpus());
  std::vector<uint32_t> vcpu_node(spec.vcpus(), 0);
  for (const auto& p : plan.topology.vcpus()) {
    if (p.vcpu() >= spec.vcpus()) return bad(fmt::format("topology names vCPU {} beyond vcpus = {}", p.vcpu(), spec.vcpus()));
    if (p.apic_id() != p.vcpu()) {
      return bad(fmt::format("topology gives vCPU {} APIC ID {}; this runner needs APIC ID = vCPU index", p.vcpu(),
                             p.apic_id()));
    }
    apic_ids[p.vcpu()] = ApicId(p.apic_id());
    vcpu_node[p.vcpu()] = p.node_id();
  }
  for (VcpuIndex v : plan.local_vcpus) {
    if (v.value() >= spec.vcpus() || vcpu_node[v.value()] != plan.node_id.value()) {
      return bad(fmt::format("local vCPU {} is not placed on this node (id {}) in the topology", v, plan.node_id));
    }
  }

  // The data-plane peers: the master (node id 0) and every other node that runs vCPUs of this VM.
  std::vector<transport::PeerEndpoint> peers;
  std::map<uint32_t, std::string> endpoint_of;
  for (const auto& p : plan.peers) endpoint_of[p.node_id()] = p.data_plane().tcp_address();
  std::vector<uint32_t> wanted{0};
  for (uint32_t n : vcpu_node) {
    if (n != plan.node_id.value() && std::find(wanted.begin(), wanted.end(), n) == wanted.end()) wanted.push_back(n);
  }
  std::sort(wanted.begin(), wanted.end());
  for (uint32_t n : wanted) {
    auto it = endpoint_of.find(n);
    if (it == endpoint_of.end() || it->second.empty()) {
      return absl::FailedPreconditionError(fmt::format(
          "VM '{}': PrepareVm lists no data-plane address for {} (node id {}); the master must send every node's "
          "endpoint, its own included",
          name, n == 0 ? "the master" : "a node of the VM", n));
    }
    peers.push_back({NodeId(n), it->second});
  }

  // The guest.
  ProbeVmConfig c;
  c.guest_elf = spec.image().path().empty() ? options_.default_guest_elf : spec.image().path();
  if (c.guest_elf.empty()) return bad("the spec names no guest image (image.path) and this agent has no default");
  c.num_vcpus = spec.vcpus();
  auto workload = ParseWorkload(spec.workload().name().empty() ? "hello" : spec.workload().name());
  if (!workload.ok()) return bad(std::string(workload.status().message()));
  c.workload = *workload;
  c.iterations = spec.workload().iterations() != 0 ? spec.workload().iterations() : kDefaultIterations;
  c.x2apic = !spec.workload().xapic();
  c.irqchip = spec.irqchip() == v1::IRQCHIP_MODE_USER ? vcpu::IrqchipMode::kUser : vcpu::IrqchipMode::kKernel;
  c.ping_vcpu = VcpuIndex(spec.workload().ping_vcpu());
  c.pong_vcpu = VcpuIndex(spec.workload().pong_vcpu());
  if (spec.workload().ipi_vector() != 0) c.ipi_vector = Vector(static_cast<uint8_t>(spec.workload().ipi_vector()));
  const v1::Workload& w = spec.workload();
  if (!w.dest_kind().empty()) {
    auto dk = ParseDestKind(w.dest_kind());
    if (!dk.ok()) return bad(fmt::format("workload.dest_kind: {}", std::string(dk.status().message())));
    c.dest_kind = *dk;
  }
  c.dest = w.dest();
  if (w.expected_answers() != 0) c.expected_answers = w.expected_answers();
  c.nowhere_apic_id = w.has_nowhere_apic_id() ? w.nowhere_apic_id() : spec.vcpus();
  for (uint32_t t : w.tpr()) {
    if (t > 0xFF) return bad(fmt::format("workload.tpr: {} is not a TPR value (0..255)", t));
    c.tpr.push_back(static_cast<uint8_t>(t));
  }
  if (w.timeout_ms() != 0) c.timeout_ms = w.timeout_ms();
  c.memory_bytes = (spec.memory_mib() != 0 ? spec.memory_mib() : 64) << 20;
  c.local_vcpus = plan.local_vcpus;
  c.uart_console = true;
  c.forwarded_ports = {kUartPorts, kDoorbellPorts};
  c.forwarded_mmio = {kIoapicMmio};

  auto rt = std::make_unique<Runtime>();
  Runtime* r = rt.get();
  r->vm_name = name;
  r->node = plan.node;
  r->output = &output;
  r->peers = peers;
  // The callbacks run on vCPU threads, which start only in Start(): by then lc and io exist.
  c.on_record = [r](VcpuIndex v, const Record& rec) {
    r->output->Record(r->vm_name, v, rec.type, rec.a, rec.b, rec.c, 0);
  };
  c.on_console_line = [r](VcpuIndex v, std::string_view line) { r->output->ConsoleLine(r->vm_name, v, line); };
  c.on_ioapic_eoi = [r](VcpuIndex v, Vector vector) { r->lc->OnGuestEoi(v, vector); };
  c.forward_io = [r](VcpuIndex v, const ForwardedAccess& a) -> absl::StatusOr<uint64_t> {
    IoAccess acc;
    acc.space = a.mmio ? transport::IoRequestPayload::Space::kMmio : transport::IoRequestPayload::Space::kPio;
    acc.is_write = a.is_write;
    acc.size = a.size;
    acc.address = a.address;
    acc.data = a.data;
    auto res = r->io->Forward(v, acc);
    if (!res.ok()) return res.status();
    if (res->no_device) r->io_no_device.fetch_add(1, std::memory_order_relaxed);
    return res->data;
  };
  c.on_error = [this, r](const absl::Status& s) {
    Log(fmt::format("VM '{}' failed on node '{}': {}", r->vm_name, r->node, s.ToString()));
    r->output->ConsoleLine(r->vm_name, VcpuIndex(0), fmt::format("[aggvm] VM failed on node '{}': {}", r->node,
                                                                std::string(s.message())));
  };

  auto vm = ProbeVm::Create(std::move(c));
  if (!vm.ok()) {
    return absl::Status(vm.status().code(), fmt::format("VM '{}' on node '{}': {}", name, plan.node,
                                                        std::string(vm.status().message())));
  }
  r->vm = *std::move(vm);

  // The transport, listening before PrepareVm returns (the master dials after it).
  const transport::WaitMode wait_mode =
      spec.wait_mode() == v1::WAIT_MODE_EVENT ? transport::WaitMode::kEvent : transport::WaitMode::kBusyPoll;
  if (spec.transport() == v1::TRANSPORT_KIND_RDMA) {
    auto boot = transport::rdma::TcpBootstrap::Listen(plan.node_id, listen_);
    if (!boot.ok()) return boot.status();
    transport::rdma::RdmaOptions ro;
    ro.self = plan.node_id;
    ro.device = options_.rdma;
    ro.wait_mode = wait_mode;
    auto t = transport::rdma::RdmaTransport::Create(ro, *std::move(boot));
    if (!t.ok()) {
      return absl::Status(t.status().code(), fmt::format("VM '{}' asks for transport rdma on node '{}': {}", name,
                                                         plan.node, std::string(t.status().message())));
    }
    r->transport = *std::move(t);
  } else {
    transport::TcpTransportOptions to;
    to.listen_address = listen_;
    to.wait_mode = wait_mode;
    auto t = transport::TcpTransport::Create(plan.node_id, to);
    if (!t.ok()) {
      return absl::Status(t.status().code(), fmt::format("VM '{}': data-plane transport on node '{}': {}", name,
                                                         plan.node, std::string(t.status().message())));
    }
    r->transport = *std::move(t);
  }

  r->port = std::make_unique<ClusterVmPort>(*r->vm, apic_ids, !spec.workload().xapic());
  LocalControllerConfig lcc;
  lcc.master = NodeId(0);
  lcc.num_vcpus = spec.vcpus();
  lcc.owned = plan.local_vcpus;
  lcc.wait_mode = wait_mode;
  lcc.apic_ids = apic_ids;
  for (uint32_t n : vcpu_node) lcc.vcpu_node.push_back(NodeId(n));
  lcc.direct_ipis = spec.route_mode() == v1::ROUTE_MODE_DIRECT;
  lcc.trace_ipis = options_.trace_ipis;
  // Traced frames injected here: their trace block goes to the VM's watchers as a kTraceRecordType record, reported
  // by the TraceReporter's thread a period later (node-agent/trace_reporter.h), not by the injecting thread.
  auto traces = TraceReporter::Start([r, v = plan.local_vcpus.empty() ? VcpuIndex(0) : plan.local_vcpus.front()](
                                         const transport::TraceBlock& t) {
    const lab::TraceRecordWords words = lab::EncodeTraceRecord(t);
    r->output->Record(r->vm_name, v, kTraceRecordType, words.a, words.b, words.c, words.d);
  });
  if (!traces.ok()) return traces.status();
  r->traces = *std::move(traces);
  lcc.on_trace = [t = r->traces.get()](const transport::TraceBlock& block) { t->Push(block); };
  auto lc = LocalController::Create(std::move(lcc), r->transport.get(), r->port.get());
  if (!lc.ok()) return lc.status();
  r->lc = *std::move(lc);
  r->lc_raw = r->lc.get();
  r->io = std::make_unique<IoForwarder>(r->lc.get(), spec.vcpus(), options_.io);

  // Guest IPIs to the vCPUs that run elsewhere (docs/proxy.md).
  std::vector<ApicId> remote;
  for (uint32_t v = 0; v < spec.vcpus(); ++v) {
    if (vcpu_node[v] != plan.node_id.value()) remote.push_back(apic_ids[v]);
  }
  if (r->vm->irqchip_mode() == vcpu::IrqchipMode::kKernel && !remote.empty()) {
    if (remote.size() > kMaxProxies) {
      return bad(fmt::format("{} vCPUs run on other nodes; kernel irqchip mode supports at most {} proxy vCPUs per "
                             "node (use irqchip user, or place more vCPUs on this node)",
                             remote.size(), kMaxProxies));
    }
    r->proxy_ids = remote;
    const uint32_t nowhere = std::min<uint32_t>(options_.nowhere_proxies, kMaxProxies - remote.size());
    for (uint32_t i = 0; i < nowhere; ++i) r->proxy_ids.push_back(ApicId(spec.vcpus() + i));
    r->proxy_sink = std::make_unique<ProxyForwarder>(&r->lc_raw, spec.vcpus());
    vcpu::ProxyConfig pc;
    pc.remote = r->proxy_ids;
    auto ps = vcpu::ProxySet::Create(r->vm->kvm(), r->vm->vm(), std::move(pc), *r->proxy_sink);
    if (!ps.ok()) {
      return absl::Status(ps.status().code(), fmt::format("VM '{}' on node '{}': proxy vCPUs for APIC IDs {}: {}", name,
                                                          plan.node, fmt::join(r->proxy_ids, ","),
                                                          std::string(ps.status().message())));
    }
    r->proxies = *std::move(ps);
  }
  if (vcpu::UserIrqchip* chip = r->vm->user_irqchip(); chip != nullptr && !remote.empty()) {
    r->icr_sink = std::make_unique<IcrForwarder>(&r->lc_raw, plan.local_vcpus, chip);
    std::vector<irqchip::ApicAddressing> addressing;
    for (ApicId id : remote) {
      irqchip::ApicAddressing a;
      a.id = id;
      a.x2apic = !spec.workload().xapic();
      if (a.x2apic) a.ldr = irqchip::X2apicLdrFromId(id);
      addressing.push_back(a);
    }
    chip->SetRemote(addressing, r->icr_sink.get());
  }

  const absl::Duration connect_timeout = options_.connect_timeout;
  // The thread places itself before anything else; a refused placement fails PrepareVm.
  auto dataplane = StartPlacedThread("dataplane", options_.dataplane_cpus, [this, r, connect_timeout](
                                                                                std::stop_token stop) {
    absl::Status st = r->transport->Connect(r->peers, connect_timeout);
    {
      std::lock_guard l(r->mu);
      r->connect_done = true;
      r->connect_status = st;
    }
    r->cv.notify_all();
    if (!st.ok()) {
      Log(fmt::format("VM '{}': the data plane of node '{}' did not connect: {}", r->vm_name, r->node, st.ToString()));
      return;
    }
    st = r->lc->Run(stop);
    if (!st.ok() && !stop.stop_requested()) {
      Log(fmt::format("VM '{}': the data plane of node '{}' stopped: {}; stopping this node's vCPUs", r->vm_name,
                      r->node, st.ToString()));
      {
        std::lock_guard l(r->mu);
        r->dataplane_status = st;
      }
      r->vm->Stop();
    }
  });
  if (!dataplane.ok()) return bad(fmt::format("the data-plane thread: {}", std::string(dataplane.status().message())));
  r->dataplane = *std::move(dataplane);
  Log(fmt::format("prepared VM '{}': vCPUs {} of {} here, {} irqchip, {} transport on {}, connecting to {} peer(s)",
                  name, fmt::join(plan.local_vcpus, ","), spec.vcpus(), vcpu::IrqchipModeName(r->vm->irqchip_mode()),
                  r->transport->name(), listen_, peers.size()));
  rt_ = std::move(rt);
  return absl::OkStatus();
}

namespace {

absl::Status WaitForMesh(std::mutex& mu, std::condition_variable& cv, const bool& done, const absl::Status& status,
                         absl::Duration timeout, const std::string& vm, const std::string& listen) {
  std::unique_lock l(mu);
  if (!cv.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return done; })) {
    return absl::DeadlineExceededError(fmt::format(
        "VM '{}': the data plane is not connected after {} (is the master connecting to {}?)", vm,
        absl::FormatDuration(timeout), listen));
  }
  return status;
}

}  // namespace

absl::Status ClusterVmHost::WaitConnected(absl::Duration timeout) {
  std::lock_guard lock(mu_);
  if (!rt_) return absl::FailedPreconditionError("no VM is prepared on this node");
  Runtime& r = *rt_;
  return WaitForMesh(r.mu, r.cv, r.connect_done, r.connect_status, timeout, r.vm_name, listen_);
}

absl::Status ClusterVmHost::Start() {
  // The control plane makes one VmHost call at a time; holding mu_ while waiting for the mesh only delays Stats().
  std::lock_guard lock(mu_);
  if (!rt_) return absl::FailedPreconditionError("no VM is prepared on this node");
  Runtime& r = *rt_;
  if (r.started) {
    if (r.paused) {
      r.vm->Resume();
      r.paused = false;
    }
    return absl::OkStatus();
  }
  const absl::Status connected = WaitForMesh(r.mu, r.cv, r.connect_done, r.connect_status,
                                             options_.connect_timeout + absl::Seconds(1), r.vm_name, listen_);
  if (!connected.ok()) {
    return absl::Status(connected.code(), fmt::format("VM '{}' cannot start on node '{}': {}", r.vm_name, r.node,
                                                      std::string(connected.message())));
  }
  auto cannot_start = [&](const absl::Status& s, std::string_view what) {
    return absl::Status(s.code(), fmt::format("VM '{}' cannot start on node '{}': {}{}", r.vm_name, r.node, what,
                                              std::string(s.message())));
  };
  if (r.proxies) {
    if (auto s = r.proxies->Start(); !s.ok()) return cannot_start(s, "proxy vCPUs: ");
    if (!options_.vcpu_cpus.empty()) {
      if (auto s = r.proxies->Pin(options_.vcpu_cpus); !s.ok()) {
        r.proxies->Stop();
        return cannot_start(s, "");
      }
    }
  }
  if (auto s = r.vm->Start(); !s.ok()) return s;
  if (auto s = r.vm->PinVcpus(options_.vcpu_cpus); !s.ok()) {
    r.vm->Stop();
    if (r.proxies) r.proxies->Stop();
    return cannot_start(s, "");
  }
  r.started = true;
  vcpu::UserIrqchip* chip = r.vm->user_irqchip();
  if (chip != nullptr && r.icr_sink != nullptr && options_.priority_report_interval > absl::ZeroDuration()) {
    // Polls each local vCPU's PPR (one APIC lock each) and reports changes: the master's Router arbitrates
    // lowest-priority IPIs with these values. Not per interrupt: at most one frame per vCPU per interval.
    // vCPUs that send IPIs report before each one (IcrForwarder); this covers those that only receive.
    r.priority_reporter = std::jthread([&r, chip, interval = absl::ToChronoNanoseconds(
                                                       options_.priority_report_interval)](std::stop_token stop) {
      const size_t local = r.vm->local_vcpus().size();
      // A PPR raised by an interrupt in service lasts only as long as its handler: a sample that lands there would
      // steer the next arbitrations away for a whole interval. Report a value only once two consecutive samples
      // agree (a TPR change is thus seen after one to two intervals).
      std::vector<uint8_t> previous(local, 0);
      std::mutex m;
      std::condition_variable_any cv;
      while (!stop.stop_requested()) {
        for (size_t i = 0; i < local; ++i) {
          const uint8_t ppr = chip->Priority(VcpuIndex(static_cast<uint32_t>(i)));
          if (ppr == previous[i]) r.icr_sink->ReportIfStable(i, ppr);
          previous[i] = ppr;
        }
        std::unique_lock l(m);
        cv.wait_for(l, stop, interval, [] { return false; });
      }
    });
  }
  Log(fmt::format("started VM '{}' on node '{}'", r.vm_name, r.node));
  return absl::OkStatus();
}

absl::Status ClusterVmHost::Pause() {
  std::lock_guard lock(mu_);
  if (!rt_) return absl::FailedPreconditionError("no VM is prepared on this node");
  if (!rt_->started || rt_->paused) return absl::OkStatus();
  if (auto s = rt_->vm->Pause(); !s.ok()) return s;
  rt_->paused = true;
  return absl::OkStatus();
}

absl::Status ClusterVmHost::Stop() {
  std::unique_ptr<Runtime> rt;
  {
    std::lock_guard lock(mu_);
    rt = std::move(rt_);
  }
  if (!rt) return absl::OkStatus();
  const std::string name = rt->vm_name;
  rt.reset();  // vCPUs, data-plane thread, transport (see ~Runtime)
  Log(fmt::format("stopped VM '{}'", name));
  return absl::OkStatus();
}

ProbeVm* ClusterVmHost::vm() {
  std::lock_guard lock(mu_);
  return rt_ ? rt_->vm.get() : nullptr;
}

LocalController* ClusterVmHost::controller() {
  std::lock_guard lock(mu_);
  return rt_ ? rt_->lc.get() : nullptr;
}

std::map<std::string, uint64_t> ClusterVmHost::Stats() {
  std::lock_guard lock(mu_);
  std::map<std::string, uint64_t> m;
  if (!rt_) return m;
  Runtime& r = *rt_;
  const LocalControllerCounters c = r.lc->counters();
  const std::pair<const char*, uint64_t> lc_counters[] = {
      {"frames_received", c.frames_received}, {"raised", c.raised},
      {"msis_sent", c.msis_sent},             {"level_unchanged", c.level_unchanged},
      {"delivered", c.delivered},             {"level_delivered", c.level_delivered},
      {"eois_sent", c.eois_sent},             {"eois_unmatched", c.eois_unmatched},
      {"control_raises", c.control_raises},   {"io_responses", c.io_responses},
      {"pings", c.pings},                     {"inject_failed", c.inject_failed},
      {"send_failed", c.send_failed},         {"master_lost", c.master_lost},
      {"dropped_not_owned", c.dropped_not_owned}, {"dropped_unknown_vcpu", c.dropped_unknown_vcpu},
      {"dropped_bad_control", c.dropped_bad_control}, {"dropped_unexpected", c.dropped_unexpected},
      {"dropped_no_forwarder", c.dropped_no_forwarder},
      {"ipis_via_master", c.ipis_via_master}, {"ipis_direct", c.ipis_direct},
      {"ipis_to_nowhere", c.ipis_to_nowhere}, {"ipis_send_failed", c.ipis_send_failed},
      {"direct_received", c.direct_received}, {"dropped_unknown_peer", c.dropped_unknown_peer},
      {"delivered_nmi", c.delivered_nmi},     {"delivered_init", c.delivered_init},
      {"delivered_sipi", c.delivered_sipi},   {"priorities_sent", c.priorities_sent},
      {"trains", c.trains},                   {"train_raises", c.train_raises}};
  for (auto [k, v] : lc_counters) m[fmt::format("local_controller.{}", k)] = v;
  m["local_controller.train_late"] = r.lc->train_late();
  m["local_controller.train_skipped"] = r.lc->train_skipped();
  m["trace_reporter.pushed"] = r.traces->pushed();
  m["trace_reporter.dropped"] = r.traces->dropped();
  m["trace_reporter.flushed"] = r.traces->flushed();
  const IoForwarderCounters f = r.io->counters();
  const std::pair<const char*, uint64_t> io_counters[] = {
      {"requests", f.requests}, {"responses", f.responses}, {"no_device", f.no_device},
      {"timeouts", f.timeouts}, {"failed", f.failed},       {"stale_responses", f.stale_responses},
      {"unexpected", f.unexpected}};
  for (auto [k, v] : io_counters) m[fmt::format("io_forwarder.{}", k)] = v;
  const transport::TransportStats t = r.transport->stats();
  m["transport.frames_sent"] = t.frames_sent;
  m["transport.frames_received"] = t.frames_received;
  m["transport.bad_frames"] = t.bad_frames;
  m["transport.sequence_errors"] = t.sequence_errors;
  m["transport.send_errors"] = t.send_errors;
  m["transport.peers_lost"] = t.peers_lost;
  m["vm.local_vcpus"] = r.vm->local_vcpus().size();
  m["vm.exits"] = r.vm->exits();
  m["vm.forwarded_accesses"] = r.vm->forwarded_accesses();
  m["vm.forwarded_no_device"] = r.io_no_device.load(std::memory_order_relaxed);
  m["vm.failed"] = r.vm->error().ok() ? 0 : 1;
  m["vm.level_routes"] = r.port->level_routes();
  m["vm.level_routes_exhausted"] = r.port->exhausted();
  m["vm.level_route_failures"] = r.port->route_failures();
  if (r.proxies) {
    vcpu::ProxyStats sum;
    for (ApicId id : r.proxy_ids) {
      const vcpu::ProxyStats p = r.proxies->stats(id);
      sum.ipis += p.ipis;
      sum.nmis += p.nmis;
      sum.inits += p.inits;
      sum.sipis += p.sipis;
      sum.restores += p.restores;
    }
    m["proxies.count"] = r.proxy_ids.size();
    m["proxies.ipis"] = sum.ipis;
    m["proxies.nmis"] = sum.nmis;
    m["proxies.inits"] = sum.inits;
    m["proxies.sipis"] = sum.sipis;
    m["proxies.restores"] = sum.restores;
  }
  {
    std::lock_guard l(r.mu);
    m["dataplane.connected"] = r.connect_done && r.connect_status.ok() ? 1 : 0;
    m["dataplane.stopped_early"] = r.dataplane_status.ok() ? 0 : 1;
  }
  if (vcpu::UserIrqchip* chip = r.vm->user_irqchip()) {
    const vcpu::UserIrqchipCounters u = chip->counters();
    m["user_irqchip.msis"] = u.msis;
    m["user_irqchip.undelivered"] = u.undelivered;
    m["user_irqchip.injected"] = u.injected;
    m["user_irqchip.ipis"] = u.ipis;
    m["user_irqchip.eoi_broadcasts"] = u.eoi_broadcasts;
    m["user_irqchip.halts"] = u.halts;
    m["user_irqchip.nmis"] = u.nmis;
    m["user_irqchip.unsupported_events"] = u.unsupported_events;
  }
  return m;
}

absl::StatusOr<v1::NodeCapabilities> ProbeNodeCapabilities(const transport::rdma::DeviceSelection& rdma) {
  v1::NodeCapabilities caps;
  auto kvm = vcpu::Kvm::Open();
  if (!kvm.ok()) {
    return absl::FailedPreconditionError(fmt::format(
        "this node cannot run vCPUs: {}; run the agent on a host with KVM (load kvm_intel / kvm_amd / kvm_pvm) as a "
        "user that may open /dev/kvm",
        std::string(kvm.status().message())));
  }
  caps.set_kvm(true);
  caps.set_split_irqchip(kvm->RequireExtension(KVM_CAP_SPLIT_IRQCHIP, "KVM_CAP_SPLIT_IRQCHIP").ok());
  caps.set_userspace_msr(kvm->RequireExtension(KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR").ok());
  caps.set_rdma(transport::rdma::OpenDevice(rdma).ok());
  caps.set_cpus(std::max(1u, std::thread::hardware_concurrency()));
  return caps;
}

}  // namespace aggvm::agent
