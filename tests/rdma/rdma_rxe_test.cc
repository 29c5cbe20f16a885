// RdmaTransport on a real verbs device: runs inside the rdma_rxe VM (rxe_vm.sh), where rxe0 sits on eth0.
// Both endpoints live in this process (rxe loops back locally), or in a child process for the peer-loss test.
//
//   rdma_rxe_test                 the GoogleTest suite
//   rdma_rxe_test --peer ADDR     (internal) node 2 for PeerKilledMidStream: connects to node 1 at ADDR, echoes
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "common/clock.h"
#include "tests/rdma/raw_rc.h"
#include "tests/support/alloc_counter.h"
#include "transport/rdma/rdma_transport.h"
#include "transport/rdma/tcp_bootstrap.h"

extern char** environ;


namespace aggvm::transport::rdma {
namespace {

using Clock = std::chrono::steady_clock;

// Fast loss detection for the tests: 4.096 us * 2^12 = 16.8 ms per try, 3 retries.
RcTiming FastTiming() {
  RcTiming t;
  t.timeout = 12;
  t.retry_cnt = 3;
  return t;
}

absl::StatusOr<std::unique_ptr<RdmaTransport>> Make(uint16_t node, WaitMode mode, std::string* address,
                                                    RcTiming timing = RcTiming{}) {
  auto boot = TcpBootstrap::Listen(NodeId(node), "127.0.0.1:0");
  if (!boot.ok()) return boot.status();
  *address = (*boot)->address();
  RdmaOptions opt;
  opt.self = NodeId(node);
  opt.wait_mode = mode;
  opt.timing = timing;
  return RdmaTransport::Create(opt, std::move(*boot));
}

struct Pair {
  std::unique_ptr<RdmaTransport> a, b;  // node 1, node 2
};

// Two transports on rxe0, connected to each other (both Connect calls block, so one runs on a thread).
Pair Connected(WaitMode mode, RcTiming timing = RcTiming{}) {
  std::string addr_a, addr_b;
  auto a = Make(1, mode, &addr_a, timing);
  auto b = Make(2, mode, &addr_b, timing);
  EXPECT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(b.ok()) << b.status();
  if (!a.ok() || !b.ok()) return {};
  absl::Status sb;
  std::thread t([&] {
    const PeerEndpoint peer{NodeId(1), addr_a};
    sb = (*b)->Connect({&peer, 1}, absl::Seconds(20));
  });
  const PeerEndpoint peer{NodeId(2), addr_b};
  const absl::Status sa = (*a)->Connect({&peer, 1}, absl::Seconds(20));
  t.join();
  EXPECT_TRUE(sa.ok()) << sa;
  EXPECT_TRUE(sb.ok()) << sb;
  if (!sa.ok() || !sb.ok()) return {};
  return {std::move(*a), std::move(*b)};
}

Frame Ping(uint64_t i) {
  Frame f;
  f.type = FrameType::kControl;
  f.payload = ControlPayload{ControlPayload::Op::kPing, i, ~i};
  return f;
}

// Checks a received frame is ping number `i` (sequence i + 1) from `from`.
void ExpectPing(const ReceivedFrame& r, NodeId from, uint64_t i) {
  ASSERT_EQ(r.from, from);
  ASSERT_EQ(r.frame.source, from);
  ASSERT_EQ(r.frame.sequence, i + 1) << "frame " << i << " out of order or lost";
  const auto* p = std::get_if<ControlPayload>(&r.frame.payload);
  ASSERT_NE(p, nullptr);
  ASSERT_EQ(p->op, ControlPayload::Op::kPing);
  ASSERT_EQ(p->arg0, i);
  ASSERT_EQ(p->arg1, ~i);
}

// "0: rxe0: pd 1 cq 1 qp 1 cm_id 0 mr 0 ctx 0 srq 0" -> {pd:1, cq:1, ...} for rxe0.
std::map<std::string, long> ResourceCounts() {
  std::map<std::string, long> out;
  FILE* f = popen("rdma resource show 2>&1", "r");
  if (f == nullptr) return out;
  char line[512];
  while (fgets(line, sizeof(line), f) != nullptr) {
    std::string s(line);
    if (s.find("rxe0:") == std::string::npos) continue;
    char name[32];
    long value = 0;
    const char* p = line + s.find("rxe0:") + 5;
    int used = 0;
    while (std::sscanf(p, "%31s %ld%n", name, &value, &used) == 2) {
      out[name] = value;
      p += used;
    }
  }
  pclose(f);
  return out;
}

std::string Show(const std::map<std::string, long>& m) {
  std::string s;
  for (const auto& [k, v] : m) s += k + "=" + std::to_string(v) + " ";
  return s;
}

TEST(RdmaRxe, DeviceAndInlineSends) {
  Pair p = Connected(WaitMode::kBusyPoll);
  ASSERT_TRUE(p.a && p.b);
  EXPECT_EQ(p.a->port_info().device_name, "rxe0");
  EXPECT_TRUE(p.a->port_info().ethernet);
  EXPECT_GE(p.a->port_info().gid_index, 0);
  EXPECT_GE(p.a->port_info().max_inline_data, kFrameSize);
  EXPECT_TRUE(p.a->inline_sends());
  std::printf("device %s port %d gid index %d max_inline_data %u\n", p.a->port_info().device_name.c_str(),
              p.a->port_info().port, p.a->port_info().gid_index, p.a->port_info().max_inline_data);
}

// 10k frames each way at once, sent as fast as the send queues allow: all arrive, in order, none lost or duplicated.
TEST(RdmaRxe, TwoEndpointsExchange10kFramesInOrder) {
  constexpr uint64_t kFrames = 10'000;
  Pair p = Connected(WaitMode::kBusyPoll);
  ASSERT_TRUE(p.a && p.b);
  uint64_t sent_a = 0, sent_b = 0, got_a = 0, got_b = 0, full = 0;
  std::vector<ReceivedFrame> buf(64);
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  while ((got_a < kFrames || got_b < kFrames) && Clock::now() < deadline) {
    for (int burst = 0; burst < 64 && sent_a < kFrames; ++burst) {
      Frame f = Ping(sent_a);
      const absl::Status s = p.a->Send(NodeId(2), f);
      if (s.code() == absl::StatusCode::kResourceExhausted) { ++full; break; }
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_EQ(f.sequence, sent_a + 1);
      ++sent_a;
    }
    for (int burst = 0; burst < 64 && sent_b < kFrames; ++burst) {
      Frame f = Ping(sent_b);
      const absl::Status s = p.b->Send(NodeId(1), f);
      if (s.code() == absl::StatusCode::kResourceExhausted) { ++full; break; }
      ASSERT_TRUE(s.ok()) << s;
      ++sent_b;
    }
    auto nb = p.b->Poll(buf);
    ASSERT_TRUE(nb.ok()) << nb.status();
    for (size_t i = 0; i < *nb; ++i) ASSERT_NO_FATAL_FAILURE(ExpectPing(buf[i], NodeId(1), got_b++));
    auto na = p.a->Poll(buf);
    ASSERT_TRUE(na.ok()) << na.status();
    for (size_t i = 0; i < *na; ++i) ASSERT_NO_FATAL_FAILURE(ExpectPing(buf[i], NodeId(2), got_a++));
  }
  EXPECT_EQ(got_a, kFrames);
  EXPECT_EQ(got_b, kFrames);
  // Nothing more arrives: no duplicates.
  auto extra = p.b->Wait(buf, absl::Milliseconds(200));
  ASSERT_TRUE(extra.ok());
  EXPECT_EQ(*extra, 0u);
  for (auto* t : {p.a.get(), p.b.get()}) {
    const TransportStats s = t->stats();
    EXPECT_EQ(s.frames_sent, kFrames);
    EXPECT_EQ(s.frames_received, kFrames);
    EXPECT_EQ(s.bad_frames, 0u);
    EXPECT_EQ(s.peers_lost, 0u);
  }
  std::printf("10k frames each way; send queue full %lu times\n", static_cast<unsigned long>(full));
}

// Event mode: Wait sleeps on the completion channel and wakes for a frame sent later; an idle Wait times out.
TEST(RdmaRxe, EventModeWaitWakesAndTimesOut) {
  Pair p = Connected(WaitMode::kEvent);
  ASSERT_TRUE(p.a && p.b);
  std::vector<ReceivedFrame> buf(8);
  const auto t0 = Clock::now();
  auto none = p.b->Wait(buf, absl::Milliseconds(300));
  const auto idle = Clock::now() - t0;
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(*none, 0u);
  EXPECT_GE(idle, std::chrono::milliseconds(290));
  for (uint64_t i = 0; i < 50; ++i) {
    std::thread sender([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      Frame f = Ping(i);
      ASSERT_TRUE(p.a->Send(NodeId(2), f).ok());
    });
    auto n = p.b->Wait(buf, absl::Seconds(10));
    sender.join();
    ASSERT_TRUE(n.ok()) << n.status();
    ASSERT_EQ(*n, 1u) << "frame " << i;
    ASSERT_NO_FATAL_FAILURE(ExpectPing(buf[0], NodeId(1), i));
  }
  // Wake from another thread ends a sleeping Wait (the master's operator commands rely on it); once consumed, the
  // next Wait sleeps to its timeout again.
  std::thread waker([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    p.b->Wake();
  });
  const auto w0 = Clock::now();
  auto woken = p.b->Wait(buf, absl::Seconds(10));
  waker.join();
  ASSERT_TRUE(woken.ok()) << woken.status();
  EXPECT_EQ(*woken, 0u);
  EXPECT_LT(Clock::now() - w0, std::chrono::seconds(5)) << "Wait ran to its timeout despite the Wake";
  const auto s0 = Clock::now();
  auto slept = p.b->Wait(buf, absl::Milliseconds(200));
  ASSERT_TRUE(slept.ok()) << slept.status();
  EXPECT_GE(Clock::now() - s0, std::chrono::milliseconds(150)) << "a consumed Wake still ended the next Wait";
  // Untimed (absl::InfiniteDuration(), the controllers' idle wait: ppoll without a timeout): a frame ends it, then
  // a Wake does.
  std::thread late_sender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    Frame f = Ping(50);
    if (const absl::Status sent = p.a->Send(NodeId(2), f); !sent.ok()) {
      ADD_FAILURE() << sent;
      p.b->Wake();  // fail, not hang
    }
  });
  auto untimed = p.b->Wait(buf, absl::InfiniteDuration());
  late_sender.join();
  ASSERT_TRUE(untimed.ok()) << untimed.status();
  ASSERT_EQ(*untimed, 1u);
  ASSERT_NO_FATAL_FAILURE(ExpectPing(buf[0], NodeId(1), 50));
  std::thread untimed_waker([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    p.b->Wake();
  });
  untimed = p.b->Wait(buf, absl::InfiniteDuration());
  untimed_waker.join();
  ASSERT_TRUE(untimed.ok()) << untimed.status();
  EXPECT_EQ(*untimed, 0u);
}

// Node 1 as an RdmaTransport, node 2 as a raw RC endpoint that can send any bytes.
struct RawPair {
  std::unique_ptr<RdmaTransport> a;
  std::unique_ptr<testing::RawRcEndpoint> raw;
};
RawPair ConnectedToRaw() {
  std::string addr_a;
  auto a = Make(1, WaitMode::kBusyPoll, &addr_a);
  EXPECT_TRUE(a.ok()) << a.status();
  auto raw = testing::RawRcEndpoint::Create(DeviceSelection{});
  EXPECT_TRUE(raw.ok()) << raw.status();
  auto raw_boot = TcpBootstrap::Listen(NodeId(2), "127.0.0.1:0");
  EXPECT_TRUE(raw_boot.ok());
  if (!a.ok() || !raw.ok() || !raw_boot.ok()) return {};
  absl::Status raw_status;
  std::thread t([&] {
    const PeerEndpoint peer{NodeId(1), addr_a};
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    auto remote = (*raw_boot)->Exchange(peer, (*raw)->LocalInfo(NodeId(2)), deadline);
    raw_status = remote.status();
    if (remote.ok()) raw_status = (*raw)->Connect(*remote);
    if (raw_status.ok()) raw_status = (*raw_boot)->Ready(peer, deadline);
  });
  const PeerEndpoint peer{NodeId(2), (*raw_boot)->address()};
  const absl::Status sa = (*a)->Connect({&peer, 1}, absl::Seconds(20));
  t.join();
  EXPECT_TRUE(sa.ok()) << sa;
  EXPECT_TRUE(raw_status.ok()) << raw_status;
  if (!sa.ok() || !raw_status.ok()) return {};
  return {std::move(*a), std::move(*raw)};
}

// Waits (busy) until `want` frames arrived or 10 s passed; counts this thread's allocations meanwhile.
std::vector<ReceivedFrame> Collect(RdmaTransport& t, size_t want, uint64_t* allocations) {
  std::vector<ReceivedFrame> got;
  std::vector<ReceivedFrame> buf(8);
  got.reserve(want + 8);
  uint64_t counted = 0;
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (got.size() < want && Clock::now() < deadline) {
    const uint64_t before = ::aggvm::testing::ThreadAllocations();
    auto n = t.Wait(buf, absl::Milliseconds(100));
    counted += ::aggvm::testing::ThreadAllocations() - before;
    EXPECT_TRUE(n.ok()) << n.status();
    if (!n.ok()) break;
    got.insert(got.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(*n));
  }
  *allocations = counted;
  return got;
}

// A peer that sends bytes that are not a valid frame: each is counted and dropped without an allocation, the reason
// of the last one is kept, the connection keeps working. Sequence gaps and reorders are counted, the frames
// delivered.
TEST(RdmaRxe, GarbageFromPeerIsCountedAndDropped) {
  RawPair p = ConnectedToRaw();
  ASSERT_TRUE(p.a && p.raw);
  auto& a = p.a;
  auto& raw = p.raw;

  WireFrame good{};
  Frame ok = Ping(7);
  ok.source = NodeId(2);
  ok.sequence = 1;
  EncodeFrame(ok, good);
  WireFrame garbage;
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<uint8_t>(0xA5 ^ i);
  WireFrame wrong_source = good;  // a valid frame that claims to come from node 9
  Frame forged = ok;
  forged.source = NodeId(9);
  EncodeFrame(forged, wrong_source);
  WireFrame bad_version = good;
  bad_version[0] = kFrameVersion + 1;
  ASSERT_TRUE(raw->Send(garbage.data(), kFrameSize));
  ASSERT_TRUE(raw->Send(good.data(), 10));  // short
  ASSERT_TRUE(raw->Send(wrong_source.data(), kFrameSize));
  ASSERT_TRUE(raw->Send(bad_version.data(), kFrameSize));
  ASSERT_TRUE(raw->Send(good.data(), kFrameSize));

  uint64_t allocations = 0;
  std::vector<ReceivedFrame> got = Collect(*a, 1, &allocations);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(allocations, 0u) << "receiving 4 bad frames allocated";
  EXPECT_EQ(got[0].from, NodeId(2));
  EXPECT_EQ(got[0].frame.sequence, 1u);
  ASSERT_NE(std::get_if<ControlPayload>(&got[0].frame.payload), nullptr);
  EXPECT_EQ(std::get<ControlPayload>(got[0].frame.payload).arg0, 7u);
  EXPECT_EQ(a->stats().bad_frames, 4u);
  EXPECT_EQ(a->stats().frames_received, 1u);
  EXPECT_EQ(a->stats().sequence_errors, 0u);
  const FrameError why = a->last_bad_frame(NodeId(2));
  EXPECT_EQ(why.code, FrameErrorCode::kVersion);
  EXPECT_EQ(why.value, kFrameVersion + 1u);
  EXPECT_NE(DescribeFrameError(why).find("'version' = 2"), std::string::npos) << DescribeFrameError(why);
  EXPECT_TRUE(a->last_bad_frame(NodeId(5)).ok()) << "not a peer";

  // Sequence numbers 2, 5 (gap), 4 (reorder), 5: all four delivered, two counted.
  for (uint32_t seq : {2u, 5u, 4u, 5u}) {
    Frame f = Ping(seq);
    f.source = NodeId(2);
    f.sequence = seq;
    WireFrame w;
    EncodeFrame(f, w);
    ASSERT_TRUE(raw->Send(w.data(), kFrameSize));
  }
  got = Collect(*a, 4, &allocations);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[1].frame.sequence, 5u);
  EXPECT_EQ(a->stats().sequence_errors, 2u);
  EXPECT_EQ(a->stats().bad_frames, 4u);

  // The connection still works in both directions.
  Frame back = Ping(0);
  ASSERT_TRUE(a->Send(NodeId(2), back).ok());
  int received = 0;
  for (int i = 0; i < 100000 && received == 0; ++i) {
    received = raw->PollRecv(4, [&](const uint8_t* d, uint32_t len) {
      auto f = DecodeFrame(d, len);
      EXPECT_TRUE(f.ok()) << f.status();
    });
  }
  EXPECT_EQ(received, 1);
}

// A receiver that stops polling: its receive ring fills, RC flow control (RNR, retried forever) holds the sender's
// frames, and the sender's queue fills. Send then returns RESOURCE_EXHAUSTED without allocating, and everything
// arrives in order once the receiver polls again.
TEST(RdmaRxe, FullSendQueueIsResourceExhaustedWithoutAllocating) {
  Pair p = Connected(WaitMode::kBusyPoll);
  ASSERT_TRUE(p.a && p.b);
  uint64_t sent = 0;
  absl::Status full;
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline && sent < 100000) {
    Frame f = Ping(sent);
    full = p.a->Send(NodeId(2), f);
    if (!full.ok()) break;
    ++sent;
  }
  ASSERT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full << " after " << sent << " frames";
  EXPECT_NE(full.message().find("send queue to node 2 is full"), std::string_view::npos) << full;
  EXPECT_GE(sent, uint64_t{RdmaTransport::kSendDepth});
  const uint64_t before = ::aggvm::testing::ThreadAllocations();
  for (int i = 0; i < 1000; ++i) {
    Frame f = Ping(sent);
    ASSERT_EQ(p.a->Send(NodeId(2), f).code(), absl::StatusCode::kResourceExhausted);
  }
  EXPECT_EQ(::aggvm::testing::ThreadAllocations() - before, 0u) << "a full send queue allocated";
  // The receiver drains; the held frames follow in order.
  std::vector<ReceivedFrame> buf(64);
  uint64_t got = 0;
  const auto drain_deadline = Clock::now() + std::chrono::seconds(30);
  while (got < sent && Clock::now() < drain_deadline) {
    auto n = p.b->Poll(buf);
    ASSERT_TRUE(n.ok()) << n.status();
    for (size_t i = 0; i < *n; ++i) ASSERT_NO_FATAL_FAILURE(ExpectPing(buf[i], NodeId(1), got++));
  }
  EXPECT_EQ(got, sent);
  EXPECT_EQ(p.b->stats().sequence_errors, 0u);
  Frame f = Ping(sent);
  EXPECT_TRUE(p.a->Send(NodeId(2), f).ok()) << "room again after the receiver drained";
}

// The peer closes (its QP is destroyed): the next sends fail with a retry-exceeded completion, and both Send and
// Poll report UNAVAILABLE naming node 2.
TEST(RdmaRxe, ClosedPeerGivesClearError) {
  Pair p = Connected(WaitMode::kBusyPoll, FastTiming());
  ASSERT_TRUE(p.a && p.b);
  Frame f = Ping(0);
  ASSERT_TRUE(p.a->Send(NodeId(2), f).ok());
  std::vector<ReceivedFrame> buf(8);
  auto n = p.b->Wait(buf, absl::Seconds(10));
  ASSERT_TRUE(n.ok() && *n == 1u);
  p.b->Close();
  p.b->Close();  // idempotent

  absl::Status send_status, poll_status;
  const auto t0 = Clock::now();
  for (uint64_t i = 1; Clock::now() - t0 < std::chrono::seconds(60); ++i) {
    if (send_status.ok()) {
      Frame g = Ping(i);
      absl::Status s = p.a->Send(NodeId(2), g);
      if (!s.ok() && s.code() != absl::StatusCode::kResourceExhausted) send_status = s;
    }
    auto r = p.a->Poll(buf);
    if (!r.ok()) poll_status = r.status();
    if (!send_status.ok() && !poll_status.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("peer loss noticed after %.2f s: %s\n", secs, std::string(poll_status.message()).c_str());
  EXPECT_EQ(poll_status.code(), absl::StatusCode::kUnavailable) << poll_status;
  EXPECT_NE(poll_status.message().find("rdma peer node 2 lost"), absl::string_view::npos) << poll_status;
  EXPECT_EQ(send_status.code(), absl::StatusCode::kUnavailable) << send_status;
  EXPECT_NE(send_status.message().find("node 2"), absl::string_view::npos) << send_status;
  // Reported once by Poll; later sends keep failing the same way.
  auto again = p.a->Poll(buf);
  EXPECT_TRUE(again.ok() && *again == 0u);
  Frame g = Ping(1);
  EXPECT_EQ(p.a->Send(NodeId(2), g).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(p.a->stats().peers_lost, 1u);
}

std::string g_self_exe;

// Node 2 in a separate process, killed with SIGKILL mid-stream: node 1 gets UNAVAILABLE naming node 2.
TEST(RdmaRxe, PeerKilledMidStreamGivesClearError) {
  std::string addr_a;
  auto a = Make(1, WaitMode::kBusyPoll, &addr_a, FastTiming());
  ASSERT_TRUE(a.ok()) << a.status();
  // The child learns node 1's bootstrap address; node 1 learns the child's from a pipe.
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&fa, pipefd[0]);
  std::string arg_peer = "--peer", arg_addr = addr_a;
  char* argv[] = {g_self_exe.data(), arg_peer.data(), arg_addr.data(), nullptr};
  pid_t child = -1;
  ASSERT_EQ(posix_spawn(&child, g_self_exe.c_str(), &fa, nullptr, argv, environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  close(pipefd[1]);
  char line[128] = {};
  FILE* from_child = fdopen(pipefd[0], "r");
  ASSERT_NE(fgets(line, sizeof(line), from_child), nullptr) << "the peer process printed no address";
  std::string addr_b(line);
  while (!addr_b.empty() && (addr_b.back() == '\n' || addr_b.back() == '\r')) addr_b.pop_back();
  const PeerEndpoint peer{NodeId(2), addr_b};
  const absl::Status cs = (*a)->Connect({&peer, 1}, absl::Seconds(20));
  ASSERT_TRUE(cs.ok()) << cs;

  // Ping-pong with the echoing child, then kill it in the middle of the stream.
  std::vector<ReceivedFrame> buf(8);
  for (uint64_t i = 0; i < 100; ++i) {
    Frame f = Ping(i);
    ASSERT_TRUE((*a)->Send(NodeId(2), f).ok());
    auto n = (*a)->Wait(buf, absl::Seconds(10));
    ASSERT_TRUE(n.ok() && *n == 1u) << "echo " << i;
  }
  kill(child, SIGKILL);
  int wstatus = 0;
  waitpid(child, &wstatus, 0);
  fclose(from_child);

  absl::Status loss;
  const auto t0 = Clock::now();
  for (uint64_t i = 100; loss.ok() && Clock::now() - t0 < std::chrono::seconds(60); ++i) {
    Frame f = Ping(i);
    absl::Status s = (*a)->Send(NodeId(2), f);
    if (!s.ok() && s.code() != absl::StatusCode::kResourceExhausted) loss = s;
    auto r = (*a)->Wait(buf, absl::Milliseconds(5));
    if (!r.ok()) loss = r.status();
  }
  std::printf("killed peer noticed after %.2f s: %s\n",
              std::chrono::duration<double>(Clock::now() - t0).count(), std::string(loss.message()).c_str());
  EXPECT_EQ(loss.code(), absl::StatusCode::kUnavailable) << loss;
  EXPECT_NE(loss.message().find("node 2"), absl::string_view::npos) << loss;
}

// Every verbs object is released: the device's resource counts return to what they were.
TEST(RdmaRxe, TeardownLeavesNoResources) {
  const auto before = ResourceCounts();
  ASSERT_FALSE(before.empty()) << "`rdma resource show` printed nothing for rxe0";
  {
    Pair p = Connected(WaitMode::kEvent);
    ASSERT_TRUE(p.a && p.b);
    Frame f = Ping(0);
    ASSERT_TRUE(p.a->Send(NodeId(2), f).ok());
    const auto during = ResourceCounts();
    std::printf("before:  %s\nduring:  %s\n", Show(before).c_str(), Show(during).c_str());
    // Two transports: one context, PD, MR and QP each; a receive CQ and a send CQ each.
    EXPECT_EQ(during.at("pd"), before.at("pd") + 2);
    EXPECT_EQ(during.at("mr"), before.at("mr") + 2);
    EXPECT_EQ(during.at("qp"), before.at("qp") + 2);
    EXPECT_EQ(during.at("cq"), before.at("cq") + 4);
    EXPECT_EQ(during.at("ctx"), before.at("ctx") + 2);
    p.a->Close();  // explicit Close, then the destructor (idempotent)
  }
  const auto after = ResourceCounts();
  std::printf("after:   %s\n", Show(after).c_str());
  EXPECT_EQ(after, before);
}

// A failed Connect (peer never answers) releases what it had created.
TEST(RdmaRxe, FailedConnectLeavesNoResources) {
  const auto before = ResourceCounts();
  std::string addr;
  auto a = Make(1, WaitMode::kBusyPoll, &addr);
  ASSERT_TRUE(a.ok()) << a.status();
  const PeerEndpoint peer{NodeId(2), "127.0.0.1:1"};
  const absl::Status s = (*a)->Connect({&peer, 1}, absl::Milliseconds(300));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_NE(s.message().find("node 2"), absl::string_view::npos) << s;
  Frame f = Ping(0);
  EXPECT_EQ((*a)->Send(NodeId(2), f).code(), absl::StatusCode::kFailedPrecondition);
  a->reset();
  EXPECT_EQ(ResourceCounts(), before);
}

// --peer ADDR: node 2, echoes every frame back to node 1 until killed.
int PeerMain(const char* node1_address) {
  std::string addr;
  auto t = Make(2, WaitMode::kBusyPoll, &addr, FastTiming());
  if (!t.ok()) {
    std::fprintf(stderr, "peer: %s\n", std::string(t.status().message()).c_str());
    return 1;
  }
  std::printf("%s\n", addr.c_str());
  std::fflush(stdout);
  const PeerEndpoint peer{NodeId(1), node1_address};
  if (auto s = (*t)->Connect({&peer, 1}, absl::Seconds(20)); !s.ok()) {
    std::fprintf(stderr, "peer: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::vector<ReceivedFrame> buf(8);
  for (;;) {
    auto n = (*t)->Wait(buf, absl::Seconds(1));
    if (!n.ok()) return 1;
    for (size_t i = 0; i < *n; ++i) {
      Frame f = buf[i].frame;
      if (!(*t)->Send(NodeId(1), f).ok()) return 1;
    }
  }
}

}  // namespace
}  // namespace aggvm::transport::rdma

int main(int argc, char** argv) {
  char exe[4096] = {};
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  aggvm::transport::rdma::g_self_exe = n > 0 ? std::string(exe, static_cast<size_t>(n)) : argv[0];
  if (argc == 3 && std::strcmp(argv[1], "--peer") == 0) return aggvm::transport::rdma::PeerMain(argv[2]);
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
