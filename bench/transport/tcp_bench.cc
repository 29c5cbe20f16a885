// TcpTransport frame ping-pong latency and one-way throughput, busy-poll and epoll, between two network namespaces
// joined by veth + bridge — each next to a raw baseline measured in the same run: a minimal 64-byte socket ping-pong
// in the same wait mode over its own connection between the same namespaces. Raw and aggvm round trips alternate in
// chunks so that noise from other load on the machine hits both alike.
//
//   bench_transport_tcp [--round-trips 100000] [--frames 200000] [--chunks 10] [--loopback] [--json FILE]
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <array>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/stats.h"
#include "tests/support/netns.h"
#include "tests/support/require.h"
#include "transport/tcp_transport.h"

namespace aggvm::transport {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "bench_transport_tcp: %s\n", what.c_str());
  std::exit(1);
}
void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + std::string(s.ToString()));
}

// ---- raw baseline: one TCP connection, 64-byte messages, the same wait mode ----

struct RawEnd {
  int fd = -1;
  int epfd = -1;
  WaitMode mode = WaitMode::kBusyPoll;
};

void SetupRaw(RawEnd& e, int fd, WaitMode mode) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  e.fd = fd;
  e.mode = mode;
  e.epfd = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ::epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev);
}

void RawSend(const RawEnd& e, const uint8_t* msg) {
  size_t done = 0;
  while (done < kFrameSize) {
    const ssize_t w = ::send(e.fd, msg + done, kFrameSize - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      done += static_cast<size_t>(w);
    } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
      Die("raw send failed");
    }
  }
}

// Receives exactly `bytes` bytes (a multiple of 64), waiting per the mode.
void RawRecv(const RawEnd& e, uint8_t* buf, size_t bytes) {
  size_t done = 0;
  while (done < bytes) {
    if (e.mode == WaitMode::kEvent) {
      epoll_event ev;
      ::epoll_wait(e.epfd, &ev, 1, -1);
    }
    const ssize_t r = ::recv(e.fd, buf + done, bytes - done, MSG_DONTWAIT);
    if (r > 0) {
      done += static_cast<size_t>(r);
    } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
      Die("raw recv failed");
    }
  }
}

// ---- one mode's endpoints ----

struct Pair {
  std::unique_ptr<TcpTransport> client, server;  // nodes 1 and 2
  RawEnd raw_client, raw_server;
};

struct Placement {
  std::optional<aggvm::testing::NetnsTopology> topo;  // empty: loopback
  std::string address(int host) const { return topo ? topo->address(host) : "127.0.0.1"; }
  absl::Status Run(int host, const std::function<absl::Status()>& fn) const {
    if (topo) return topo->RunInNamespace(host, fn);
    absl::Status s;
    std::thread([&] { s = fn(); }).join();
    return s;
  }
};

Pair MakePair(const Placement& place, WaitMode mode, uint16_t port) {
  Pair p;
  const std::string a0 = place.address(0) + ":" + std::to_string(port);
  const std::string a1 = place.address(1) + ":" + std::to_string(port);
  int raw_listen = -1;
  Check(place.Run(0, [&]() -> absl::Status {
          TcpTransportOptions o{.listen_address = a0, .wait_mode = mode};
          auto t = TcpTransport::Create(NodeId(1), o);
          if (!t.ok()) return t.status();
          p.client = std::move(*t);
          raw_listen = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
          int one = 1;
          ::setsockopt(raw_listen, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
          sockaddr_in sa{};
          sa.sin_family = AF_INET;
          sa.sin_port = htons(static_cast<uint16_t>(port + 1));
          ::inet_pton(AF_INET, place.address(0).c_str(), &sa.sin_addr);
          if (::bind(raw_listen, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0 || ::listen(raw_listen, 4) < 0) {
            return absl::UnavailableError("raw listen failed");
          }
          return absl::OkStatus();
        }),
        "create node 1");
  Check(place.Run(1, [&]() -> absl::Status {
          TcpTransportOptions o{.listen_address = a1, .wait_mode = mode};
          auto t = TcpTransport::Create(NodeId(2), o);
          if (!t.ok()) return t.status();
          p.server = std::move(*t);
          const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
          sockaddr_in sa{};
          sa.sin_family = AF_INET;
          sa.sin_port = htons(static_cast<uint16_t>(port + 1));
          ::inet_pton(AF_INET, place.address(0).c_str(), &sa.sin_addr);
          if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0) {
            return absl::UnavailableError("raw connect failed");
          }
          SetupRaw(p.raw_server, fd, mode);
          return absl::OkStatus();
        }),
        "create node 2");
  SetupRaw(p.raw_client, ::accept4(raw_listen, nullptr, nullptr, SOCK_CLOEXEC), mode);
  ::close(raw_listen);
  // Connect opens sockets (node 1 dials): it runs inside each node's namespace. Afterwards the sockets keep their
  // namespace, so Send/Wait may run on any thread.
  PeerEndpoint to2{NodeId(2), a1}, to1{NodeId(1), a0};
  std::thread srv([&] {
    Check(place.Run(1, [&] { return p.server->Connect(std::span(&to1, 1), absl::Seconds(10)); }), "connect node 2");
  });
  Check(place.Run(0, [&] { return p.client->Connect(std::span(&to2, 1), absl::Seconds(10)); }), "connect node 1");
  srv.join();
  return p;
}

Frame Ping(uint32_t i) {
  Frame f;
  f.type = FrameType::kControl;
  f.payload = ControlPayload{.op = ControlPayload::Op::kPing, .arg0 = i, .arg1 = 0};
  return f;
}

void SendRetry(Transport& t, NodeId to, Frame& f) {
  for (;;) {
    const absl::Status s = t.Send(to, f);
    if (s.ok()) return;
    if (s.code() != absl::StatusCode::kResourceExhausted) Die(std::string(s.ToString()));
  }
}
void ReceiveOne(Transport& t, std::span<ReceivedFrame> buf) {
  for (;;) {
    auto r = t.Wait(buf.first(1), absl::Seconds(5));
    if (!r.ok()) Die(std::string(r.status().ToString()));
    if (*r == 1) return;
  }
}

// ---- latency ----

void AggvmPingPong(Pair& p, size_t n, std::vector<double>& us) {
  std::thread server([&] {
    std::array<ReceivedFrame, 1> buf;
    for (size_t i = 0; i < n; ++i) {
      ReceiveOne(*p.server, buf);
      Frame pong = buf[0].frame;
      std::get<ControlPayload>(pong.payload).op = ControlPayload::Op::kPong;
      pong.flags = 0;
      SendRetry(*p.server, NodeId(1), pong);
    }
  });
  std::array<ReceivedFrame, 1> buf;
  for (size_t i = 0; i < n; ++i) {
    Frame f = Ping(static_cast<uint32_t>(i));
    const uint64_t t0 = MonotonicNanos();
    SendRetry(*p.client, NodeId(2), f);
    ReceiveOne(*p.client, buf);
    us.push_back(static_cast<double>(MonotonicNanos() - t0) / 1000.0);
  }
  server.join();
}

void RawPingPong(Pair& p, size_t n, std::vector<double>& us) {
  std::thread server([&] {
    uint8_t msg[kFrameSize];
    for (size_t i = 0; i < n; ++i) {
      RawRecv(p.raw_server, msg, kFrameSize);
      RawSend(p.raw_server, msg);
    }
  });
  uint8_t msg[kFrameSize] = {1};
  for (size_t i = 0; i < n; ++i) {
    const uint64_t t0 = MonotonicNanos();
    RawSend(p.raw_client, msg);
    RawRecv(p.raw_client, msg, kFrameSize);
    us.push_back(static_cast<double>(MonotonicNanos() - t0) / 1000.0);
  }
  server.join();
}

// ---- one-way throughput (frames per second, first send to last receive) ----

double AggvmThroughput(Pair& p, size_t n) {
  const uint64_t t0 = MonotonicNanos();
  std::thread sender([&] {
    for (size_t i = 0; i < n; ++i) {
      Frame f = Ping(static_cast<uint32_t>(i));
      SendRetry(*p.client, NodeId(2), f);
    }
  });
  std::array<ReceivedFrame, 64> buf;
  size_t got = 0;
  while (got < n) {
    auto r = p.server->Wait(buf, absl::Seconds(5));
    if (!r.ok()) Die(std::string(r.status().ToString()));
    got += *r;
  }
  const uint64_t t1 = MonotonicNanos();
  sender.join();
  return static_cast<double>(n) / (static_cast<double>(t1 - t0) / 1e9);
}

double RawThroughput(Pair& p, size_t n) {
  const uint64_t t0 = MonotonicNanos();
  std::thread sender([&] {
    uint8_t msg[kFrameSize] = {2};
    for (size_t i = 0; i < n; ++i) RawSend(p.raw_client, msg);
  });
  std::vector<uint8_t> buf(64 * kFrameSize);
  size_t got = 0;
  while (got < n * kFrameSize) {
    const size_t want = std::min(buf.size(), n * kFrameSize - got);
    if (p.raw_server.mode == WaitMode::kEvent) {
      epoll_event ev;
      ::epoll_wait(p.raw_server.epfd, &ev, 1, -1);
    }
    const ssize_t r = ::recv(p.raw_server.fd, buf.data(), want, MSG_DONTWAIT);
    if (r > 0) got += static_cast<size_t>(r);
    else if (r == 0 || (errno != EAGAIN && errno != EINTR)) Die("raw recv failed");
  }
  const uint64_t t1 = MonotonicNanos();
  sender.join();
  return static_cast<double>(n) / (static_cast<double>(t1 - t0) / 1e9);
}

}  // namespace
}  // namespace aggvm::transport

int main(int argc, char** argv) {
  using namespace aggvm;
  using namespace aggvm::transport;
  CLI::App app{"tcp transport ping-pong latency and one-way throughput vs a raw socket baseline"};
  size_t round_trips = 100000, frames = 200000, chunks = 10;
  bool loopback = false;
  std::string json_path;
  app.add_option("--round-trips", round_trips, "ping-pong round trips per implementation and mode (>= 100000)");
  app.add_option("--frames", frames, "frames for the one-way throughput run");
  app.add_option("--chunks", chunks, "raw and aggvm alternate in this many chunks");
  app.add_flag("--loopback", loopback, "use loopback instead of two network namespaces");
  app.add_option("--json", json_path, "write the results as JSON to this file");
  CLI11_PARSE(app, argc, argv);
  chunks = std::max<size_t>(1, chunks);

  Placement place;
  std::string setting = "netns (two namespaces, veth + bridge)";
  if (!loopback) {
    const std::string why = aggvm::testing::NetnsUnavailableReason();
    if (why.empty()) {
      auto topo = aggvm::testing::NetnsTopology::Create(2, "bench");
      if (topo.ok()) {
        place.topo.emplace(std::move(*topo));
      } else {
        std::printf("NOTE: cannot make namespaces (%s); measuring on loopback instead\n",
                    std::string(topo.status().message()).c_str());
      }
    } else {
      std::printf("NOTE: %s; measuring on loopback instead (run as root for the namespace numbers)\n", why.c_str());
    }
  }
  if (!place.topo) setting = "loopback (one namespace)";

  nlohmann::json results = nlohmann::json::array();
  nlohmann::json ratios = nlohmann::json::object();
  std::printf("tcp transport, %s; %zu round trips and %zu one-way frames per row, 64-byte frames\n", setting.c_str(),
              round_trips, frames);
  std::printf("%-6s %-6s %9s %9s %9s %9s %14s\n", "mode", "impl", "p50 us", "p99 us", "p99.9 us", "mean us",
              "one-way fr/s");
  uint16_t port = 7100;
  for (WaitMode mode : {WaitMode::kBusyPoll, WaitMode::kEvent}) {
    const char* mname = mode == WaitMode::kBusyPoll ? "busy" : "epoll";
    Pair p = MakePair(place, mode, port);
    port = static_cast<uint16_t>(port + 10);
    std::vector<double> raw_us, aggvm_us;
    raw_us.reserve(round_trips);
    aggvm_us.reserve(round_trips);
    // Warm-up, then alternate.
    { std::vector<double> w; RawPingPong(p, 1000, w); AggvmPingPong(p, 1000, w); }
    for (size_t c = 0; c < chunks; ++c) {
      const size_t n = round_trips / chunks + (c < round_trips % chunks ? 1 : 0);
      RawPingPong(p, n, raw_us);
      AggvmPingPong(p, n, aggvm_us);
    }
    const double raw_tput = RawThroughput(p, frames);
    const double aggvm_tput = AggvmThroughput(p, frames);
    const Summary rs = Summarize(raw_us), as = Summarize(aggvm_us);
    for (auto [name, s, tput] : {std::tuple{"raw", rs, raw_tput}, std::tuple{"aggvm", as, aggvm_tput}}) {
      std::printf("%-6s %-6s %9.2f %9.2f %9.2f %9.2f %14.0f\n", mname, name, s.p50, s.p99, s.p999, s.mean, tput);
      results.push_back({{"mode", mname}, {"impl", name}, {"round_trips", s.count},
                         {"rtt_us", {{"p50", s.p50}, {"p99", s.p99}, {"p999", s.p999}, {"mean", s.mean},
                                     {"min", s.min}, {"max", s.max}}},
                         {"one_way_frames_per_s", tput}});
    }
    const double ratio = as.p50 / rs.p50;
    ratios[mname] = ratio;
    std::printf("%-6s aggvm/raw p50 = %.3f (goal <= 1.1) %s\n", mname, ratio, ratio <= 1.1 ? "MET" : "NOT MET");
  }
  if (!json_path.empty()) {
    nlohmann::json j = {{"bench", "transport_tcp"}, {"setting", setting}, {"frame_bytes", kFrameSize},
                        {"results", results}, {"p50_ratio_aggvm_over_raw", ratios}, {"goal_ratio", 1.1}};
    std::ofstream(json_path) << j.dump(2) << "\n";
  }
  return 0;
}
