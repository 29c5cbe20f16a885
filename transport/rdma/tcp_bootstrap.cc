#include "transport/rdma/tcp_bootstrap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <thread>

#include "transport/rdma/cat.h"
#include "absl/strings/str_format.h"

namespace aggvm::transport::rdma {
namespace {

constexpr uint8_t kReadyByte = 'R';

std::string Errno(int err) { return Cat(std::strerror(err), " (errno ", err, ")"); }

absl::StatusOr<sockaddr_in> Resolve(std::string_view address) {
  const size_t colon = address.rfind(':');
  uint32_t port = 0;
  const std::string_view port_text = colon == std::string_view::npos ? "" : address.substr(colon + 1);
  const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() || port > 65535) {
    return absl::InvalidArgumentError(
        Cat("rdma bootstrap address '", address, "' is not host:port (e.g. 10.0.0.2:7400)"));
  }
  const std::string host(address.substr(0, colon));
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.empty() ? "0.0.0.0" : host.c_str(), nullptr, &hints, &res); rc != 0) {
    return absl::InvalidArgumentError(
        Cat("rdma bootstrap address '", address, "': cannot resolve host: ", gai_strerror(rc)));
  }
  sockaddr_in sa{};
  std::memcpy(&sa, res->ai_addr, sizeof(sa));
  freeaddrinfo(res);
  sa.sin_port = htons(static_cast<uint16_t>(port));
  return sa;
}

int RemainingMs(absl::Time deadline) {
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 1 << 30));
}

// Waits for `events` on fd until the deadline. DEADLINE_EXCEEDED names `what`.
absl::Status WaitFd(int fd, short events, absl::Time deadline, std::string_view what) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int rc = poll(&p, 1, RemainingMs(deadline));
    if (rc > 0) return absl::OkStatus();
    if (rc == 0) return absl::DeadlineExceededError(Cat("rdma bootstrap: timed out ", what));
    if (errno != EINTR) return absl::InternalError(Cat("rdma bootstrap: poll failed: ", Errno(errno)));
  }
}

absl::Status WriteFull(int fd, const uint8_t* p, size_t n, absl::Time deadline, std::string_view what) {
  while (n > 0) {
    if (auto s = WaitFd(fd, POLLOUT, deadline, what); !s.ok()) return s;
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return absl::UnavailableError(Cat("rdma bootstrap: send failed ", what, ": ", Errno(errno)));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status ReadFull(int fd, uint8_t* p, size_t n, absl::Time deadline, std::string_view what) {
  while (n > 0) {
    if (auto s = WaitFd(fd, POLLIN, deadline, what); !s.ok()) return s;
    const ssize_t r = recv(fd, p, n, 0);
    if (r == 0) return absl::UnavailableError(Cat("rdma bootstrap: connection closed by the peer ", what));
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return absl::UnavailableError(Cat("rdma bootstrap: recv failed ", what, ": ", Errno(errno)));
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::StatusOr<RdmaConnInfo> ReadInfo(int fd, absl::Time deadline, std::string_view what) {
  uint8_t buf[RdmaConnInfo::kWireSize];
  if (auto s = ReadFull(fd, buf, sizeof(buf), deadline, what); !s.ok()) return s;
  return RdmaConnInfo::Decode(buf, sizeof(buf));
}

}  // namespace

absl::StatusOr<std::unique_ptr<TcpBootstrap>> TcpBootstrap::Listen(NodeId self, std::string_view listen_address) {
  auto sa = Resolve(listen_address);
  if (!sa.ok()) return sa.status();
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return absl::InternalError(Cat("rdma bootstrap: socket failed: ", Errno(errno)));
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, reinterpret_cast<const sockaddr*>(&*sa), sizeof(*sa)) != 0 || listen(fd, 64) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(
        Cat("rdma bootstrap: cannot listen on ", listen_address, ": ", Errno(err)));
  }
  sockaddr_in bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  char ip[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &bound.sin_addr, ip, sizeof(ip));
  return std::unique_ptr<TcpBootstrap>(new TcpBootstrap(self, fd, Cat(ip, ":", ntohs(bound.sin_port))));
}

TcpBootstrap::~TcpBootstrap() { Close(); }

void TcpBootstrap::Close() {
  for (auto& [node, p] : early_) close(p.fd);
  early_.clear();
  for (auto& [node, fd] : conns_) close(fd);
  conns_.clear();
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
}

absl::StatusOr<int> TcpBootstrap::ConnectTo(const PeerEndpoint& peer, absl::Time deadline) {
  auto sa = Resolve(peer.address);
  if (!sa.ok()) return sa.status();
  int last_err = 0;
  // The peer may not listen yet: retry refused connections until the deadline.
  while (absl::Now() < deadline) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return absl::InternalError(Cat("rdma bootstrap: socket failed: ", Errno(errno)));
    int rc = connect(fd, reinterpret_cast<const sockaddr*>(&*sa), sizeof(*sa));
    if (rc != 0 && errno == EINPROGRESS) {
      if (WaitFd(fd, POLLOUT, deadline, "connecting").ok()) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        rc = err == 0 ? 0 : -1;
        errno = err;
      } else {
        errno = ETIMEDOUT;
      }
    }
    if (rc == 0) {
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      return fd;
    }
    last_err = errno;
    close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrFormat(
      "rdma bootstrap: cannot reach node %d at %s before the deadline (last error: %s); is its agent running?",
      peer.node.value(), peer.address, last_err ? Errno(last_err) : "none"));
}

absl::StatusOr<TcpBootstrap::Pending> TcpBootstrap::AcceptFrom(const PeerEndpoint& peer, absl::Time deadline) {
  for (;;) {
    if (auto it = early_.find(peer.node.value()); it != early_.end()) {
      Pending p = it->second;
      early_.erase(it);
      return p;
    }
    if (auto s = WaitFd(listen_fd_, POLLIN, deadline,
                        absl::StrFormat("waiting for node %d to connect", peer.node.value()));
        !s.ok()) {
      return s;
    }
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      return absl::InternalError(Cat("rdma bootstrap: accept failed: ", Errno(errno)));
    }
    auto info = ReadInfo(fd, deadline, "reading a connecting peer's connection data");
    if (!info.ok() || info->node.value() >= self_.value() || early_.count(info->node.value()) != 0 ||
        conns_.count(info->node.value()) != 0) {
      close(fd);  // a stranger, a duplicate, or a higher node (it should accept, not dial): ignore it
      continue;
    }
    early_[info->node.value()] = Pending{fd, *info};
  }
}

absl::StatusOr<RdmaConnInfo> TcpBootstrap::Exchange(const PeerEndpoint& peer, const RdmaConnInfo& local,
                                                    absl::Time deadline) {
  if (peer.node == self_) {
    return absl::InvalidArgumentError(absl::StrFormat("rdma bootstrap: peer list names this node (%d)", self_.value()));
  }
  if (conns_.count(peer.node.value()) != 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("rdma bootstrap: already exchanged with node %d", peer.node.value()));
  }
  const auto wire = local.Encode();
  const std::string what = absl::StrFormat("exchanging connection data with node %d", peer.node.value());
  int fd = -1;
  RdmaConnInfo remote;
  if (self_ < peer.node) {
    auto c = ConnectTo(peer, deadline);
    if (!c.ok()) return c.status();
    fd = *c;
    auto s = WriteFull(fd, wire.data(), wire.size(), deadline, what);
    absl::StatusOr<RdmaConnInfo> r = s.ok() ? ReadInfo(fd, deadline, what) : absl::StatusOr<RdmaConnInfo>(s);
    if (!r.ok()) {
      close(fd);
      return r.status();
    }
    remote = *r;
  } else {
    auto p = AcceptFrom(peer, deadline);
    if (!p.ok()) return p.status();
    fd = p->fd;
    remote = p->info;
    if (auto s = WriteFull(fd, wire.data(), wire.size(), deadline, what); !s.ok()) {
      close(fd);
      return s;
    }
  }
  if (remote.node != peer.node) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrFormat(
        "rdma bootstrap: %s answered as node %d, expected node %d (wrong address in the peer list?)", peer.address,
        remote.node.value(), peer.node.value()));
  }
  conns_[peer.node.value()] = fd;
  return remote;
}

absl::Status TcpBootstrap::Ready(const PeerEndpoint& peer, absl::Time deadline) {
  auto it = conns_.find(peer.node.value());
  if (it == conns_.end()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("rdma bootstrap: Ready(node %d) before Exchange", peer.node.value()));
  }
  const int fd = it->second;
  const std::string what = absl::StrFormat("waiting for node %d to be ready", peer.node.value());
  uint8_t b = kReadyByte;
  absl::Status s = WriteFull(fd, &b, 1, deadline, what);
  if (s.ok()) s = ReadFull(fd, &b, 1, deadline, what);
  if (s.ok() && b != kReadyByte) {
    s = absl::InvalidArgumentError(absl::StrFormat("rdma bootstrap: node %d sent %#x instead of ready",
                                                   peer.node.value(), b));
  }
  close(fd);
  conns_.erase(it);
  return s;
}

}  // namespace aggvm::transport::rdma
