// RdmaConnInfo wire format and the TCP bootstrap over real loopback sockets (port 0).
#include "transport/rdma/bootstrap.h"

#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "transport/rdma/tcp_bootstrap.h"

namespace aggvm::transport::rdma {
namespace {

RdmaConnInfo Info(uint16_t node, uint32_t qpn) {
  RdmaConnInfo c;
  c.node = NodeId(node);
  c.qpn = qpn;
  c.psn = (qpn * 7919u) & 0xffffff;
  c.lid = static_cast<uint16_t>(node + 100);
  for (size_t i = 0; i < c.gid.size(); ++i) c.gid[i] = static_cast<uint8_t>(node * 16 + i);
  c.mtu = 3;
  c.uses_grh = 1;
  return c;
}

void ExpectSame(const RdmaConnInfo& a, const RdmaConnInfo& b) {
  EXPECT_EQ(a.node, b.node);
  EXPECT_EQ(a.qpn, b.qpn);
  EXPECT_EQ(a.psn, b.psn);
  EXPECT_EQ(a.lid, b.lid);
  EXPECT_EQ(a.gid, b.gid);
  EXPECT_EQ(a.mtu, b.mtu);
  EXPECT_EQ(a.uses_grh, b.uses_grh);
}

TEST(RdmaConnInfo, RoundTrips) {
  const RdmaConnInfo c = Info(7, 0x123456);
  const auto w = c.Encode();
  auto d = RdmaConnInfo::Decode(w.data(), w.size());
  ASSERT_TRUE(d.ok()) << d.status();
  ExpectSame(c, *d);
  EXPECT_EQ(w[0], 'A');
  EXPECT_EQ(w[8], 7);   // node, little-endian
  EXPECT_EQ(w[12], 0x56);  // qpn, little-endian
}

TEST(RdmaConnInfo, RejectsBadBytes) {
  const auto good = Info(2, 0x11).Encode();
  struct Case {
    size_t offset;
    uint8_t value;
    const char* expect;
  };
  const Case cases[] = {
      {0, 'X', "bad magic"},          {4, 2, "version 2"},        {5, 0x80, "unknown flags"},
      {7, 1, "reserved"},             {6, 0, "MTU code 0"},        {6, 6, "MTU code 6"},
      {15, 0x01, "24-bit"},           {19, 0x01, "24-bit"},        {39, 1, "reserved"},
  };
  for (const Case& c : cases) {
    auto w = good;
    w[c.offset] = c.value;
    auto d = RdmaConnInfo::Decode(w.data(), w.size());
    ASSERT_FALSE(d.ok()) << "offset " << c.offset;
    EXPECT_NE(d.status().message().find(c.expect), std::string_view::npos) << d.status();
  }
  auto zero_qpn = Info(2, 0x11);
  zero_qpn.qpn = 0;
  const auto w = zero_qpn.Encode();
  EXPECT_FALSE(RdmaConnInfo::Decode(w.data(), w.size()).ok());
  EXPECT_FALSE(RdmaConnInfo::Decode(good.data(), good.size() - 1).ok());
}

// Three nodes, each exchanging with both others in ascending order from its own thread: everyone gets the data the
// others sent, whatever order the threads start in.
TEST(TcpBootstrap, ThreeNodesExchangeAndAgreeReady) {
  constexpr int kNodes = 3;
  std::vector<std::unique_ptr<TcpBootstrap>> boots;
  std::vector<PeerEndpoint> eps;
  for (int i = 0; i < kNodes; ++i) {
    auto b = TcpBootstrap::Listen(NodeId(static_cast<uint16_t>(i + 1)), "127.0.0.1:0");
    ASSERT_TRUE(b.ok()) << b.status();
    eps.push_back({NodeId(static_cast<uint16_t>(i + 1)), (*b)->address()});
    boots.push_back(std::move(*b));
  }
  std::vector<std::vector<RdmaConnInfo>> got(kNodes);
  std::vector<absl::Status> result(kNodes);
  std::vector<std::thread> threads;
  for (int i = kNodes - 1; i >= 0; --i) {  // start the highest id first: it must wait for the others
    threads.emplace_back([&, i] {
      const absl::Time deadline = absl::Now() + absl::Seconds(10);
      for (int j = 0; j < kNodes; ++j) {
        if (j == i) continue;
        auto r = boots[i]->Exchange(eps[j], Info(static_cast<uint16_t>(i + 1), static_cast<uint32_t>(10 * i + j + 1)),
                                    deadline);
        if (!r.ok()) {
          result[i] = r.status();
          return;
        }
        got[i].push_back(*r);
      }
      for (int j = 0; j < kNodes; ++j) {
        if (j == i) continue;
        if (auto s = boots[i]->Ready(eps[j], deadline); !s.ok()) {
          result[i] = s;
          return;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kNodes; ++i) {
    ASSERT_TRUE(result[i].ok()) << "node " << i + 1 << ": " << result[i];
    ASSERT_EQ(got[i].size(), 2u);
    size_t k = 0;
    for (int j = 0; j < kNodes; ++j) {
      if (j == i) continue;
      ExpectSame(got[i][k++], Info(static_cast<uint16_t>(j + 1), static_cast<uint32_t>(10 * j + i + 1)));
    }
  }
}

TEST(TcpBootstrap, AbsentPeerTimesOutNamingIt) {
  auto a = TcpBootstrap::Listen(NodeId(1), "127.0.0.1:0");
  auto b = TcpBootstrap::Listen(NodeId(2), "127.0.0.1:0");
  ASSERT_TRUE(a.ok() && b.ok());
  const std::string b_addr = (*b)->address();
  b->reset();  // node 2 is gone: its port refuses connections
  auto r = (*a)->Exchange({NodeId(2), b_addr}, Info(1, 5), absl::Now() + absl::Milliseconds(300));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(r.status().message().find("node 2"), std::string_view::npos) << r.status();

  // The accepting side of a pair times out too when the lower node never dials.
  auto c = TcpBootstrap::Listen(NodeId(3), "127.0.0.1:0");
  ASSERT_TRUE(c.ok());
  auto r2 = (*c)->Exchange({NodeId(1), "127.0.0.1:1"}, Info(3, 5), absl::Now() + absl::Milliseconds(200));
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.status().message().find("node 1"), std::string_view::npos) << r2.status();
}

TEST(TcpBootstrap, WrongNodeAtAddressIsRefused) {
  auto n1 = TcpBootstrap::Listen(NodeId(1), "127.0.0.1:0");
  auto n3 = TcpBootstrap::Listen(NodeId(3), "127.0.0.1:0");
  ASSERT_TRUE(n1.ok() && n3.ok());
  // Node 1 believes node 2 lives at node 3's address. Node 3 waits for node 1 and answers as node 3.
  absl::Status s3;
  std::thread t([&] {
    auto r = (*n3)->Exchange({NodeId(1), (*n1)->address()}, Info(3, 9), absl::Now() + absl::Seconds(5));
    s3 = r.status();
  });
  auto r = (*n1)->Exchange({NodeId(2), (*n3)->address()}, Info(1, 9), absl::Now() + absl::Seconds(5));
  t.join();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("answered as node 3, expected node 2"), std::string_view::npos) << r.status();
}

TEST(TcpBootstrap, RejectsBadAddresses) {
  EXPECT_EQ(TcpBootstrap::Listen(NodeId(1), "no-port").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TcpBootstrap::Listen(NodeId(1), "127.0.0.1:99999").status().code(), absl::StatusCode::kInvalidArgument);
  auto a = TcpBootstrap::Listen(NodeId(1), "127.0.0.1:0");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*a)->Exchange({NodeId(1), "127.0.0.1:1"}, Info(1, 1), absl::Now()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace aggvm::transport::rdma
