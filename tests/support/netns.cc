#include "tests/support/netns.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <thread>

namespace aggvm::testing {
namespace {

constexpr int kSubnet = 77;  // every topology lives in its own namespaces, so all may use 10.77.0.0/24

const char* IpPath() {
  for (const char* p : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}) {
    if (::access(p, X_OK) == 0) return p;
  }
  return nullptr;
}

std::string NetnsPath(const std::string& name) { return "/run/netns/" + name; }

// Removes namespaces "aggvm-<tag>-<pid>-..." whose pid no longer runs (a crashed earlier test) or is ours.
void SweepStale(const std::string& tag) {
  DIR* d = ::opendir("/run/netns");
  if (d == nullptr) return;
  const std::string prefix = "aggvm-" + tag + "-";
  std::vector<std::string> stale;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.rfind(prefix, 0) != 0) continue;
    const pid_t pid = static_cast<pid_t>(std::atol(n.c_str() + prefix.size()));
    if (pid <= 0) continue;
    if (pid == ::getpid() || (::kill(pid, 0) < 0 && errno == ESRCH)) stale.push_back(n);
  }
  ::closedir(d);
  for (const auto& n : stale) (void)RunIp({"netns", "delete", n});
}

}  // namespace

absl::Status RunIp(const std::vector<std::string>& args) {
  const char* ip = IpPath();
  if (ip == nullptr) return absl::FailedPreconditionError("iproute2 `ip` not found; apt-get install iproute2");
  std::vector<std::string> all = {ip};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  int err_pipe[2];
  if (::pipe2(err_pipe, O_CLOEXEC) < 0) return absl::InternalError(fmt::format("pipe2: {}", std::strerror(errno)));
  const pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError(fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    ::dup2(err_pipe[1], 2);
    ::execv(ip, argv.data());
    ::_exit(127);
  }
  ::close(err_pipe[1]);
  std::string err;
  char buf[512];
  ssize_t r;
  while ((r = ::read(err_pipe[0], buf, sizeof(buf))) > 0) err.append(buf, static_cast<size_t>(r));
  ::close(err_pipe[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return absl::OkStatus();
  std::string cmd = "ip";
  for (const auto& a : args) cmd += " " + a;
  while (!err.empty() && err.back() == '\n') err.pop_back();
  return absl::InternalError(fmt::format("`{}` failed (status {:#x}): {}", cmd, status, err));
}

absl::StatusOr<NetnsTopology> NetnsTopology::Create(int hosts, std::string tag) {
  if (hosts < 1 || hosts > 250) return absl::InvalidArgumentError(fmt::format("hosts = {} (1..250)", hosts));
  SweepStale(tag);
  NetnsTopology t;
  t.subnet_ = kSubnet;
  const std::string base = fmt::format("aggvm-{}-{}-", tag, ::getpid());
  t.hub_ = base + "hub";
  // From here on, t's destructor removes whatever was made if a step fails.
  if (auto s = RunIp({"netns", "add", t.hub_}); !s.ok()) {
    t.hub_.clear();
    return s;
  }
  for (const auto& cmd : std::vector<std::vector<std::string>>{
           {"-n", t.hub_, "link", "add", "br0", "type", "bridge"},
           {"-n", t.hub_, "link", "set", "br0", "up"},
           {"-n", t.hub_, "link", "set", "lo", "up"}}) {
    if (auto s = RunIp(cmd); !s.ok()) return s;
  }
  for (int i = 0; i < hosts; ++i) {
    const std::string ns = base + std::to_string(i);
    if (auto s = RunIp({"netns", "add", ns}); !s.ok()) return s;
    t.names_.push_back(ns);
    const std::string veth = "v" + std::to_string(i);
    for (const auto& cmd : std::vector<std::vector<std::string>>{
             {"-n", t.hub_, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns},
             {"-n", t.hub_, "link", "set", veth, "master", "br0", "up"},
             {"-n", ns, "addr", "add", t.address(i) + "/24", "dev", "eth0"},
             {"-n", ns, "link", "set", "eth0", "up"},
             {"-n", ns, "link", "set", "lo", "up"}}) {
      if (auto s = RunIp(cmd); !s.ok()) return s;
    }
  }
  return t;
}

NetnsTopology::NetnsTopology(NetnsTopology&& o) noexcept
    : hub_(std::move(o.hub_)), names_(std::move(o.names_)), subnet_(o.subnet_) {
  o.hub_.clear();
  o.names_.clear();
}

NetnsTopology& NetnsTopology::operator=(NetnsTopology&& o) noexcept {
  if (this != &o) {
    Destroy();
    hub_ = std::move(o.hub_);
    names_ = std::move(o.names_);
    subnet_ = o.subnet_;
    o.hub_.clear();
    o.names_.clear();
  }
  return *this;
}

NetnsTopology::~NetnsTopology() { Destroy(); }

void NetnsTopology::Destroy() {
  // Deleting a namespace destroys its interfaces; a veth pair goes when either end goes.
  for (auto it = names_.rbegin(); it != names_.rend(); ++it) (void)RunIp({"netns", "delete", *it});
  names_.clear();
  if (!hub_.empty()) (void)RunIp({"netns", "delete", hub_});
  hub_.clear();
}

std::string NetnsTopology::address(int i) const { return fmt::format("10.{}.0.{}", subnet_, i + 1); }

absl::Status NetnsTopology::EnterNamespace(int i) const {
  if (i < 0 || i >= hosts()) return absl::InvalidArgumentError(fmt::format("host {} of {}", i, hosts()));
  const std::string path = NetnsPath(name(i));
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(fmt::format("open {}: {}", path, std::strerror(errno)));
  const int rc = ::setns(fd, CLONE_NEWNET);
  const int err = errno;
  ::close(fd);
  if (rc < 0) return absl::InternalError(fmt::format("setns({}): {}", path, std::strerror(err)));
  return absl::OkStatus();
}

absl::Status NetnsTopology::RunInNamespace(int i, const std::function<absl::Status()>& fn) const {
  absl::Status result;
  std::thread th([&] {
    result = EnterNamespace(i);
    if (result.ok()) result = fn();
  });
  th.join();
  return result;
}

absl::StatusOr<pid_t> NetnsTopology::SpawnInNamespace(int i, const std::vector<std::string>& argv) const {
  if (i < 0 || i >= hosts()) return absl::InvalidArgumentError(fmt::format("host {} of {}", i, hosts()));
  if (argv.empty()) return absl::InvalidArgumentError("empty argv");
  // Everything the child needs is prepared before fork: after it only async-signal-safe calls are made.
  const std::string path = NetnsPath(name(i));
  std::vector<std::string> args = argv;
  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError(fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || ::setns(fd, CLONE_NEWNET) < 0) ::_exit(126);
    ::execv(cargv[0], cargv.data());
    ::_exit(127);
  }
  return pid;
}

}  // namespace aggvm::testing
