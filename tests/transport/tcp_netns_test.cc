// The tcp transport between "hosts": network namespaces joined by veth pairs and a bridge, made and removed here.
// Endpoints are threads that entered their namespace, or (for the killed peer) a child process.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <future>
#include <map>
#include <thread>

#include "tests/support/netns.h"
#include "tests/support/require.h"
#include "transport/tcp_transport.h"

namespace aggvm::transport {
namespace {

using ::aggvm::testing::NetnsTopology;
using ::testing::HasSubstr;

constexpr uint16_t kPort = 7000;
constexpr uint64_t kMillion = 1'000'000;

std::string Addr(const NetnsTopology& topo, int host) { return topo.address(host) + ":" + std::to_string(kPort); }

// Host i runs node id i+1.
NodeId NodeOf(int host) { return NodeId(static_cast<uint16_t>(host + 1)); }

std::vector<PeerEndpoint> PeersOf(const NetnsTopology& topo, int self, int hosts) {
  std::vector<PeerEndpoint> peers;
  for (int h = 0; h < hosts; ++h) {
    if (h != self) peers.push_back({NodeOf(h), Addr(topo, h)});
  }
  return peers;
}

absl::StatusOr<std::unique_ptr<TcpTransport>> MakeNode(const NetnsTopology& topo, int host, WaitMode mode) {
  TcpTransportOptions o;
  o.listen_address = Addr(topo, host);
  o.wait_mode = mode;
  return TcpTransport::Create(NodeOf(host), o);
}

Frame Numbered(uint64_t i) {
  Frame f;
  f.type = FrameType::kIpi;
  IpiPayload p;
  p.source_vcpu = VcpuIndex(static_cast<uint32_t>(i));
  p.destination = static_cast<uint32_t>(i >> 32);
  p.vector = Vector(0x40);
  f.payload = p;
  return f;
}
uint64_t NumberOf(const Frame& f) {
  const auto& p = std::get<IpiPayload>(f.payload);
  return (static_cast<uint64_t>(p.destination) << 32) | p.source_vcpu.value();
}

// Sends, retrying while the socket is full.
absl::Status SendRetry(Transport& t, NodeId to, Frame f) {
  for (;;) {
    absl::Status s = t.Send(to, f);
    if (s.code() != absl::StatusCode::kResourceExhausted) return s;
    std::this_thread::yield();
  }
}

class TcpNetns : public ::testing::TestWithParam<WaitMode> {
 protected:
  void SetUp() override {
    AGGVM_REQUIRE_NETNS();
    auto t = NetnsTopology::Create(4, "tcp");
    ASSERT_TRUE(t.ok()) << t.status();
    topo_ = std::make_unique<NetnsTopology>(std::move(*t));
  }
  std::unique_ptr<NetnsTopology> topo_;  // destroyed (namespaces deleted) even when the test fails
};

TEST_P(TcpNetns, TwoHostsMillionFramesInOrderNoneLost) {
  const NetnsTopology& topo = *topo_;
  std::promise<void> receiver_connected;
  auto sender = std::async(std::launch::async, [&] {
    return topo.RunInNamespace(0, [&]() -> absl::Status {
      auto t = MakeNode(topo, 0, GetParam());
      if (!t.ok()) return t.status();
      if (auto s = (*t)->Connect(PeersOf(topo, 0, 2), absl::Seconds(20)); !s.ok()) return s;
      for (uint64_t i = 0; i < kMillion; ++i) {
        if (auto s = SendRetry(**t, NodeOf(1), Numbered(i)); !s.ok()) return s;
      }
      // Keep the connection until the receiver has everything (closing early would be a loss, reported).
      std::array<ReceivedFrame, 1> buf;
      auto done = (*t)->Wait(buf, absl::Seconds(60));
      return done.ok() ? absl::OkStatus() : done.status();
    });
  });
  uint64_t received = 0, out_of_order = 0;
  TransportStats stats;
  const absl::Status rs = topo.RunInNamespace(1, [&]() -> absl::Status {
    auto t = MakeNode(topo, 1, GetParam());
    if (!t.ok()) return t.status();
    if (auto s = (*t)->Connect(PeersOf(topo, 1, 2), absl::Seconds(20)); !s.ok()) return s;
    std::array<ReceivedFrame, 64> buf;
    const absl::Time deadline = absl::Now() + absl::Seconds(120);
    while (received < kMillion && absl::Now() < deadline) {
      auto r = (*t)->Wait(buf, absl::Milliseconds(100));
      if (!r.ok()) return r.status();
      for (size_t k = 0; k < *r; ++k) {
        if (NumberOf(buf[k].frame) != received || buf[k].from != NodeOf(0)) ++out_of_order;
        ++received;
      }
    }
    stats = (*t)->stats();
    return SendRetry(**t, NodeOf(0), Numbered(0));  // tell the sender it may go
  });
  ASSERT_TRUE(rs.ok()) << rs;
  const absl::Status ss = sender.get();
  ASSERT_TRUE(ss.ok()) << ss;
  EXPECT_EQ(received, kMillion);
  EXPECT_EQ(out_of_order, 0u);
  EXPECT_EQ(stats.frames_received, kMillion);
  EXPECT_EQ(stats.sequence_errors, 0u);
  EXPECT_EQ(stats.bad_frames, 0u);
}

TEST_P(TcpNetns, FourHostsMeshMillionFramesInOrderNoneLost) {
  const NetnsTopology& topo = *topo_;
  constexpr int kHosts = 4;
  constexpr uint64_t kPerPair = kMillion / (kHosts * (kHosts - 1)) + 1;  // 12 ordered pairs: >= 10^6 in total
  std::atomic<int> finished{0};
  struct Result {
    uint64_t received = 0, out_of_order = 0;
    TransportStats stats;
  };
  std::array<Result, kHosts> results;
  std::vector<std::future<absl::Status>> nodes;
  for (int h = 0; h < kHosts; ++h) {
    nodes.push_back(std::async(std::launch::async, [&, h] {
      return topo.RunInNamespace(h, [&, h]() -> absl::Status {
        auto t = MakeNode(topo, h, GetParam());
        if (!t.ok()) return t.status();
        const auto peers = PeersOf(topo, h, kHosts);
        if (auto s = (*t)->Connect(peers, absl::Seconds(20)); !s.ok()) return s;
        std::map<uint16_t, uint64_t> sent, next;
        std::array<ReceivedFrame, 64> buf;
        Result& res = results[static_cast<size_t>(h)];
        const uint64_t expected = kPerPair * (kHosts - 1);
        bool done_counted = false;
        const absl::Time deadline = absl::Now() + absl::Seconds(240);
        // Interleave sending (round-robin over peers) and receiving so no pair of full sockets can deadlock.
        while (absl::Now() < deadline) {
          for (const auto& p : peers) {
            uint64_t& i = sent[p.node.value()];
            for (int burst = 0; burst < 16 && i < kPerPair; ++burst) {
              Frame f = Numbered(i);
              absl::Status s = (*t)->Send(p.node, f);
              if (s.code() == absl::StatusCode::kResourceExhausted) break;
              if (!s.ok()) return s;
              ++i;
            }
          }
          auto r = (*t)->Poll(buf);
          if (!r.ok() && finished.load() == kHosts) break;  // a peer that had everything closed: expected
          if (!r.ok()) return r.status();
          for (size_t k = 0; k < *r; ++k) {
            uint64_t& n = next[buf[k].from.value()];
            if (NumberOf(buf[k].frame) != n) ++res.out_of_order;
            ++n;
            ++res.received;
          }
          bool all_sent = true;
          for (const auto& p : peers) all_sent = all_sent && sent[p.node.value()] == kPerPair;
          if (all_sent && res.received == expected && !done_counted) {
            done_counted = true;
            finished.fetch_add(1);
          }
          if (finished.load() == kHosts) break;  // everyone has everything: safe to close
          if (*r == 0 && all_sent) std::this_thread::yield();
        }
        res.stats = (*t)->stats();
        return absl::OkStatus();
      });
    }));
  }
  for (int h = 0; h < kHosts; ++h) {
    const absl::Status s = nodes[static_cast<size_t>(h)].get();
    EXPECT_TRUE(s.ok()) << "host " << h << ": " << s;
  }
  uint64_t total = 0;
  for (int h = 0; h < kHosts; ++h) {
    const Result& r = results[static_cast<size_t>(h)];
    EXPECT_EQ(r.received, kPerPair * (kHosts - 1)) << "host " << h;
    EXPECT_EQ(r.out_of_order, 0u) << "host " << h;
    EXPECT_EQ(r.stats.sequence_errors, 0u) << "host " << h;
    EXPECT_EQ(r.stats.bad_frames, 0u) << "host " << h;
    total += r.received;
  }
  EXPECT_GE(total, kMillion);
}

TEST_P(TcpNetns, PeerKilledMidStreamGivesClearErrorOnTheOtherSide) {
  const NetnsTopology& topo = *topo_;
  const absl::Status s = topo.RunInNamespace(0, [&]() -> absl::Status {
    auto t = MakeNode(topo, 0, GetParam());
    if (!t.ok()) return t.status();
    // Node 2 is a separate process in host 1's namespace streaming frames to us until it is killed.
    auto pid = topo.SpawnInNamespace(
        1, {AGGVM_TCP_PEER_BIN, "--node", "2", "--listen", Addr(topo, 1), "--peer", "1=" + Addr(topo, 0),
            "--send-to", "1", "--mode", GetParam() == WaitMode::kBusyPoll ? "busy" : "epoll"});
    if (!pid.ok()) return pid.status();
    struct Reaper {  // never leave the child behind, whatever happens below
      pid_t pid;
      ~Reaper() {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    } reaper{*pid};
    if (auto c = (*t)->Connect(PeersOf(topo, 0, 2), absl::Seconds(20)); !c.ok()) return c;
    std::array<ReceivedFrame, 64> buf;
    uint64_t received = 0;
    bool killed = false;
    absl::Status loss;
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (absl::Now() < deadline) {
      auto r = (*t)->Wait(buf, absl::Milliseconds(100));
      if (!r.ok()) {
        loss = r.status();
        break;
      }
      for (size_t k = 0; k < *r; ++k) {
        EXPECT_EQ(NumberOf(buf[k].frame), received) << "frames before the kill arrive in order";
        ++received;
      }
      if (!killed && received >= 50'000) {
        ::kill(*pid, SIGKILL);
        killed = true;
      }
    }
    EXPECT_TRUE(killed) << "only " << received << " frames arrived";
    EXPECT_EQ(loss.code(), absl::StatusCode::kUnavailable) << loss;
    EXPECT_THAT(std::string(loss.message()), HasSubstr("node 2"));
    EXPECT_THAT(std::string(loss.message()), HasSubstr(Addr(topo, 1)));
    EXPECT_EQ((*t)->stats().peers_lost, 1u);
    EXPECT_EQ((*t)->stats().sequence_errors, 0u);
    // Sending to the dead node is refused with the same explanation.
    const absl::Status send = SendRetry(**t, NodeOf(1), Numbered(0));
    EXPECT_EQ(send.code(), absl::StatusCode::kUnavailable) << send;
    EXPECT_THAT(std::string(send.message()), HasSubstr("node 2"));
    return absl::OkStatus();
  });
  ASSERT_TRUE(s.ok()) << s;
}

TEST_P(TcpNetns, GarbageFromARawSocketPeerIsCountedAndOnlyThatConnectionCloses) {
  const NetnsTopology& topo = *topo_;
  // Host 0 runs transport node 2 (peers 1 and 3). Host 1 is a raw socket posing as node 1; host 2 runs node 3.
  const std::string node2_addr = Addr(topo, 0);
  std::promise<void> node3_check_done;
  auto node3 = std::async(std::launch::async, [&] {
    return topo.RunInNamespace(2, [&]() -> absl::Status {
      TcpTransportOptions o;
      o.listen_address = Addr(topo, 2);
      o.wait_mode = GetParam();
      auto t = TcpTransport::Create(NodeId(3), o);
      if (!t.ok()) return t.status();
      std::vector<PeerEndpoint> peers = {{NodeId(2), node2_addr}};
      if (auto s = (*t)->Connect(peers, absl::Seconds(20)); !s.ok()) return s;
      std::array<ReceivedFrame, 4> buf;
      auto r = (*t)->Wait(buf, absl::Seconds(30));  // node 2's "still alive" frame
      if (!r.ok()) return r.status();
      if (*r != 1) return absl::InternalError("node 3 got no frame from node 2 after the garbage");
      if (auto s = SendRetry(**t, NodeId(2), Numbered(77)); !s.ok()) return s;
      node3_check_done.get_future().wait_for(std::chrono::seconds(30));
      return absl::OkStatus();
    });
  });
  std::atomic<ssize_t> raw_eof{-2};
  auto raw = std::async(std::launch::async, [&] {
    return topo.RunInNamespace(1, [&]() -> absl::Status {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(kPort);
      ::inet_pton(AF_INET, topo.address(0).c_str(), &a.sin_addr);
      for (int tries = 0; ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) < 0; ++tries) {
        if (tries > 500) return absl::UnavailableError("raw peer cannot reach node 2");
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      auto send_frame = [fd](const Frame& f) {
        WireFrame w;
        EncodeFrame(f, w);
        return ::send(fd, w.data(), w.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(w.size());
      };
      Frame hello;
      hello.type = FrameType::kControl;
      hello.source = NodeId(1);
      hello.sequence = 1;
      hello.payload = ControlPayload{.op = ControlPayload::Op::kHello, .arg0 = 0x5043544d56474741ull, .arg1 = 2};
      if (!send_frame(hello)) return absl::InternalError("raw hello");
      WireFrame reply;
      if (::recv(fd, reply.data(), reply.size(), MSG_WAITALL) != 64) return absl::InternalError("no hello reply");
      for (uint32_t i = 0; i < 100; ++i) {
        Frame f = Numbered(i);
        f.source = NodeId(1);
        f.sequence = i + 2;
        if (!send_frame(f)) return absl::InternalError("raw frame");
      }
      uint8_t junk[37];
      for (size_t i = 0; i < sizeof(junk); ++i) junk[i] = static_cast<uint8_t>(i * 31 + 7);
      ::send(fd, junk, sizeof(junk), MSG_NOSIGNAL);
      ::send(fd, junk, sizeof(junk), MSG_NOSIGNAL);  // 74 bytes: one whole bad frame and a partial one
      uint8_t b;
      raw_eof = ::recv(fd, &b, 1, 0);  // 0 once node 2 closed the connection
      ::close(fd);
      return absl::OkStatus();
    });
  });
  const absl::Status s = topo.RunInNamespace(0, [&]() -> absl::Status {
    TcpTransportOptions o;
    o.listen_address = node2_addr;
    o.wait_mode = GetParam();
    auto t = TcpTransport::Create(NodeId(2), o);
    if (!t.ok()) return t.status();
    std::vector<PeerEndpoint> peers = {{NodeId(1), "unused:1"}, {NodeId(3), Addr(topo, 2)}};
    if (auto c = (*t)->Connect(peers, absl::Seconds(20)); !c.ok()) return c;
    std::array<ReceivedFrame, 16> buf;
    uint64_t from1 = 0;
    absl::Status loss;
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (loss.ok() && absl::Now() < deadline) {
      auto r = (*t)->Wait(buf, absl::Milliseconds(100));
      if (!r.ok()) loss = r.status();
      for (size_t k = 0; r.ok() && k < *r; ++k) {
        EXPECT_EQ(buf[k].from, NodeId(1));
        EXPECT_EQ(NumberOf(buf[k].frame), from1);
        ++from1;
      }
    }
    EXPECT_EQ(from1, 100u) << "the valid frames before the garbage are delivered";
    EXPECT_EQ(loss.code(), absl::StatusCode::kUnavailable) << loss;
    EXPECT_THAT(std::string(loss.message()), HasSubstr("node 1"));
    EXPECT_THAT(std::string(loss.message()), HasSubstr("invalid frame"));
    EXPECT_EQ((*t)->stats().bad_frames, 1u);
    // The connection to node 3 is untouched.
    if (auto s3 = SendRetry(**t, NodeId(3), Numbered(5)); !s3.ok()) return s3;
    auto r = (*t)->Wait(buf, absl::Seconds(30));
    if (!r.ok()) return r.status();
    EXPECT_EQ(*r, 1u);
    EXPECT_EQ(buf[0].from, NodeId(3));
    EXPECT_EQ(NumberOf(buf[0].frame), 77u);
    node3_check_done.set_value();
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
  const absl::Status rs = raw.get();
  EXPECT_TRUE(rs.ok()) << rs;
  EXPECT_EQ(raw_eof.load(), 0) << "node 2 closed the raw peer's connection";
  const absl::Status n3 = node3.get();
  EXPECT_TRUE(n3.ok()) << n3;
}

INSTANTIATE_TEST_SUITE_P(Modes, TcpNetns, ::testing::Values(WaitMode::kBusyPoll, WaitMode::kEvent),
                         [](const auto& param_info) {
                           return param_info.param == WaitMode::kBusyPoll ? "busy" : "epoll";
                         });

}  // namespace
}  // namespace aggvm::transport
