#include "tests/support/cluster_launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <deque>
#include <fstream>

#include <fmt/format.h>

namespace aggvm::testing {

std::string ClusterLauncher::NodeName(int i) {
  if (i == 0) return "master";
  return fmt::format("node-{}", static_cast<char>('a' + i - 1));
}

std::string ClusterLauncher::host(int i) const { return topo_ ? topo_->address(i) : "127.0.0.1"; }
std::string ClusterLauncher::grpc_address(int i) const {
  return fmt::format("{}:{}", host(i), options_.base_port + 10 * i);
}
std::string ClusterLauncher::data_address(int i) const {
  return fmt::format("{}:{}", host(i), options_.base_port + 10 * i + 1);
}

absl::StatusOr<std::unique_ptr<ClusterLauncher>> ClusterLauncher::Start(ClusterOptions options) {
  if (options.agents < 1 || options.agents > 26) {
    return absl::InvalidArgumentError(fmt::format("agents: {} is outside 1..26", options.agents));
  }
  if (options.master_bin.empty() || options.agent_bin.empty()) {
    return absl::InvalidArgumentError("master_bin and agent_bin are required");
  }
  std::unique_ptr<ClusterLauncher> c(new ClusterLauncher(std::move(options)));
  const ClusterOptions& o = c->options_;
  if (!o.loopback) {
    if (::geteuid() != 0) {
      std::fprintf(stderr, "note: not root: every process on 127.0.0.1 (loopback), not in network namespaces\n");
    } else {
      auto t = NetnsTopology::Create(o.agents + 1, o.tag);
      if (t.ok()) {
        c->topo_.emplace(*std::move(t));
      } else {
        std::fprintf(stderr, "note: network namespaces failed (%s): falling back to loopback\n",
                     std::string(t.status().message()).c_str());
      }
    }
  }
  // Every gRPC socket of this process is made by this thread or by gRPC threads it starts: all in namespace 0.
  if (c->topo_) {
    if (auto s = c->topo_->EnterNamespace(0); !s.ok()) return s;
  }
  std::vector<std::string> master = {o.master_bin,      "--listen",    c->grpc_address(0),
                                     "--data-listen",   c->data_address(0), "--heartbeat-ms",
                                     std::to_string(o.heartbeat_ms), "--lost-after", std::to_string(o.lost_after),
                                     "--agent-timeout", "20"};
  master.insert(master.end(), o.master_args.begin(), o.master_args.end());
  if (auto s = c->SpawnOne(0, master); !s.ok()) return s;
  c->stub_ = v1::Master::NewStub(grpc::CreateChannel(c->grpc_address(0), grpc::InsecureChannelCredentials()));
  for (int i = 1; i <= o.agents; ++i) {
    if (auto s = c->SpawnAgent(i); !s.ok()) return s;
  }
  if (!c->WaitUp(o.agents, o.register_timeout)) {
    c->TailLogs();
    return absl::UnavailableError(fmt::format("only {} of {} agents registered within {}", c->UpNodes(), o.agents,
                                              absl::FormatDuration(o.register_timeout)));
  }
  return c;
}

ClusterLauncher::~ClusterLauncher() {
  StopAll();
  stub_.reset();
  if (topo_) topo_->Destroy();
}

absl::Status ClusterLauncher::SpawnOne(int i, const std::vector<std::string>& argv) {
  const std::string log = options_.log_dir.empty() ? "" : fmt::format("{}/{}.log", options_.log_dir, NodeName(i));
  // The child inherits stdout/stderr: redirect them around the fork when logging to a file.
  int saved_out = -1, saved_err = -1;
  if (!log.empty()) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return absl::InternalError(fmt::format("cannot open log {}", log));
    saved_out = ::dup(1);
    saved_err = ::dup(2);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::close(fd);
  }
  absl::StatusOr<pid_t> pid;
  if (topo_) {
    pid = topo_->SpawnInNamespace(i, argv);
  } else {
    std::vector<std::string> args = argv;
    std::vector<char*> cargv;
    for (auto& a : args) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    const pid_t p = ::fork();
    if (p == 0) {
      ::execv(cargv[0], cargv.data());
      ::_exit(127);
    }
    pid = p < 0 ? absl::StatusOr<pid_t>(absl::InternalError("fork failed")) : absl::StatusOr<pid_t>(p);
  }
  if (!log.empty()) {
    ::dup2(saved_out, 1);
    ::dup2(saved_err, 2);
    ::close(saved_out);
    ::close(saved_err);
  }
  if (!pid.ok()) return pid.status();
  pids_[i] = *pid;
  return absl::OkStatus();
}

absl::Status ClusterLauncher::SpawnAgent(int i) {
  if (i < 1 || i > options_.agents) return absl::InvalidArgumentError(fmt::format("no node {}", i));
  std::vector<std::string> argv = {options_.agent_bin,  "--master",          grpc_address(0), "--node", NodeName(i),
                                   "--listen",          grpc_address(i),   "--data-listen", data_address(i),
                                   "--advertise-host",  host(i),           "--register-timeout", "20"};
  argv.insert(argv.end(), options_.agent_args.begin(), options_.agent_args.end());
  return SpawnOne(i, argv);
}

void ClusterLauncher::Reap(pid_t pid) {
  for (int i = 0; i < 100; ++i) {
    if (::waitpid(pid, nullptr, WNOHANG) == pid) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

void ClusterLauncher::KillAgent(int i, int sig) {
  auto it = pids_.find(i);
  if (it == pids_.end()) return;
  ::kill(it->second, sig);
  Reap(it->second);
  pids_.erase(it);
}

void ClusterLauncher::StopAll() {
  // Agents first (they stop their VMs), then the master; all signalled at once, each reaped within 5 s.
  for (auto& [i, pid] : pids_) ::kill(pid, SIGTERM);
  for (auto& [i, pid] : pids_) Reap(pid);
  pids_.clear();
}

std::unique_ptr<v1::NodeAgent::Stub> ClusterLauncher::AgentStub(int i) const {
  return v1::NodeAgent::NewStub(grpc::CreateChannel(grpc_address(i), grpc::InsecureChannelCredentials()));
}

int ClusterLauncher::UpNodes() {
  v1::ListNodesRequest req;
  v1::ListNodesResponse resp;
  if (!Call([&](grpc::ClientContext& ctx) { return stub_->ListNodes(&ctx, req, &resp); }, 2).ok()) return -1;
  int up = 0;
  for (const auto& n : resp.nodes()) up += n.health() == v1::NODE_HEALTH_UP;
  return up;
}

bool ClusterLauncher::WaitUp(int n, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (UpNodes() == n) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

absl::Status ClusterLauncher::RunIn(int i, const std::function<absl::Status()>& fn) const {
  if (topo_) return topo_->RunInNamespace(i, fn);
  absl::Status s;
  std::thread([&] { s = fn(); }).join();
  return s;
}

void ClusterLauncher::TailLogs(int lines) const {
  if (options_.log_dir.empty()) return;
  for (int i = 0; i <= options_.agents; ++i) {
    std::ifstream in(fmt::format("{}/{}.log", options_.log_dir, NodeName(i)));
    std::deque<std::string> last;
    for (std::string line; std::getline(in, line);) {
      last.push_back(line);
      if (last.size() > static_cast<size_t>(lines)) last.pop_front();
    }
    std::fprintf(stderr, "--- %s.log\n", NodeName(i).c_str());
    for (const auto& l : last) std::fprintf(stderr, "%s\n", l.c_str());
  }
}

// ---- VmWatch ----

VmWatch::VmWatch(v1::Master::Stub& stub, const std::string& vm) {
  v1::WatchEventsRequest req;
  req.set_vm(vm);
  req.set_console(true);
  reader_ = stub.WatchEvents(&ctx_, req);
  reader_->WaitForInitialMetadata();
  thread_ = std::thread([this] {
    v1::Event e;
    while (reader_->Read(&e)) {
      std::lock_guard l(mu_);
      if (e.has_record()) by_type_[e.record().type()].push_back(e.record());
      events_.push_back(e);
      cv_.notify_all();
    }
  });
}

VmWatch::~VmWatch() {
  ctx_.TryCancel();
  thread_.join();
  (void)reader_->Finish();
}

std::vector<v1::Event> VmWatch::events() {
  std::lock_guard l(mu_);
  return events_;
}

std::vector<v1::GuestRecord> VmWatch::records(uint32_t type, int64_t vector) {
  std::lock_guard l(mu_);
  std::vector<v1::GuestRecord> out;
  auto it = by_type_.find(type);
  if (it == by_type_.end()) return out;
  for (const auto& r : it->second) {
    if (vector < 0 || r.a() == static_cast<uint64_t>(vector)) out.push_back(r);
  }
  return out;
}

size_t VmWatch::count(uint32_t type) {
  std::lock_guard l(mu_);
  auto it = by_type_.find(type);
  return it == by_type_.end() ? 0 : it->second.size();
}

std::optional<v1::GuestRecord> VmWatch::RecordAt(uint32_t type, size_t index, absl::Duration timeout) {
  std::unique_lock l(mu_);
  auto ready = [&] { return by_type_[type].size() > index; };
  if (!cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), ready)) return std::nullopt;
  return by_type_[type][index];
}

std::string VmWatch::console(uint32_t vcpu) {
  std::lock_guard l(mu_);
  std::string out;
  for (const auto& e : events_) {
    if (e.has_console() && e.console().vcpu() == vcpu) {
      if (!out.empty()) out += '\n';
      out += e.console().text();
    }
  }
  return out;
}

bool VmWatch::WaitFor(const std::function<bool()>& pred, absl::Duration timeout) {
  std::unique_lock l(mu_);
  return cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] {
    l.unlock();
    const bool ok = pred();
    l.lock();
    return ok;
  });
}

// ---- calls ----

grpc::Status Call(const std::function<grpc::Status(grpc::ClientContext&)>& f, int seconds) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return f(ctx);
}

grpc::Status CreateVm(v1::Master::Stub& stub, const v1::VmSpec& spec) {
  v1::CreateVmRequest req;
  *req.mutable_spec() = spec;
  v1::VmStatus out;
  return Call([&](grpc::ClientContext& ctx) { return stub.CreateVm(&ctx, req, &out); });
}

grpc::Status Lifecycle(v1::Master::Stub& stub, const std::string& verb, const std::string& vm) {
  v1::VmRef ref;
  ref.set_name(vm);
  v1::VmStatus out;
  return Call([&](grpc::ClientContext& ctx) {
    if (verb == "start") return stub.StartVm(&ctx, ref, &out);
    if (verb == "pause") return stub.PauseVm(&ctx, ref, &out);
    return stub.StopVm(&ctx, ref, &out);
  });
}

grpc::Status Ring(v1::Master::Stub& stub, const std::string& vm, const std::string& node, uint32_t gsi, bool level,
                  bool asserted) {
  v1::RingDoorbellRequest req;
  req.set_vm(vm);
  req.set_node(node);
  req.set_gsi(gsi);
  req.set_level(level);
  req.set_asserted(asserted);
  v1::RingDoorbellResponse resp;
  return Call([&](grpc::ClientContext& ctx) { return stub.RingDoorbell(&ctx, req, &resp); });
}

absl::StatusOr<v1::RoutingTable> Table(v1::Master::Stub& stub, const std::string& vm) {
  v1::VmRef ref;
  ref.set_name(vm);
  v1::RoutingTable t;
  auto st = Call([&](grpc::ClientContext& ctx) { return stub.GetRoutingTable(&ctx, ref, &t); });
  if (!st.ok()) return absl::UnknownError(fmt::format("GetRoutingTable({}): {}", vm, st.error_message()));
  return t;
}

v1::VmSpec ClusterSpec(const std::string& name, const std::string& workload, v1::IrqchipMode irqchip, int nodes,
                       int vcpus_per_node) {
  v1::VmSpec spec;
  spec.set_name(name);
  spec.set_vcpus(static_cast<uint32_t>(nodes * vcpus_per_node));
  for (int i = 0; i < nodes; ++i) {
    auto* p = spec.add_placement();
    p->set_node(ClusterLauncher::NodeName(i + 1));
    for (int k = 0; k < vcpus_per_node; ++k) p->add_vcpus(static_cast<uint32_t>(vcpus_per_node * i + k));
  }
  spec.set_irqchip(irqchip);
  spec.set_wait_mode(v1::WAIT_MODE_EVENT);
  spec.mutable_workload()->set_name(workload);
  return spec;
}

}  // namespace aggvm::testing
