#include "transport/tcp_transport.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <thread>

#include "common/clock.h"

namespace aggvm::transport {
namespace {

// "AGGVMTCP" in little-endian: the first control frame of every connection carries it in arg0.
constexpr uint64_t kHelloMagic = 0x504354'4d5647'4741ull;
constexpr size_t kRxFrames = 256;  // per-peer receive buffer: one recv(2) takes up to 16 KiB
constexpr size_t kRxBytes = kRxFrames * kFrameSize;
static_assert(kRxBytes % kFrameSize == 0);
constexpr int kMaxEpollEvents = 16;
constexpr uint32_t kWakeToken = 0xFFFFFFFFu;  // epoll data of the Waker's eventfd (peer indexes are far below)
// Accepted connections whose hello has not arrived yet, read concurrently during Connect. Beyond this many the oldest
// is closed: a flood of silent connections cannot exhaust descriptors or starve the real peers.
constexpr size_t kMaxPendingHellos = 64;

std::string Errno(int err) {
  const char* name = strerrorname_np(err);
  return fmt::format("{} ({})", name != nullptr ? name : "errno " + std::to_string(err), std::strerror(err));
}

absl::StatusOr<std::pair<std::string, std::string>> SplitHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(
        fmt::format("address '{}' is not host:port (e.g. 10.0.0.2:7000 or [::1]:7000)", address));
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return std::make_pair(host, address.substr(colon + 1));
}

struct AddrInfoDeleter {
  void operator()(addrinfo* a) const { freeaddrinfo(a); }
};
using AddrInfoPtr = std::unique_ptr<addrinfo, AddrInfoDeleter>;

absl::StatusOr<AddrInfoPtr> Resolve(const std::string& address, bool passive) {
  auto hp = SplitHostPort(address);
  if (!hp.ok()) return hp.status();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(hp->first.empty() ? nullptr : hp->first.c_str(), hp->second.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return absl::InvalidArgumentError(fmt::format("cannot resolve address '{}': {}", address, gai_strerror(rc)));
  }
  return AddrInfoPtr(res);
}

absl::Time Deadline(absl::Duration d) { return absl::Now() + d; }
int MillisUntil(absl::Time deadline) {
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))),
                                            1 << 30));
}

// Waits for `events` on fd until deadline. OK, DEADLINE_EXCEEDED, or UNAVAILABLE.
absl::Status PollFd(int fd, short events, absl::Time deadline, std::string_view what) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int rc = ::poll(&p, 1, MillisUntil(deadline));
    if (rc > 0) return absl::OkStatus();
    if (rc == 0) return absl::DeadlineExceededError(fmt::format("timed out waiting to {}", what));
    if (errno != EINTR) return absl::UnavailableError(fmt::format("poll to {}: {}", what, Errno(errno)));
  }
}

absl::Status WriteAll(int fd, const uint8_t* buf, size_t n, absl::Time deadline, std::string_view what) {
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::send(fd, buf + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      done += static_cast<size_t>(w);
    } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (auto s = PollFd(fd, POLLOUT, deadline, what); !s.ok()) return s;
    } else {
      return absl::UnavailableError(fmt::format("{}: send: {}", what, Errno(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadAll(int fd, uint8_t* buf, size_t n, absl::Time deadline, std::string_view what) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::recv(fd, buf + done, n - done, MSG_DONTWAIT);
    if (r > 0) {
      done += static_cast<size_t>(r);
    } else if (r == 0) {
      return absl::UnavailableError(fmt::format("{}: connection closed after {} of {} bytes", what, done, n));
    } else if (errno == EAGAIN || errno == EINTR) {
      if (auto s = PollFd(fd, POLLIN, deadline, what); !s.ok()) return s;
    } else {
      return absl::UnavailableError(fmt::format("{}: recv: {}", what, Errno(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status SetNonBlockingNoDelay(int fd) {
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    return absl::InternalError(fmt::format("fcntl(O_NONBLOCK): {}", Errno(errno)));
  }
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) {
    return absl::InternalError(fmt::format("setsockopt(TCP_NODELAY): {}", Errno(errno)));
  }
  return absl::OkStatus();
}

Frame HelloFrame(NodeId self, NodeId intended_peer) {
  Frame f;
  f.type = FrameType::kControl;
  f.source = self;
  f.sequence = 1;
  f.payload = ControlPayload{.op = ControlPayload::Op::kHello, .arg0 = kHelloMagic, .arg1 = intended_peer.value()};
  return f;
}

// Checks a received hello; returns the sender's node id.
absl::StatusOr<NodeId> CheckHello(const WireFrame& w, NodeId self) {
  auto f = DecodeFrame(w.data(), w.size());  // set-up path: a bad hello's message is wanted
  if (!f.ok()) return f.status();
  const auto* c = std::get_if<ControlPayload>(&f->payload);
  if (f->type != FrameType::kControl || c == nullptr || c->op != ControlPayload::Op::kHello ||
      c->arg0 != kHelloMagic || f->sequence != 1) {
    return absl::InvalidArgumentError(fmt::format(
        "first frame is not an aggvm tcp hello (type {}, sequence {}); is something else connecting to this port?",
        FrameTypeName(f->type), f->sequence));
  }
  if (c->arg1 != self.value()) {
    return absl::InvalidArgumentError(
        fmt::format("hello from node {} was meant for node {}, but this is node {}; check the peer list",
                    f->source, c->arg1, self));
  }
  return f->source;
}

}  // namespace

struct TcpTransport::Peer {
  NodeId node{};
  std::string address;
  int fd = -1;
  std::atomic<bool> alive{false};
  // Loss bookkeeping: the thread that flips `alive` to false writes `loss_reason`, then sets `loss_ready` (release).
  std::string loss_reason;
  std::atomic<bool> loss_ready{false};
  bool loss_reported = false;  // poller only
  // Sender side (one sending thread per peer at a time).
  uint32_t send_sequence = 2;  // 1 was the hello
  std::atomic<uint64_t> frames_sent{0};
  std::atomic<uint64_t> send_errors{0};
  absl::Status exhausted;  // prebuilt RESOURCE_EXHAUSTED: returning a copy does not allocate
  // Receiver side (poller only).
  SequenceChecker recv_sequence{2};  // 1 was the hello
  FrameError last_bad_frame;         // why the last refused frame from this peer was refused (code + field)
  std::atomic<uint64_t> frames_received{0};
  size_t rx_begin = 0, rx_end = 0;
  alignas(64) std::array<uint8_t, kRxBytes> rx;

  size_t buffered_frames() const { return (rx_end - rx_begin) / kFrameSize; }
};

namespace {
// Single-writer counter increment: a plain load/store pair, no locked instruction on the per-frame path.
void Bump(std::atomic<uint64_t>& c) { c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed); }
}  // namespace

absl::StatusOr<std::unique_ptr<TcpTransport>> TcpTransport::Create(NodeId self, TcpTransportOptions options) {
  auto ai = Resolve(options.listen_address, /*passive=*/true);
  if (!ai.ok()) return ai.status();
  const addrinfo* a = ai->get();
  const int fd = ::socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::UnavailableError(fmt::format("socket for listening on {}: {}", options.listen_address,
                                                        Errno(errno)));
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, a->ai_addr, a->ai_addrlen) < 0 || ::listen(fd, 128) < 0) {
    const int err = errno;
    ::close(fd);
    return absl::UnavailableError(fmt::format("cannot listen on {}: {}; is another node using this port?",
                                              options.listen_address, Errno(err)));
  }
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  uint16_t port = 0;
  if (ss.ss_family == AF_INET) port = ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) port = ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  std::unique_ptr<TcpTransport> t(new TcpTransport(self, std::move(options), fd, port));
  if (t->options_.wait_mode == WaitMode::kEvent) {
    if (absl::Status s = t->waker_.CanEndASleep(); !s.ok()) return s;
  }
  return t;
}

TcpTransport::TcpTransport(NodeId self, TcpTransportOptions options, int listen_fd, uint16_t port)
    : self_(self), options_(std::move(options)), listen_fd_(listen_fd), listen_port_(port),
      index_of_node_(65536, -1) {}

TcpTransport::~TcpTransport() { Close(); }

absl::Status TcpTransport::Connect(std::span<const PeerEndpoint> peers, absl::Duration timeout) {
  if (closed_) return absl::FailedPreconditionError("Connect on a closed tcp transport");
  if (!peers_.empty()) return absl::FailedPreconditionError("Connect may be called only once per tcp transport");
  for (const auto& pe : peers) {
    if (pe.node == self_) {
      return absl::InvalidArgumentError(fmt::format("peer list contains this node itself ({})", self_));
    }
    if (index_of_node_[pe.node.value()] >= 0) {
      return absl::InvalidArgumentError(fmt::format("peer list names node {} twice", pe.node));
    }
    auto p = std::make_unique<Peer>();
    p->node = pe.node;
    p->address = pe.address;
    p->exhausted = absl::ResourceExhaustedError(
        fmt::format("send queue to node {} is full (socket buffer); retry after polling", pe.node));
    index_of_node_[pe.node.value()] = static_cast<int32_t>(peers_.size());
    peers_.push_back(std::move(p));
  }
  const absl::Time deadline = Deadline(timeout);
  auto fail = [this](absl::Status s) {
    Close();
    return s;
  };

  // Lower id dials higher: dial in increasing order, then accept the lower ones. The highest node only accepts, so
  // by induction from it every dial is eventually answered; no cycle of waiting exists.
  std::vector<Peer*> order;
  for (auto& p : peers_) order.push_back(p.get());
  std::sort(order.begin(), order.end(), [](Peer* a, Peer* b) { return a->node < b->node; });
  std::vector<Peer*> to_accept;
  for (Peer* p : order) {
    if (p->node < self_) {
      to_accept.push_back(p);
      continue;
    }
    if (auto s = DialPeer(*p, deadline); !s.ok()) return fail(s);
  }
  if (auto s = AcceptPeers(to_accept, deadline); !s.ok()) return fail(s);

  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) return fail(absl::InternalError(fmt::format("epoll_create1: {}", Errno(errno))));
  for (size_t i = 0; i < peers_.size(); ++i) {
    Peer& p = *peers_[i];
    if (auto s = SetNonBlockingNoDelay(p.fd); !s.ok()) return fail(s);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u32 = static_cast<uint32_t>(i);
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, p.fd, &ev) < 0) {
      return fail(absl::InternalError(fmt::format("epoll_ctl(ADD) for node {}: {}", p.node, Errno(errno))));
    }
    p.alive.store(true, std::memory_order_release);
  }
  if (waker_.fd() >= 0) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = kWakeToken;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, waker_.fd(), &ev) < 0) {
      return fail(absl::InternalError(fmt::format("epoll_ctl(ADD) for the waker: {}", Errno(errno))));
    }
  }
  // The mesh is complete: nobody else may join, so stop listening. A later stray connect is refused by the kernel
  // instead of piling up in the backlog of a socket nobody accepts on.
  ::close(listen_fd_);
  listen_fd_ = -1;
  return absl::OkStatus();
}

absl::Status TcpTransport::DialPeer(Peer& p, absl::Time deadline) {
  auto ai = Resolve(p.address, /*passive=*/false);
  if (!ai.ok()) return ai.status();
  const addrinfo* a = ai->get();
  std::string last_error = "no attempt made";
  while (absl::Now() < deadline) {
    const int fd = ::socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return absl::UnavailableError(fmt::format("socket to dial node {}: {}", p.node, Errno(errno)));
    int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
    if (rc < 0 && errno == EINPROGRESS) {
      const absl::Time attempt_deadline = std::min(deadline, Deadline(options_.connect_timeout));
      absl::Status s = PollFd(fd, POLLOUT, attempt_deadline, "finish connecting");
      int err = 0;
      socklen_t len = sizeof(err);
      if (s.ok()) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      rc = (s.ok() && err == 0) ? 0 : -1;
      errno = s.ok() ? err : ETIMEDOUT;
    }
    if (rc < 0) {
      last_error = Errno(errno);
      ::close(fd);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the peer may not listen yet: retry
      continue;
    }
    // Connected: exchange hellos. The reply may take until the overall deadline (the peer may still be dialing
    // nodes above it before it accepts us).
    WireFrame hello;
    EncodeFrame(HelloFrame(self_, p.node), hello);
    const std::string what = fmt::format("exchange hello with node {} at {}", p.node, p.address);
    absl::Status s = WriteAll(fd, hello.data(), hello.size(), deadline, what);
    WireFrame reply{};
    if (s.ok()) s = ReadAll(fd, reply.data(), reply.size(), deadline, what);
    if (!s.ok()) {
      ::close(fd);
      return absl::UnavailableError(fmt::format("cannot connect node {} to node {} at {}: {}", self_, p.node,
                                                p.address, std::string(s.message())));
    }
    auto from = CheckHello(reply, self_);
    if (!from.ok() || *from != p.node) {
      ::close(fd);
      bad_frames_.fetch_add(1, std::memory_order_relaxed);
      return absl::FailedPreconditionError(fmt::format(
          "node {} at {} answered with a bad hello: {}", p.node, p.address,
          from.ok() ? fmt::format("it is node {}; check the peer list", *from) : std::string(from.status().message())));
    }
    p.fd = fd;
    return absl::OkStatus();
  }
  return absl::DeadlineExceededError(fmt::format("cannot connect node {} to node {} at {} before the deadline: {}; "
                                                 "is it running and reachable?",
                                                 self_, p.node, p.address, last_error));
}

absl::Status TcpTransport::AcceptPeers(std::vector<Peer*>& waiting, absl::Time deadline) {
  // Every accepted connection is read concurrently through one poll(2) set, each with its own hello deadline, so a
  // client that connects and says nothing delays nobody: it is closed when its own connect_timeout runs out.
  struct Pending {
    int fd = -1;
    absl::Time hello_deadline;
    size_t got = 0;
    WireFrame hello{};
  };
  std::vector<Pending> pending;
  std::vector<pollfd> fds;
  auto drop = [&pending](size_t i) {
    ::close(pending[i].fd);
    pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(i));
  };
  auto close_all = [&pending] {
    for (Pending& c : pending) ::close(c.fd);
    pending.clear();
  };
  while (!waiting.empty()) {
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      close_all();
      std::string missing;
      for (Peer* p : waiting) missing += fmt::format("{}{} ({})", missing.empty() ? "" : ", ", p->node, p->address);
      return absl::DeadlineExceededError(fmt::format("node {}: peers never connected: {}; are they running?",
                                                     self_, missing));
    }
    // A connection whose hello did not arrive in time is not a peer; keep waiting for the real ones.
    for (size_t i = pending.size(); i-- > 0;) {
      if (pending[i].hello_deadline <= now) drop(i);
    }
    absl::Time wake = deadline;
    fds.assign(1, pollfd{listen_fd_, POLLIN, 0});
    for (const Pending& c : pending) {
      fds.push_back(pollfd{c.fd, POLLIN, 0});
      wake = std::min(wake, c.hello_deadline);
    }
    const int rc = ::poll(fds.data(), fds.size(), MillisUntil(wake));
    if (rc < 0 && errno != EINTR) {
      close_all();
      return absl::UnavailableError(fmt::format("node {}: poll while accepting peers: {}", self_, Errno(errno)));
    }
    if (rc <= 0) continue;
    // Read the hellos that have bytes (fds[i + 1] is pending[i]; pending only shrinks below, from the back).
    for (size_t i = pending.size(); i-- > 0;) {
      if (fds[i + 1].revents == 0) continue;
      Pending& c = pending[i];
      const ssize_t r = ::recv(c.fd, c.hello.data() + c.got, kFrameSize - c.got, MSG_DONTWAIT);
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (r <= 0) {  // closed or reset before a whole hello: not a peer
        drop(i);
        continue;
      }
      c.got += static_cast<size_t>(r);
      if (c.got < kFrameSize) continue;
      auto from = CheckHello(c.hello, self_);
      auto it = from.ok() ? std::find_if(waiting.begin(), waiting.end(), [&](Peer* p) { return p->node == *from; })
                          : waiting.end();
      if (it == waiting.end()) {
        bad_frames_.fetch_add(1, std::memory_order_relaxed);  // garbage, or an unexpected node: drop the connection
        drop(i);
        continue;
      }
      WireFrame reply;
      EncodeFrame(HelloFrame(self_, (*it)->node), reply);
      if (!WriteAll(c.fd, reply.data(), reply.size(), std::min(deadline, c.hello_deadline), "answer hello").ok()) {
        drop(i);
        continue;
      }
      (*it)->fd = c.fd;
      waiting.erase(it);
      pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(i));
    }
    if ((fds[0].revents & POLLIN) != 0) {
      for (;;) {  // take every queued connection
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) break;  // EAGAIN (drained), or a connection that went away
        if (pending.size() == kMaxPendingHellos) drop(0);  // the oldest silent one makes room
        pending.push_back(Pending{fd, absl::Now() + options_.connect_timeout});
      }
    }
  }
  close_all();  // connections still silent when the last peer arrived are strangers
  return absl::OkStatus();
}

void TcpTransport::MarkLost(Peer& p, std::string reason) {
  bool expected = true;
  if (!p.alive.compare_exchange_strong(expected, false, std::memory_order_acq_rel)) return;  // already lost
  // Shut down, don't close: a concurrent Send must never write into a descriptor number reused by someone else.
  ::shutdown(p.fd, SHUT_RDWR);
  if (epoll_fd_ >= 0) ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, p.fd, nullptr);
  p.loss_reason = fmt::format("lost tcp connection to node {} ({}): {}", p.node, p.address, reason);
  p.loss_ready.store(true, std::memory_order_release);
  peers_lost_.fetch_add(1, std::memory_order_relaxed);
  // Its descriptor just left the epoll set: a Wait without a timeout, asleep in another thread, must still report it.
  waker_.Kick();
}

absl::Status TcpTransport::Send(NodeId to, Frame& frame) {
  const int32_t idx = index_of_node_[to.value()];
  if (idx < 0) return absl::NotFoundError(fmt::format("node {} is not a peer of node {}", to, self_));
  Peer& p = *peers_[static_cast<size_t>(idx)];
  if (!p.alive.load(std::memory_order_acquire)) {
    Bump(p.send_errors);
    if (p.loss_ready.load(std::memory_order_acquire)) return absl::UnavailableError(p.loss_reason);
    return absl::UnavailableError(fmt::format("node {} is not connected", to));
  }
  frame.source = self_;
  frame.sequence = p.send_sequence;
  if (absl::Status s = ValidateFrame(frame); !s.ok()) {
    Bump(p.send_errors);
    return s;
  }
  WireFrame wire;
  EncodeFrame(frame, wire);
  size_t done = 0;
  for (;;) {
    const ssize_t w = ::send(p.fd, wire.data() + done, kFrameSize - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      done += static_cast<size_t>(w);
      if (done == kFrameSize) break;
      continue;  // partial: the rest must follow, a frame is never split across calls
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      if (done == 0) return p.exhausted;  // nothing consumed; the caller may retry
      // Mid-frame: wait for room, bounded, so the stream stays aligned on frame boundaries.
      if (PollFd(p.fd, POLLOUT, Deadline(options_.send_stall_timeout), "finish a frame").ok()) continue;
      MarkLost(p, fmt::format("send stalled for {} with a partial frame written; the peer stopped reading",
                              absl::FormatDuration(options_.send_stall_timeout)));
    } else {
      MarkLost(p, fmt::format("send failed: {}", w < 0 ? Errno(errno) : std::string("wrote 0 bytes")));
    }
    Bump(p.send_errors);
    return absl::UnavailableError(p.loss_reason);
  }
  p.send_sequence = NextSequence(p.send_sequence);
  Bump(p.frames_sent);
  return absl::OkStatus();
}

size_t TcpTransport::DrainBuffered(Peer& p, std::span<ReceivedFrame> out, size_t n) {
  while (n < out.size() && p.rx_end - p.rx_begin >= kFrameSize) {
    const uint8_t* bytes = p.rx.data() + p.rx_begin;
    Frame& f = out[n].frame;  // decoded in place; out[n] only counts once n moves past it
    FrameError e = DecodeFrameRaw(bytes, kFrameSize, f);
    if (e.ok() && f.source != p.node) {
      e.code = FrameErrorCode::kWrongSource;
      e.field = FrameField::kSource;
      e.type = static_cast<uint8_t>(f.type);
      e.value = f.source.value();
    }
    if (!e.ok()) {
      bad_frames_.fetch_add(1, std::memory_order_relaxed);
      p.last_bad_frame = e;
      p.rx_begin = p.rx_end = 0;  // the rest of the stream cannot be trusted
      // The connection ends here, once: the message is built on this loss path only.
      MarkLost(p, e.code == FrameErrorCode::kWrongSource
                      ? fmt::format("sent a frame claiming to come from node {}; connection closed", e.value)
                      : fmt::format("sent an invalid frame ({}); connection closed", DescribeFrameError(e)));
      return n;
    }
    p.rx_begin += kFrameSize;
    if (!p.recv_sequence.Accept(f.sequence)) sequence_errors_.fetch_add(1, std::memory_order_relaxed);
    out[n].from = p.node;
    ++n;
    Bump(p.frames_received);
  }
  if (p.rx_begin == p.rx_end) p.rx_begin = p.rx_end = 0;
  return n;
}

size_t TcpTransport::ReadPeer(Peer& p, std::span<ReceivedFrame> out, size_t n) {
  n = DrainBuffered(p, out, n);
  if (n == out.size() || !p.alive.load(std::memory_order_relaxed)) return n;
  if (p.rx_begin != 0) {  // keep a partial frame at the front
    std::memmove(p.rx.data(), p.rx.data() + p.rx_begin, p.rx_end - p.rx_begin);
    p.rx_end -= p.rx_begin;
    p.rx_begin = 0;
  }
  const ssize_t r = ::recv(p.fd, p.rx.data() + p.rx_end, p.rx.size() - p.rx_end, MSG_DONTWAIT);
  if (r > 0) {
    p.rx_end += static_cast<size_t>(r);
    return DrainBuffered(p, out, n);
  }
  if (r == 0) {
    MarkLost(p, fmt::format("the peer closed the connection after {} frames{}; did node {} exit or crash?",
                            p.frames_received.load(std::memory_order_relaxed),
                            p.rx_end != 0 ? fmt::format(" and {} bytes of a partial frame", p.rx_end) : "", p.node));
  } else if (errno != EAGAIN && errno != EINTR) {
    MarkLost(p, fmt::format("recv failed: {}", Errno(errno)));
  }
  return n;
}

absl::StatusOr<size_t> TcpTransport::Finish(size_t n) {
  if (n > 0) return n;
  // Report each loss once, after the frames that peer sent before it are all returned.
  for (auto& pp : peers_) {
    Peer& p = *pp;
    if (!p.loss_reported && p.loss_ready.load(std::memory_order_acquire) && p.buffered_frames() == 0) {
      p.loss_reported = true;
      return absl::UnavailableError(p.loss_reason);
    }
  }
  return size_t{0};
}

absl::StatusOr<size_t> TcpTransport::Poll(std::span<ReceivedFrame> out) {
  if (closed_) return absl::FailedPreconditionError("Poll on a closed tcp transport");
  size_t n = 0;
  const size_t count = peers_.size();
  for (size_t k = 0; k < count && n < out.size(); ++k) {
    Peer& p = *peers_[(next_poll_start_ + k) % count];
    if (p.alive.load(std::memory_order_relaxed) || p.buffered_frames() > 0) n = ReadPeer(p, out, n);
  }
  if (count > 0) next_poll_start_ = (next_poll_start_ + 1) % count;
  return Finish(n);
}

absl::StatusOr<size_t> TcpTransport::Wait(std::span<ReceivedFrame> out, absl::Duration timeout) {
  if (closed_) return absl::FailedPreconditionError("Wait on a closed tcp transport");
  if (out.empty()) return size_t{0};
  const uint64_t start = MonotonicNanos();
  const bool forever = timeout == absl::InfiniteDuration();
  const uint64_t limit = static_cast<uint64_t>(std::max<int64_t>(0, absl::ToInt64Nanoseconds(timeout)));
  if (options_.wait_mode == WaitMode::kBusyPoll) {
    for (uint32_t spin = 0;; ++spin) {
      auto r = Poll(out);
      if (!r.ok() || *r > 0) return r;
      if (waker_.pending() && waker_.Consume()) return size_t{0};
      if ((spin & 63) == 63 && MonotonicNanos() - start >= limit) return size_t{0};
    }
  }
  // Event mode: frames already buffered (or an unreported loss) first, then sleep in epoll_wait.
  size_t n = 0;
  for (auto& p : peers_) {
    if (p->buffered_frames() > 0) n = DrainBuffered(*p, out, n);
    if (n == out.size()) break;
  }
  if (n > 0) return n;
  if (auto r = Finish(0); !r.ok()) return r;
  for (;;) {
    // A Wake whose eventfd write an earlier Consume already drained (here, or in a round woken by a Waker::Kick)
    // left only the flag: honour it without sleeping.
    if (waker_.pending() && waker_.Consume()) return Finish(0);
    // Untimed: epoll_wait(-1) arms no timer (a timer armed and cancelled around every frame costs a clock-event
    // reprogramming each time, which is a VM exit for a virtualised host).
    const uint64_t elapsed = forever ? 0 : MonotonicNanos() - start;
    const int ms = forever ? -1
                   : elapsed >= limit
                       ? 0
                       : static_cast<int>(std::min<uint64_t>((limit - elapsed + 999'999) / 1'000'000, 1u << 30));
    epoll_event events[kMaxEpollEvents];
    const int ready = ::epoll_wait(epoll_fd_, events, kMaxEpollEvents, ms);
    if (ready < 0 && errno != EINTR) return absl::InternalError(fmt::format("epoll_wait: {}", Errno(errno)));
    bool woken = false;
    for (int i = 0; i < ready; ++i) {
      const uint32_t idx = events[i].data.u32;
      if (idx == kWakeToken) {
        woken = waker_.Consume() || woken;
      } else if (idx < peers_.size() && n < out.size()) {
        n = ReadPeer(*peers_[idx], out, n);
      }
    }
    if (n > 0) return n;
    if (woken) return Finish(0);
    if (auto r = Finish(0); !r.ok() || ms == 0) return r;
  }
}

void TcpTransport::Close() {
  if (closed_) return;
  closed_ = true;
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  epoll_fd_ = -1;
  for (auto it = peers_.rbegin(); it != peers_.rend(); ++it) {
    Peer& p = **it;
    p.alive.store(false, std::memory_order_release);
    if (p.fd >= 0) ::close(p.fd);
    p.fd = -1;
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

FrameError TcpTransport::last_bad_frame(NodeId peer) const {
  const int32_t idx = index_of_node_[peer.value()];
  return idx < 0 ? FrameError{} : peers_[static_cast<size_t>(idx)]->last_bad_frame;
}

TransportStats TcpTransport::stats() const {
  TransportStats s;
  for (const auto& p : peers_) {
    s.frames_sent += p->frames_sent.load(std::memory_order_relaxed);
    s.frames_received += p->frames_received.load(std::memory_order_relaxed);
    s.send_errors += p->send_errors.load(std::memory_order_relaxed);
  }
  s.bad_frames = bad_frames_.load(std::memory_order_relaxed);
  s.sequence_errors = sequence_errors_.load(std::memory_order_relaxed);
  s.peers_lost = peers_lost_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace aggvm::transport
