// Hermetic tests of TcpTransport on loopback (port 0): mesh set-up, order, error paths, hostile peers.
#include "transport/tcp_transport.h"
#include "transport/waker.h"

#include <arpa/inet.h>
#include <poll.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <map>

#include <future>
#include <chrono>
#include <thread>

namespace aggvm::transport {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<TcpTransport> Make(uint16_t node, WaitMode mode = WaitMode::kEvent) {
  TcpTransportOptions o;
  o.listen_address = "127.0.0.1:0";
  o.wait_mode = mode;
  o.connect_timeout = absl::Milliseconds(500);
  auto t = TcpTransport::Create(NodeId(node), o);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

std::string Loopback(uint16_t port) { return "127.0.0.1:" + std::to_string(port); }

// Connects every transport with every other one, each Connect in its own thread (Connect blocks).
void ConnectMesh(const std::vector<TcpTransport*>& ts) {
  std::vector<std::future<absl::Status>> fs;
  for (TcpTransport* t : ts) {
    std::vector<PeerEndpoint> peers;
    for (TcpTransport* o : ts) {
      if (o != t) peers.push_back({o->self(), Loopback(o->listen_port())});
    }
    fs.push_back(std::async(std::launch::async, [t, peers] { return t->Connect(peers, absl::Seconds(10)); }));
  }
  for (auto& f : fs) {
    const absl::Status s = f.get();
    ASSERT_TRUE(s.ok()) << s;
  }
}

Frame Ipi(uint32_t i) {
  Frame f;
  f.type = FrameType::kIpi;
  IpiPayload p;
  p.source_vcpu = VcpuIndex(i);
  p.destination = i * 7;
  p.vector = Vector(0x40 + (i % 0xb0));
  f.payload = p;
  return f;
}

// Receives exactly n frames (or fails after 10 s); returns them.
std::vector<ReceivedFrame> ReceiveN(TcpTransport& t, size_t n) {
  std::vector<ReceivedFrame> got;
  std::array<ReceivedFrame, 64> buf;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (got.size() < n && absl::Now() < deadline) {
    auto r = t.Wait(buf, absl::Milliseconds(100));
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) break;
    got.insert(got.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(*r));
  }
  return got;
}

int RawDial(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0) << std::strerror(errno);
  return fd;
}

void RawSend(int fd, const Frame& f) {
  WireFrame w;
  EncodeFrame(f, w);
  ASSERT_EQ(::send(fd, w.data(), w.size(), MSG_NOSIGNAL), static_cast<ssize_t>(w.size()));
}

Frame HelloFrom(uint16_t from, uint16_t to) {
  Frame f;
  f.type = FrameType::kControl;
  f.source = NodeId(from);
  f.sequence = 1;
  f.payload = ControlPayload{.op = ControlPayload::Op::kHello, .arg0 = 0x5043544d56474741ull, .arg1 = to};
  return f;
}

// A raw peer posing as node `from` that completes the handshake with transport node `to` (which must be
// Connect()ing in another thread). Returns the fd, after reading the reply hello.
int RawPeer(uint16_t from, uint16_t to, uint16_t port) {
  const int fd = RawDial(port);
  RawSend(fd, HelloFrom(from, to));
  WireFrame reply{};
  EXPECT_EQ(::recv(fd, reply.data(), reply.size(), MSG_WAITALL), static_cast<ssize_t>(reply.size()));
  auto d = DecodeFrame(reply.data(), reply.size());
  EXPECT_TRUE(d.ok()) << d.status();
  return fd;
}

// Waits until Wait returns a non-OK status (or n frames / 5 s pass); returns that status.
absl::Status WaitForError(TcpTransport& t, std::vector<ReceivedFrame>* frames = nullptr) {
  std::array<ReceivedFrame, 16> buf;
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    auto r = t.Wait(buf, absl::Milliseconds(50));
    if (!r.ok()) return r.status();
    if (frames) frames->insert(frames->end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(*r));
  }
  return absl::OkStatus();
}

class TcpModes : public ::testing::TestWithParam<WaitMode> {};

TEST_P(TcpModes, TwoNodesExchangeFramesInOrderBothWays) {
  auto a = Make(1, GetParam());
  auto b = Make(2, GetParam());
  ConnectMesh({a.get(), b.get()});
  constexpr uint32_t kN = 20000;
  std::thread sender([&] {
    for (uint32_t i = 0; i < kN; ++i) {
      Frame f = Ipi(i);
      absl::Status s;
      while ((s = a->Send(NodeId(2), f)).code() == absl::StatusCode::kResourceExhausted) std::this_thread::yield();
      ASSERT_TRUE(s.ok()) << s;
    }
  });
  auto got = ReceiveN(*b, kN);
  sender.join();
  ASSERT_EQ(got.size(), kN);
  for (uint32_t i = 0; i < kN; ++i) {
    ASSERT_EQ(got[i].from, NodeId(1));
    ASSERT_EQ(got[i].frame.sequence, i + 2) << "sequence 1 is the hello";
    ASSERT_EQ(std::get<IpiPayload>(got[i].frame.payload).source_vcpu, VcpuIndex(i));
  }
  // And back.
  Frame back = Ipi(5);
  ASSERT_TRUE(b->Send(NodeId(1), back).ok());
  auto reply = ReceiveN(*a, 1);
  ASSERT_EQ(reply.size(), 1u);
  EXPECT_EQ(reply[0].from, NodeId(2));
  EXPECT_EQ(a->stats().frames_sent, kN);
  EXPECT_EQ(b->stats().frames_received, kN);
  EXPECT_EQ(b->stats().sequence_errors, 0u);
  EXPECT_EQ(b->stats().bad_frames, 0u);
}

// Wake (another thread) ends a Wait at once, a Wake before a Wait makes that Wait return at once, and once a Wake is
// consumed the next Wait sleeps again (no readable eventfd left behind to spin on). Frames still arrive after it.
TEST_P(TcpModes, WakeEndsAWaitAndIsConsumedOnce) {
  auto a = Make(1, GetParam());
  auto b = Make(2, GetParam());
  ConnectMesh({a.get(), b.get()});
  std::array<ReceivedFrame, 4> buf;
  std::thread waker([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    b->Wake();
  });
  absl::Time t0 = absl::Now();
  auto r = b->Wait(buf, absl::Seconds(10));
  waker.join();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 0u);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5)) << "Wait ran to its timeout despite the Wake";
  b->Wake();
  b->Wake();  // two Wakes before a Wait: one early return
  t0 = absl::Now();
  r = b->Wait(buf, absl::Seconds(10));
  ASSERT_TRUE(r.ok());
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  t0 = absl::Now();
  r = b->Wait(buf, absl::Milliseconds(200));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 0u);
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(150)) << "a consumed Wake still ended the next Wait";
  Frame f = Ipi(7);
  ASSERT_TRUE(a->Send(NodeId(2), f).ok());
  auto got = ReceiveN(*b, 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(std::get<IpiPayload>(got[0].frame.payload).source_vcpu, VcpuIndex(7));
}

// Kick: wakes a sleep (the eventfd is readable) without asking the waiter to return; a Wake is seen once, also when a
// Kick's write is drained with it.
TEST(Waker, KickWakesASleepButIsNoWakeAndAWakeIsSeenOnce) {
  Waker w;
  ASSERT_GE(w.fd(), 0);
  auto readable = [&] {
    pollfd p{w.fd(), POLLIN, 0};
    return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0;
  };
  EXPECT_FALSE(readable());
  w.Kick();
  EXPECT_TRUE(readable()) << "a Kick must end a sleep on the eventfd";
  EXPECT_FALSE(w.pending());
  EXPECT_FALSE(w.Consume()) << "a Kick is not a Wake";
  EXPECT_FALSE(readable()) << "Consume drains the eventfd";
  w.Kick();
  w.Wake();
  w.Kick();
  EXPECT_TRUE(w.pending());
  EXPECT_TRUE(w.Consume());
  EXPECT_FALSE(w.Consume()) << "one Wake, one true";
  EXPECT_FALSE(readable());
  // Wakes from another thread while this one consumes kicks: every Wake is seen (the flag survives a drained write).
  std::atomic<int> seen{0};
  std::atomic<bool> done{false};
  std::thread waiter([&] {
    while (!done.load()) {
      if (w.pending() && w.Consume()) {
        seen.fetch_add(1);
        continue;
      }
      pollfd p{w.fd(), POLLIN, 0};
      (void)::poll(&p, 1, 1000);
      if (w.Consume()) seen.fetch_add(1);
    }
  });
  int lost = 0;
  for (int i = 1; i <= 500; ++i) {
    w.Kick();
    w.Wake();
    const absl::Time end = absl::Now() + absl::Milliseconds(500);
    while (seen.load() < i && absl::Now() < end) std::this_thread::yield();
    if (seen.load() < i) {
      ++lost;
      seen.store(i);
    }
  }
  done.store(true);
  w.Kick();
  waiter.join();
  EXPECT_EQ(lost, 0) << "Wakes not seen within 500 ms";
}

// absl::InfiniteDuration(): the controllers' idle wait (epoll_wait(-1) in event mode, no timer). Only a frame, a
// Wake or a lost peer ends it.
TEST_P(TcpModes, UntimedWaitEndsOnAFrameAWakeOrALostPeer) {
  auto a = Make(1, GetParam());
  auto b = Make(2, GetParam());
  ConnectMesh({a.get(), b.get()});
  std::array<ReceivedFrame, 4> buf;
  auto wait = [&] { return std::async(std::launch::async, [&] { return b->Wait(buf, absl::InfiniteDuration()); }); };
  auto ended = [](auto& w) { return w.wait_for(std::chrono::seconds(5)) == std::future_status::ready; };

  auto w = wait();
  EXPECT_EQ(w.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout) << "ended with nothing to say";
  Frame f = Ipi(5);
  const absl::Status sent = a->Send(NodeId(2), f);
  if (!sent.ok() || !ended(w)) b->Wake();  // fail, not hang
  ASSERT_TRUE(sent.ok()) << sent;
  auto r = w.get();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(*r, 1u) << "the frame did not end the untimed Wait";
  EXPECT_EQ(std::get<IpiPayload>(buf[0].frame.payload).source_vcpu, VcpuIndex(5));

  w = wait();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  b->Wake();
  ASSERT_TRUE(ended(w)) << "the Wake did not end the untimed Wait";
  r = w.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 0u);

  w = wait();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  a->Close();
  if (!ended(w)) b->Wake();
  r = w.get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << "the lost peer did not end the untimed Wait: "
                                                               << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("node 1"));
}

TEST_P(TcpModes, FourNodeMeshAllToAll) {
  std::vector<std::unique_ptr<TcpTransport>> ts;
  std::vector<TcpTransport*> raw;
  for (uint16_t n : {4, 2, 9, 1}) {  // ids not contiguous and not sorted
    ts.push_back(Make(n, GetParam()));
    raw.push_back(ts.back().get());
  }
  ConnectMesh(raw);
  constexpr uint32_t kPerPair = 500;
  for (TcpTransport* from : raw) {
    for (TcpTransport* to : raw) {
      if (from == to) continue;
      for (uint32_t i = 0; i < kPerPair; ++i) {
        Frame f = Ipi(i);
        ASSERT_TRUE(from->Send(to->self(), f).ok());
      }
    }
  }
  for (TcpTransport* t : raw) {
    auto got = ReceiveN(*t, 3 * kPerPair);
    ASSERT_EQ(got.size(), 3 * kPerPair);
    std::map<uint16_t, uint32_t> next;
    for (const auto& r : got) {
      const uint32_t i = next[r.from.value()]++;
      ASSERT_EQ(std::get<IpiPayload>(r.frame.payload).source_vcpu, VcpuIndex(i)) << "from " << r.from.value();
    }
    EXPECT_EQ(next.size(), 3u);
    EXPECT_EQ(t->stats().sequence_errors, 0u);
  }
}

TEST_P(TcpModes, PeerClosedGivesUnavailableNamingTheNodeAfterItsFrames) {
  auto a = Make(1, GetParam());
  auto b = Make(2, GetParam());
  ConnectMesh({a.get(), b.get()});
  for (uint32_t i = 0; i < 10; ++i) {
    Frame f = Ipi(i);
    ASSERT_TRUE(a->Send(NodeId(2), f).ok());
  }
  a->Close();
  std::vector<ReceivedFrame> frames;
  const absl::Status s = WaitForError(*b, &frames);
  EXPECT_EQ(frames.size(), 10u) << "frames sent before the loss come first";
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("node 1"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("closed the connection"));
  EXPECT_EQ(b->stats().peers_lost, 1u);
  // Reported once; afterwards Wait is quiet, and Send names the loss.
  auto again = b->Wait(std::span<ReceivedFrame>(frames.data(), 1), absl::Milliseconds(10));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0u);
  Frame f = Ipi(1);
  const absl::Status send = b->Send(NodeId(1), f);
  EXPECT_EQ(send.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(send.message()), HasSubstr("node 1"));
}

INSTANTIATE_TEST_SUITE_P(Modes, TcpModes, ::testing::Values(WaitMode::kBusyPoll, WaitMode::kEvent),
                         [](const auto& param_info) { return param_info.param == WaitMode::kBusyPoll ? "busy" : "epoll"; });

TEST(TcpTransport, SendErrors) {
  auto a = Make(1);
  auto b = Make(2);
  ConnectMesh({a.get(), b.get()});
  Frame f = Ipi(1);
  EXPECT_EQ(a->Send(NodeId(3), f).code(), absl::StatusCode::kNotFound);
  Frame bad = Ipi(1);
  std::get<IpiPayload>(bad.payload).shorthand = 9;
  const absl::Status s = a->Send(NodeId(2), bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("shorthand"));
  // The refused frame consumed no sequence number: the next one arrives without a sequence error.
  ASSERT_TRUE(a->Send(NodeId(2), f).ok());
  auto got = ReceiveN(*b, 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].frame.sequence, 2u);
  EXPECT_EQ(b->stats().sequence_errors, 0u);
  EXPECT_EQ(a->stats().send_errors, 1u);
}

TEST(TcpTransport, FullSocketIsResourceExhaustedThenEverythingArrives) {
  auto a = Make(1, WaitMode::kBusyPoll);
  auto b = Make(2, WaitMode::kBusyPoll);
  ConnectMesh({a.get(), b.get()});
  uint32_t sent = 0;
  absl::Status s;
  while ((s = [&] { Frame f = Ipi(sent); return a->Send(NodeId(2), f); }()).ok()) {
    ++sent;
    ASSERT_LT(sent, 50'000'000u) << "socket never filled up";
  }
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_GT(sent, 100u);
  auto got = ReceiveN(*b, sent);
  ASSERT_EQ(got.size(), sent);
  for (uint32_t i = 0; i < sent; ++i) ASSERT_EQ(std::get<IpiPayload>(got[i].frame.payload).source_vcpu, VcpuIndex(i));
  EXPECT_EQ(b->stats().sequence_errors, 0u);
  Frame f = Ipi(sent);
  EXPECT_TRUE(a->Send(NodeId(2), f).ok()) << "room again after the receiver drained";
}

TEST(TcpTransport, GarbageAfterHandshakeIsCountedAndClosesTheConnection) {
  auto t = Make(2);
  const uint16_t port = t->listen_port();
  auto connected = std::async(std::launch::async, [&] {
    PeerEndpoint p{NodeId(1), "127.0.0.1:1"};  // node 1 dials us; its address is never used
    return t->Connect(std::span(&p, 1), absl::Seconds(5));
  });
  const int fd = RawPeer(1, 2, port);
  ASSERT_TRUE(connected.get().ok());
  Frame good = Ipi(3);
  good.source = NodeId(1);
  good.sequence = 2;
  RawSend(fd, good);
  uint8_t junk[100];
  for (size_t i = 0; i < sizeof(junk); ++i) junk[i] = static_cast<uint8_t>(0xa5 ^ i);
  ASSERT_EQ(::send(fd, junk, sizeof(junk), MSG_NOSIGNAL), static_cast<ssize_t>(sizeof(junk)));
  std::vector<ReceivedFrame> frames;
  const absl::Status s = WaitForError(*t, &frames);
  EXPECT_EQ(frames.size(), 1u) << "the valid frame before the garbage is delivered";
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("node 1"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("invalid frame"));
  EXPECT_EQ(t->stats().bad_frames, 1u);
  // The reason is kept as values: the junk's first byte is not version 1.
  const FrameError why = t->last_bad_frame(NodeId(1));
  EXPECT_EQ(why.code, FrameErrorCode::kVersion);
  EXPECT_EQ(why.value, 0xa5u);
  EXPECT_THAT(std::string(s.message()), HasSubstr(DescribeFrameError(why)));
  EXPECT_TRUE(t->last_bad_frame(NodeId(7)).ok()) << "not a peer";
  // The transport closed its side: the raw peer reads EOF.
  uint8_t b;
  EXPECT_EQ(::recv(fd, &b, 1, 0), 0);
  ::close(fd);
}

TEST(TcpTransport, SpoofedSourceAndSequenceGapAreCounted) {
  auto t = Make(2);
  auto connected = std::async(std::launch::async, [&] {
    PeerEndpoint p{NodeId(1), "127.0.0.1:1"};
    return t->Connect(std::span(&p, 1), absl::Seconds(5));
  });
  const int fd = RawPeer(1, 2, t->listen_port());
  ASSERT_TRUE(connected.get().ok());
  Frame f = Ipi(1);
  f.source = NodeId(1);
  f.sequence = 2;
  RawSend(fd, f);
  f.sequence = 5;  // gap: 3 and 4 missing
  RawSend(fd, f);
  f.sequence = 6;
  RawSend(fd, f);
  f.source = NodeId(3);  // spoofed sender
  f.sequence = 7;
  RawSend(fd, f);
  std::vector<ReceivedFrame> frames;
  const absl::Status s = WaitForError(*t, &frames);
  EXPECT_EQ(frames.size(), 3u);
  EXPECT_EQ(t->stats().sequence_errors, 1u);
  EXPECT_EQ(t->stats().bad_frames, 1u);
  EXPECT_THAT(std::string(s.message()), HasSubstr("claiming to come from node 3"));
  const FrameError why = t->last_bad_frame(NodeId(1));
  EXPECT_EQ(why.code, FrameErrorCode::kWrongSource);
  EXPECT_EQ(why.field, FrameField::kSource);
  EXPECT_EQ(why.value, 3u);
  ::close(fd);
}

TEST(TcpTransport, StrayConnectionsDuringConnectAreCountedAndIgnored) {
  auto a = Make(1);
  auto b = Make(2);
  // Before node 1 dials, two strangers connect to node 2: one sends garbage, one a hello from an unknown node.
  const int junk_fd = RawDial(b->listen_port());
  uint8_t junk[64];
  std::memset(junk, 0x42, sizeof(junk));
  ASSERT_EQ(::send(junk_fd, junk, sizeof(junk), MSG_NOSIGNAL), 64);
  const int stranger = RawDial(b->listen_port());
  RawSend(stranger, HelloFrom(7, 2));
  ConnectMesh({a.get(), b.get()});
  EXPECT_EQ(b->stats().bad_frames, 2u);
  Frame f = Ipi(1);
  ASSERT_TRUE(a->Send(NodeId(2), f).ok());
  EXPECT_EQ(ReceiveN(*b, 1).size(), 1u);
  ::close(junk_fd);
  ::close(stranger);
}

// A client that connects first and never says a word must not hold up the real peer behind it (the hellos are read
// concurrently); once the mesh is complete the listening socket is closed, so later connects are refused.
TEST(TcpTransport, SilentClientDoesNotDelayARealPeerAndLaterConnectsAreRefused) {
  TcpTransportOptions o;
  o.listen_address = "127.0.0.1:0";
  o.connect_timeout = absl::Seconds(8);  // how long the old code waited for the silent client's hello
  auto a = TcpTransport::Create(NodeId(1), o);
  auto b = TcpTransport::Create(NodeId(2), o);
  ASSERT_TRUE(a.ok() && b.ok());
  const uint16_t b_port = (*b)->listen_port();
  const int silent = RawDial(b_port);  // queued first in node 2's backlog
  const int silent2 = RawDial(b_port);
  auto b_connected = std::async(std::launch::async, [&] {
    PeerEndpoint p{NodeId(1), Loopback((*a)->listen_port())};
    return (*b)->Connect(std::span(&p, 1), absl::Seconds(20));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // node 2 is now waiting, the silent ones accepted
  const absl::Time t0 = absl::Now();
  PeerEndpoint p{NodeId(2), Loopback(b_port)};
  const absl::Status sa = (*a)->Connect(std::span(&p, 1), absl::Seconds(20));
  const absl::Status sb = b_connected.get();
  const absl::Duration took = absl::Now() - t0;
  ASSERT_TRUE(sa.ok()) << sa;
  ASSERT_TRUE(sb.ok()) << sb;
  EXPECT_LT(took, absl::Seconds(2)) << "the real peer waited behind a silent client";
  EXPECT_EQ((*b)->stats().bad_frames, 0u) << "a silent connection is not a bad frame";
  // The silent clients were closed when the mesh was complete: they read EOF.
  uint8_t byte;
  EXPECT_EQ(::recv(silent, &byte, 1, 0), 0);
  EXPECT_EQ(::recv(silent2, &byte, 1, 0), 0);
  ::close(silent);
  ::close(silent2);
  // Nobody listens any more.
  const int late = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(b_port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(late, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), -1);
  EXPECT_EQ(errno, ECONNREFUSED);
  ::close(late);
  // And the mesh works.
  Frame f = Ipi(5);
  ASSERT_TRUE((*a)->Send(NodeId(2), f).ok());
  EXPECT_EQ(ReceiveN(**b, 1).size(), 1u);
}

// A silent client is dropped after its own connect_timeout, while set-up goes on waiting for the real peer.
TEST(TcpTransport, SilentClientIsDroppedAfterConnectTimeout) {
  auto b = Make(2);  // connect_timeout 500 ms
  const int silent = RawDial(b->listen_port());
  auto connected = std::async(std::launch::async, [&] {
    PeerEndpoint p{NodeId(1), "127.0.0.1:1"};
    return b->Connect(std::span(&p, 1), absl::Seconds(10));
  });
  // The transport hangs up on the silent client after ~500 ms, long before Connect's own deadline.
  const absl::Time t0 = absl::Now();
  uint8_t byte;
  EXPECT_EQ(::recv(silent, &byte, 1, 0), 0);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  ::close(silent);
  const int fd = RawPeer(1, 2, b->listen_port());
  ASSERT_TRUE(connected.get().ok());
  ::close(fd);
}

TEST(TcpTransport, ConnectTimesOutNamingTheMissingPeer) {
  auto a = Make(1);
  PeerEndpoint peers[] = {{NodeId(0), "127.0.0.1:9"}};  // node 0 < 1: we wait for it to dial us
  const absl::Status s = a->Connect(peers, absl::Milliseconds(300));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("0 (127.0.0.1:9)"));

  auto c = Make(5);
  PeerEndpoint unreachable[] = {{NodeId(6), "127.0.0.1:1"}};  // port 1: refused
  const absl::Status s2 = c->Connect(unreachable, absl::Milliseconds(300));
  EXPECT_EQ(s2.code(), absl::StatusCode::kDeadlineExceeded) << s2;
  EXPECT_THAT(std::string(s2.message()), HasSubstr("node 6 at 127.0.0.1:1"));
  EXPECT_THAT(std::string(s2.message()), HasSubstr("ECONNREFUSED"));
}

TEST(TcpTransport, BadArguments) {
  TcpTransportOptions o;
  o.listen_address = "no-port-here";
  EXPECT_EQ(TcpTransport::Create(NodeId(1), o).status().code(), absl::StatusCode::kInvalidArgument);
  auto a = Make(1);
  PeerEndpoint self[] = {{NodeId(1), "127.0.0.1:1"}};
  EXPECT_EQ(a->Connect(self, absl::Seconds(1)).code(), absl::StatusCode::kInvalidArgument);
  auto b = Make(1);
  PeerEndpoint twice[] = {{NodeId(2), "127.0.0.1:1"}, {NodeId(2), "127.0.0.1:2"}};
  EXPECT_EQ(b->Connect(twice, absl::Seconds(1)).code(), absl::StatusCode::kInvalidArgument);
  // Same port twice: the second bind fails with a message naming the address.
  auto c = Make(3);
  o.listen_address = Loopback(c->listen_port());
  auto d = TcpTransport::Create(NodeId(4), o);
  EXPECT_FALSE(d.ok());
  EXPECT_THAT(std::string(d.status().message()), HasSubstr(o.listen_address));
  c->Close();
  c->Close();  // idempotent
  std::array<ReceivedFrame, 1> buf;
  EXPECT_EQ(c->Poll(buf).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace aggvm::transport
