// LocalController and IoForwarder over real TcpTransports on loopback; the "master" is a raw transport driven by the
// test, so every frame the node sends is checked and every frame it receives is chosen.
#include "node-agent/local_controller.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "common/clock.h"
#include "node-agent/io_forwarder.h"
#include "tests/dataplane/tcp_mesh.h"
#include "tests/support/thread_watch.h"

namespace aggvm::agent {
namespace {

using testing::NextFrame;
using testing::TcpStar;
using transport::ControlPayload;
using transport::DeliverPayload;
using transport::EoiPayload;
using transport::Frame;
using transport::FrameType;
using transport::InterruptPayload;
using transport::IoRequestPayload;

constexpr NodeId kMaster{0}, kNode{1};

struct Injection {
  VcpuIndex vcpu;
  Vector vector;
  irqchip::DeliveryMode mode;
  bool level;
};

class RecordingPort : public VmPort {
 public:
  absl::Status Inject(VcpuIndex vcpu, Vector vector, irqchip::DeliveryMode mode, bool level) override {
    std::lock_guard<std::mutex> l(mu_);
    injections_.push_back({vcpu, vector, mode, level});
    cv_.notify_all();
    return absl::OkStatus();
  }
  bool WaitFor(size_t n, absl::Duration timeout = absl::Seconds(5)) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return injections_.size() >= n; });
  }
  std::vector<Injection> injections() {
    std::lock_guard<std::mutex> l(mu_);
    return injections_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Injection> injections_;
};

struct Fixture {
  TcpStar star;
  RecordingPort port;
  std::unique_ptr<LocalController> lc;
  std::unique_ptr<IoForwarder> io;
  std::jthread thread;
  absl::Status run_status;
  std::mutex trace_mu;
  std::vector<transport::TraceBlock> traces;
  std::atomic<pid_t> tid{0};  // the data-plane thread's

  static std::unique_ptr<Fixture> Make(IoForwarderOptions io_options = {}) {
    auto f = std::make_unique<Fixture>();
    auto star = TcpStar::Make({kMaster, kNode});
    EXPECT_TRUE(star.ok()) << star.status();
    if (!star.ok()) return nullptr;
    f->star = *std::move(star);
    LocalControllerConfig c;
    c.master = kMaster;
    c.num_vcpus = 4;
    c.owned = {VcpuIndex(1), VcpuIndex(3)};
    Fixture* raw = f.get();
    c.on_trace = [raw](const transport::TraceBlock& t) {
      std::lock_guard<std::mutex> l(raw->trace_mu);
      raw->traces.push_back(t);
    };
    auto lc = LocalController::Create(std::move(c), &f->star.node(1), &f->port);
    EXPECT_TRUE(lc.ok()) << lc.status();
    if (!lc.ok()) return nullptr;
    f->lc = *std::move(lc);
    f->io = std::make_unique<IoForwarder>(f->lc.get(), 4, io_options);
    f->thread = std::jthread([raw](std::stop_token st) {
      raw->tid.store(::gettid());
      raw->run_status = raw->lc->Run(st);
    });
    return f;
  }
  transport::TcpTransport& master() { return star.master(); }
  void FromMaster(Frame f) { ASSERT_TRUE(master().Send(kNode, f).ok()); }
};

InterruptPayload ExpectGsi(transport::Transport& t, uint32_t gsi, uint8_t level, Frame* out = nullptr) {
  auto f = NextFrame(t);
  EXPECT_TRUE(f);
  if (!f) return {};
  EXPECT_EQ(f->frame.type, FrameType::kInterrupt);
  const auto p = std::get<InterruptPayload>(f->frame.payload);
  EXPECT_EQ(p.kind, InterruptPayload::Kind::kGsiLevel);
  EXPECT_EQ(p.gsi, Gsi(gsi));
  EXPECT_EQ(p.level, level);
  if (out) *out = f->frame;
  return p;
}

Frame Deliver(uint32_t vcpu, uint8_t vector, bool level = false, uint32_t gsi = 0) {
  Frame f;
  f.type = FrameType::kDeliver;
  DeliverPayload d;
  d.vcpu = VcpuIndex(vcpu);
  d.vector = Vector(vector);
  d.level_triggered = level ? 1 : 0;
  d.gsi = Gsi(level ? gsi : 0);
  f.payload = d;
  return f;
}

TEST(LocalController, EdgeIsOneTracedFrame) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  const uint64_t before = MonotonicNanos();
  ASSERT_TRUE(f->lc->RaiseEdge(Gsi(4), true).ok());
  Frame first;
  ExpectGsi(f->master(), 4, InterruptPayload::kLevelEdge, &first);
  ASSERT_TRUE(first.traced());
  EXPECT_GE(first.trace.raised, before);
  EXPECT_GT(first.trace.local_controller, first.trace.raised);
  EXPECT_FALSE(NextFrame(f->master(), absl::Milliseconds(50))) << "an edge is one frame";
  EXPECT_EQ(f->lc->RaiseEdge(Gsi(4096)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->lc->counters().raised, 1u);
}

// Event mode waits without a timeout: the idle data-plane thread does not wake up (it woke every 5 ms and armed a
// timer around every frame); a frame or the stop request wakes it.
TEST(LocalController, AnIdleDataPlaneSleepsUntilAFrameOrTheStop) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  for (int i = 0; i < 500 && f->tid.load() == 0; ++i) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_NE(f->tid.load(), 0);
  absl::SleepFor(absl::Milliseconds(50));
  const int64_t idle = testing::SleepsDuring(f->tid.load(), absl::Milliseconds(300));
  ASSERT_GE(idle, 0) << "no voluntary_ctxt_switches in /proc for the data-plane thread";
  EXPECT_LE(idle, 3) << "the idle data-plane thread woke up " << idle << " times in 300 ms";
  f->FromMaster(Deliver(3, 0x45));
  ASSERT_TRUE(f->port.WaitFor(1));
  EXPECT_EQ(f->port.injections()[0].vector, Vector(0x45));
  EXPECT_TRUE(testing::StopsWithin(f->thread, absl::Seconds(2), [&] { f->star.node(1).Wake(); }))
      << "the stop request did not wake the data-plane thread";
  EXPECT_TRUE(f->run_status.ok()) << f->run_status;
}

TEST(LocalController, LevelIsHeldAndUnchangedLevelsSendNothing) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  ASSERT_TRUE(f->lc->SetLevel(Gsi(9), true).ok());
  ASSERT_TRUE(f->lc->SetLevel(Gsi(9), true).ok());
  ASSERT_TRUE(f->lc->SetLevel(Gsi(9), false).ok());
  ASSERT_TRUE(f->lc->SetLevel(Gsi(9), false).ok());
  ExpectGsi(f->master(), 9, 1);
  ExpectGsi(f->master(), 9, 0);
  EXPECT_FALSE(NextFrame(f->master(), absl::Milliseconds(50)));
  EXPECT_EQ(f->lc->counters().level_unchanged, 2u);
}

TEST(LocalController, DeliveriesAreInjectedIntoOwnedVcpusOnly) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  Frame traced = Deliver(3, 0x40);
  traced.flags = transport::kFlagTraced;
  traced.trace.trace_id = 5;
  traced.trace.raised = MonotonicNanos() - 5000;
  traced.trace.master_decided = traced.trace.raised + 100;
  f->FromMaster(traced);
  f->FromMaster(Deliver(0, 0x41));  // vCPU 0 is not this node's
  f->FromMaster(Deliver(7, 0x42));  // no vCPU 7
  f->FromMaster(Deliver(1, 0x43));
  ASSERT_TRUE(f->port.WaitFor(2));
  absl::SleepFor(absl::Milliseconds(20));
  const auto inj = f->port.injections();
  ASSERT_EQ(inj.size(), 2u);
  EXPECT_EQ(inj[0].vcpu, VcpuIndex(3));
  EXPECT_EQ(inj[0].vector, Vector(0x40));
  EXPECT_EQ(inj[1].vcpu, VcpuIndex(1));
  const auto c = f->lc->counters();
  EXPECT_EQ(c.dropped_not_owned, 1u);
  EXPECT_EQ(c.dropped_unknown_vcpu, 1u);
  EXPECT_EQ(c.delivered, 2u);
  std::lock_guard<std::mutex> l(f->trace_mu);
  ASSERT_EQ(f->traces.size(), 1u);
  EXPECT_EQ(f->traces[0].trace_id, 5u);
  EXPECT_GT(f->traces[0].target_received, f->traces[0].raised);
  EXPECT_GE(f->traces[0].injected, f->traces[0].target_received);
}

TEST(LocalController, LevelDeliveryEoiGoesBackWithItsGsi) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  f->FromMaster(Deliver(1, 0x70, true, 7));
  ASSERT_TRUE(f->port.WaitFor(1));
  EXPECT_TRUE(f->port.injections()[0].level);
  EXPECT_EQ(f->lc->pending_level(VcpuIndex(1), Vector(0x70)), Gsi(7));
  f->lc->OnGuestEoi(VcpuIndex(1), Vector(0x71));  // not pending: nothing sent
  f->lc->OnGuestEoi(VcpuIndex(1), Vector(0x70));
  auto fr = NextFrame(f->master());
  ASSERT_TRUE(fr);
  ASSERT_EQ(fr->frame.type, FrameType::kEoi);
  const auto e = std::get<EoiPayload>(fr->frame.payload);
  EXPECT_EQ(e.vcpu, VcpuIndex(1));
  EXPECT_EQ(e.vector, Vector(0x70));
  EXPECT_EQ(e.gsi, Gsi(7));
  f->lc->OnGuestEoi(VcpuIndex(1), Vector(0x70));  // already answered
  EXPECT_FALSE(NextFrame(f->master(), absl::Milliseconds(50)));
  EXPECT_EQ(f->lc->counters().eois_sent, 1u);
  EXPECT_EQ(f->lc->counters().eois_unmatched, 2u);
}

TEST(LocalController, RaiseGsiFromTheMasterIsRaisedHere) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  Frame c;
  c.type = FrameType::kControl;
  c.payload = ControlPayload{.op = ControlPayload::Op::kRaiseGsi, .arg0 = 12,
                             .arg1 = ControlPayload::kRaiseAssert | ControlPayload::kRaiseTraced};
  f->FromMaster(c);
  Frame first;
  ExpectGsi(f->master(), 12, InterruptPayload::kLevelEdge, &first);
  EXPECT_TRUE(first.traced());
  c.payload = ControlPayload{.op = ControlPayload::Op::kRaiseGsi, .arg0 = 13,
                             .arg1 = ControlPayload::kRaiseAssert | ControlPayload::kRaiseLevel};
  f->FromMaster(c);
  ExpectGsi(f->master(), 13, 1);
  EXPECT_FALSE(NextFrame(f->master(), absl::Milliseconds(50))) << "a level is held";
  EXPECT_EQ(f->lc->counters().control_raises, 2u);
}

// A train (kRaiseGsi with a count and an interval): the node raises the edges itself, on its own clock, each with
// its own `raised` stamp; a one-edge train replaces (stops) a running one.
TEST(LocalController, RaiseGsiTrainIsRaisedHereOnTheNodesClock) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  constexpr uint32_t kCount = 5, kIntervalUs = 20'000;  // long enough that no edge is skipped on a loaded machine
  Frame c;
  c.type = FrameType::kControl;
  c.payload = ControlPayload{.op = ControlPayload::Op::kRaiseGsi, .arg0 = 9,
                             .arg1 = ControlPayload::kRaiseAssert | ControlPayload::kRaiseTraced |
                                     ControlPayload::TrainBits(kCount, kIntervalUs)};
  const uint64_t t0 = MonotonicNanos();
  f->FromMaster(c);
  std::vector<uint64_t> raised;
  for (uint32_t i = 0; i < kCount; ++i) {
    Frame up;
    ExpectGsi(f->master(), 9, InterruptPayload::kLevelEdge, &up);
    EXPECT_TRUE(up.traced());
    raised.push_back(up.trace.raised);
  }
  EXPECT_FALSE(NextFrame(f->master(), absl::Milliseconds(50))) << "more edges than the train's count";
  for (uint32_t i = 0; i < kCount; ++i) {  // the train starts after t0; edge i is never before start + i intervals
    EXPECT_GE(raised[i] - t0, uint64_t{i} * kIntervalUs * 1000) << "edge " << i << " came early";
  }
  EXPECT_EQ(f->lc->counters().trains, 1u);
  EXPECT_EQ(f->lc->counters().train_raises, kCount);

  // A long train, then a one-edge train: the long one stops.
  c.payload = ControlPayload{.op = ControlPayload::Op::kRaiseGsi, .arg0 = 10,
                             .arg1 = ControlPayload::kRaiseAssert | ControlPayload::TrainBits(10000, 10000)};
  f->FromMaster(c);
  ExpectGsi(f->master(), 10, InterruptPayload::kLevelEdge);
  c.payload = ControlPayload{.op = ControlPayload::Op::kRaiseGsi, .arg0 = 11,
                             .arg1 = ControlPayload::kRaiseAssert | ControlPayload::TrainBits(1, 10)};
  f->FromMaster(c);
  size_t gsi10 = 0, gsi11 = 0;
  while (auto fr = NextFrame(f->master(), absl::Milliseconds(100))) {
    const auto p = std::get<InterruptPayload>(fr->frame.payload);
    (p.gsi == Gsi(10) ? gsi10 : gsi11) += 1;
  }
  EXPECT_EQ(gsi11, 1u) << "the one-edge train: one edge frame";
  EXPECT_LE(gsi10, 1u) << "the long train went on after it was replaced";
  EXPECT_FALSE(f->lc->train_running());
  EXPECT_EQ(f->lc->counters().trains, 3u);
}

// The master's side of forwarded I/O in these tests: answers `count` requests, reads with data = address * 3 + vCPU
// (cut to the access size). With `reverse_pairs`, two requests in flight (necessarily of different vCPUs: a vCPU has
// one at a time) are answered in the opposite order; a lone request is answered after 5 ms without company.
uint64_t Expected(uint64_t address, uint32_t vcpu, uint8_t size) {
  return (address * 3 + vcpu) & ((uint64_t{1} << (8 * size)) - 1);
}

void AnswerRequests(transport::Transport& master, size_t count, bool reverse_pairs) {
  std::vector<transport::ReceivedFrame> pending;
  size_t answered = 0;
  auto answer = [&](const transport::ReceivedFrame& r) {
    IoRequestPayload p = std::get<IoRequestPayload>(r.frame.payload);
    if (!p.is_write) p.data = Expected(p.address, p.vcpu.value(), p.size);
    Frame resp;
    resp.type = FrameType::kIoResponse;
    resp.payload = p;
    ASSERT_TRUE(master.Send(r.from, resp).ok());
    ++answered;
  };
  while (answered < count) {
    auto r = NextFrame(master, pending.empty() ? absl::Seconds(5) : absl::Milliseconds(5));
    if (!r) {
      ASSERT_FALSE(pending.empty()) << "no request after " << answered << " answers";
      answer(pending[0]);
      pending.clear();
      continue;
    }
    ASSERT_EQ(r->frame.type, FrameType::kIoRequest);
    if (!reverse_pairs) {
      answer(*r);
      continue;
    }
    pending.push_back(*r);
    if (pending.size() == 2) {
      answer(pending[1]);
      answer(pending[0]);
      pending.clear();
    }
  }
}

TEST(IoForwarder, ConcurrentVcpusGetTheirOwnAnswers) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  constexpr int kPerVcpu = 200;
  std::jthread master([&] { AnswerRequests(f->master(), 4 * kPerVcpu, true); });
  std::vector<std::jthread> vcpus;
  std::atomic<int> wrong{0};
  for (uint32_t v = 0; v < 4; ++v) {
    vcpus.emplace_back([&, v] {
      for (int i = 0; i < kPerVcpu; ++i) {
        const uint64_t port = 0x100 + v * 0x100 + static_cast<uint64_t>(i);
        auto r = f->io->Forward(VcpuIndex(v), IoAccess{.size = 2, .address = port});
        if (!r.ok() || r->data != Expected(port, v, 2) || r->no_device) wrong.fetch_add(1);
      }
    });
  }
  vcpus.clear();
  master.join();
  EXPECT_EQ(wrong.load(), 0);
  // Counted by the data-plane thread just after it woke the waiter.
  const absl::Time end = absl::Now() + absl::Seconds(5);
  while (f->io->counters().responses < 4u * kPerVcpu && absl::Now() < end) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(f->io->counters().responses, 4u * kPerVcpu);
  EXPECT_EQ(f->io->counters().unexpected, 0u);
}

TEST(IoForwarder, TimeoutThenALateAnswerDoesNotAnswerTheNextRequest) {
  auto f = Fixture::Make(IoForwarderOptions{.timeout = absl::Milliseconds(100), .spin = absl::Microseconds(10)});
  ASSERT_TRUE(f);
  auto r = f->io->Forward(VcpuIndex(2), IoAccess{.size = 1, .address = 0x3F8});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(r.status().message()), ::testing::HasSubstr("port 0x3f8 by vCPU 2"));
  // The master answers late; then the same vCPU's next request (same port!) must get ITS answer.
  std::jthread master([&] { AnswerRequests(f->master(), 2, false); });
  auto again = f->io->Forward(VcpuIndex(2), IoAccess{.size = 1, .address = 0x3F8});
  master.join();
  // The first answer went to the timed-out request and was discarded; the second is this request's.
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->data, Expected(0x3F8, 2, 1));
  EXPECT_EQ(f->io->counters().stale_responses, 1u);
  EXPECT_EQ(f->io->counters().timeouts, 1u);
}

TEST(IoForwarder, MasterLossFailsAccessInFlightAndStopsTheLoop) {
  auto f = Fixture::Make(IoForwarderOptions{.timeout = absl::Seconds(10)});
  ASSERT_TRUE(f);
  absl::StatusOr<IoResult> r;
  std::jthread vcpu([&] { r = f->io->Forward(VcpuIndex(1), IoAccess{.is_write = true, .size = 1,
                                                                      .address = 0x3F8, .data = 'x'}); });
  ASSERT_TRUE(NextFrame(f->master()));
  const absl::Time start = absl::Now();
  f->master().Close();
  vcpu.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), ::testing::HasSubstr("master is lost"));
  f->thread.join();
  EXPECT_EQ(f->run_status.code(), absl::StatusCode::kUnavailable) << f->run_status;
  EXPECT_TRUE(f->lc->master_lost());
  EXPECT_EQ(f->io->Forward(VcpuIndex(1), IoAccess{.size = 1, .address = 0x3F8}).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(LocalController, CreateRefusesBadConfigs) {
  auto star = TcpStar::Make({kMaster, kNode});
  ASSERT_TRUE(star.ok());
  RecordingPort port;
  LocalControllerConfig c;
  c.master = kMaster;
  c.num_vcpus = 2;
  c.owned = {VcpuIndex(2)};
  EXPECT_FALSE(LocalController::Create(c, &star->node(1), &port).ok());
  c.owned = {VcpuIndex(1), VcpuIndex(1)};
  EXPECT_FALSE(LocalController::Create(c, &star->node(1), &port).ok());
  c.owned = {VcpuIndex(1)};
  c.master = kNode;
  EXPECT_FALSE(LocalController::Create(c, &star->node(1), &port).ok());
  c.master = kMaster;
  EXPECT_TRUE(LocalController::Create(c, &star->node(1), &port).ok());
}

// ---------------------------------------------------------------------------------------------------------------
// Guest IPIs to remote vCPUs (ForwardIpi / ForwardIcr) in both route modes. A full TCP mesh: master 0, this node 1,
// node 2 (runs vCPUs 2 and 3), node 3 (connected but runs no vCPU of the VM).

struct Mesh {
  std::vector<std::unique_ptr<transport::TcpTransport>> t;  // t[i] is node i
  static std::unique_ptr<Mesh> Make(uint32_t n) {
    auto m = std::make_unique<Mesh>();
    for (uint32_t i = 0; i < n; ++i) {
      transport::TcpTransportOptions o;
      o.listen_address = "127.0.0.1:0";
      auto t = transport::TcpTransport::Create(NodeId(i), o);
      EXPECT_TRUE(t.ok()) << t.status();
      if (!t.ok()) return nullptr;
      m->t.push_back(*std::move(t));
    }
    std::vector<absl::Status> results(n);
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        std::vector<transport::PeerEndpoint> peers;
        for (uint32_t j = 0; j < n; ++j) {
          if (j != i) peers.push_back({NodeId(j), "127.0.0.1:" + std::to_string(m->t[j]->listen_port())});
        }
        results[i] = m->t[i]->Connect(peers, absl::Seconds(10));
      });
    }
    for (auto& th : threads) th.join();
    for (auto& r : results) {
      EXPECT_TRUE(r.ok()) << r;
      if (!r.ok()) return nullptr;
    }
    return m;
  }
};

std::unique_ptr<LocalController> MakeIpiController(Mesh& mesh, RecordingPort& port, bool direct, bool traced) {
  LocalControllerConfig c;
  c.master = kMaster;
  c.num_vcpus = 4;
  c.owned = {VcpuIndex(0), VcpuIndex(1)};
  c.vcpu_node = {NodeId(1), NodeId(1), NodeId(2), NodeId(2)};
  c.apic_ids = {ApicId(0), ApicId(1), ApicId(2), ApicId(3)};
  c.direct_ipis = direct;
  c.trace_ipis = traced;
  auto lc = LocalController::Create(std::move(c), mesh.t[1].get(), &port);
  EXPECT_TRUE(lc.ok()) << lc.status();
  return lc.ok() ? *std::move(lc) : nullptr;
}

irqchip::InterruptMessage Icr(uint32_t dest, irqchip::DeliveryMode mode = irqchip::DeliveryMode::kFixed) {
  irqchip::InterruptMessage m;
  m.vector = Vector(0x40);
  m.mode = mode;
  m.destination = dest;
  m.x2apic_destination = true;
  return m;
}

TEST(LocalControllerIpi, ViaMasterEveryIpiGoesToTheMaster) {
  auto mesh = Mesh::Make(3);
  ASSERT_TRUE(mesh);
  RecordingPort port;
  auto lc = MakeIpiController(*mesh, port, /*direct=*/false, /*traced=*/true);
  ASSERT_TRUE(lc);
  lc->ForwardIpi(ApicId(2), irqchip::DeliveryMode::kFixed, Vector(0x41));
  auto f = NextFrame(*mesh->t[0]);
  ASSERT_TRUE(f);
  ASSERT_EQ(f->frame.type, FrameType::kIpi);
  auto p = std::get<transport::IpiPayload>(f->frame.payload);
  EXPECT_EQ(p.source_vcpu.value(), transport::kIpiSourceProxyResolved);
  EXPECT_EQ(p.destination, 2u);
  EXPECT_EQ(p.vector, Vector(0x41));
  EXPECT_EQ(p.dest_logical, 0);
  EXPECT_EQ(p.shorthand, 0);
  EXPECT_TRUE(f->frame.traced());
  EXPECT_NE(f->frame.trace.raised, 0u);
  EXPECT_GT(f->frame.trace.local_controller, f->frame.trace.raised);
  // A user-irqchip ICR keeps its sender and every field.
  irqchip::InterruptMessage m = Icr(0x00010006);
  m.dest_mode = irqchip::DestMode::kLogical;
  m.trigger = irqchip::TriggerMode::kLevel;
  lc->ForwardIcr(VcpuIndex(1), m);
  f = NextFrame(*mesh->t[0]);
  ASSERT_TRUE(f);
  p = std::get<transport::IpiPayload>(f->frame.payload);
  EXPECT_EQ(p.source_vcpu, VcpuIndex(1));
  EXPECT_EQ(p.destination, 0x00010006u);
  EXPECT_EQ(p.dest_logical, 1);
  EXPECT_EQ(p.trigger_level, 1);
  // Physical to a remote vCPU: still via the master in this mode.
  lc->ForwardIcr(VcpuIndex(0), Icr(3));
  f = NextFrame(*mesh->t[0]);
  ASSERT_TRUE(f);
  EXPECT_EQ(f->frame.type, FrameType::kIpi);
  EXPECT_EQ(lc->counters().ipis_via_master, 3u);
  EXPECT_EQ(lc->counters().ipis_direct, 0u);
}

TEST(LocalControllerIpi, DirectPhysicalGoesToTheOwnerTheRestToTheMaster) {
  auto mesh = Mesh::Make(4);
  ASSERT_TRUE(mesh);
  RecordingPort port;
  auto lc = MakeIpiController(*mesh, port, /*direct=*/true, /*traced=*/false);
  ASSERT_TRUE(lc);
  // A proxy-caught NMI for APIC 2 -> node 2, as a kDeliver (sender unknown).
  lc->ForwardIpi(ApicId(2), irqchip::DeliveryMode::kNmi, Vector(0));
  auto f = NextFrame(*mesh->t[2]);
  ASSERT_TRUE(f);
  ASSERT_EQ(f->frame.type, FrameType::kDeliver);
  auto d = std::get<DeliverPayload>(f->frame.payload);
  EXPECT_EQ(d.vcpu, VcpuIndex(2));
  EXPECT_EQ(d.mode, irqchip::DeliveryMode::kNmi);
  EXPECT_EQ(d.ipi_source_vcpu, transport::kIpiSourceProxyResolved);
  // A user-irqchip physical fixed IPI from vCPU 1 to APIC 3 -> node 2 with its sender; a SIPI likewise.
  lc->ForwardIcr(VcpuIndex(1), Icr(3));
  f = NextFrame(*mesh->t[2]);
  ASSERT_TRUE(f);
  d = std::get<DeliverPayload>(f->frame.payload);
  EXPECT_EQ(d.vcpu, VcpuIndex(3));
  EXPECT_EQ(d.vector, Vector(0x40));
  EXPECT_EQ(d.mode, irqchip::DeliveryMode::kFixed);
  EXPECT_EQ(d.ipi_source_vcpu, 1u);
  irqchip::InterruptMessage sipi = Icr(2, irqchip::DeliveryMode::kStartup);
  sipi.vector = Vector(0x9F);
  lc->ForwardIcr(VcpuIndex(0), sipi);
  f = NextFrame(*mesh->t[2]);
  ASSERT_TRUE(f);
  d = std::get<DeliverPayload>(f->frame.payload);
  EXPECT_EQ(d.mode, irqchip::DeliveryMode::kStartup);
  EXPECT_EQ(d.vector, Vector(0x9F));
  // Lowest priority, a shorthand, a broadcast and a logical destination need the master's Router.
  lc->ForwardIcr(VcpuIndex(0), Icr(2, irqchip::DeliveryMode::kLowestPriority));
  irqchip::InterruptMessage all = Icr(0);
  all.shorthand = irqchip::Shorthand::kAllExcludingSelf;
  lc->ForwardIcr(VcpuIndex(0), all);
  lc->ForwardIcr(VcpuIndex(0), Icr(0xFFFFFFFF));
  irqchip::InterruptMessage logical = Icr(0x4);
  logical.dest_mode = irqchip::DestMode::kLogical;
  lc->ForwardIcr(VcpuIndex(0), logical);
  for (int i = 0; i < 4; ++i) {
    f = NextFrame(*mesh->t[0]);
    ASSERT_TRUE(f);
    EXPECT_EQ(f->frame.type, FrameType::kIpi);
  }
  // An INIT level de-assert (SDM vol. 3, 11.6.1: no effect) is dropped, in either route: forwarded, it would arrive
  // as a real INIT (a kDeliver has no level bit).
  irqchip::InterruptMessage deassert = Icr(2, irqchip::DeliveryMode::kInit);
  deassert.level = false;
  deassert.trigger = irqchip::TriggerMode::kLevel;
  lc->ForwardIcr(VcpuIndex(0), deassert);
  deassert.shorthand = irqchip::Shorthand::kAllExcludingSelf;
  lc->ForwardIcr(VcpuIndex(0), deassert);
  EXPECT_EQ(lc->counters().init_deasserts_dropped, 2u);
  // An APIC ID no vCPU has: counted, nothing sent.
  lc->ForwardIpi(ApicId(9), irqchip::DeliveryMode::kFixed, Vector(0x40));
  lc->ForwardIcr(VcpuIndex(0), Icr(7));
  EXPECT_EQ(lc->counters().ipis_to_nowhere, 2u);
  EXPECT_EQ(lc->counters().ipis_direct, 3u);
  EXPECT_EQ(lc->counters().ipis_via_master, 4u);

  // Receiving: a kDeliver from peer node 2 is injected; one from node 3 (no vCPU of this VM) is dropped.
  std::jthread th([&](std::stop_token st) { (void)lc->Run(st); });
  Frame from_peer = Deliver(1, 0x40);
  ASSERT_TRUE(mesh->t[2]->Send(kNode, from_peer).ok());
  ASSERT_TRUE(port.WaitFor(1));
  EXPECT_EQ(port.injections()[0].vcpu, VcpuIndex(1));
  Frame from_stranger = Deliver(1, 0x41);
  ASSERT_TRUE(mesh->t[3]->Send(kNode, from_stranger).ok());
  for (int i = 0; i < 500 && lc->counters().dropped_unknown_peer == 0; ++i) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(lc->counters().dropped_unknown_peer, 1u);
  EXPECT_EQ(lc->counters().direct_received, 1u);
  EXPECT_EQ(port.injections().size(), 1u);
}

TEST(LocalControllerIpi, CreateRefusesInconsistentTopology) {
  auto star = TcpStar::Make({kMaster, kNode});
  ASSERT_TRUE(star.ok());
  RecordingPort port;
  LocalControllerConfig c;
  c.master = kMaster;
  c.num_vcpus = 2;
  c.owned = {VcpuIndex(0)};
  c.vcpu_node = {kNode};
  c.apic_ids = {ApicId(0)};
  EXPECT_FALSE(LocalController::Create(c, &star->node(1), &port).ok()) << "vcpu_node must list every vCPU";
  c.vcpu_node = {kNode, NodeId(2)};
  EXPECT_FALSE(LocalController::Create(c, &star->node(1), &port).ok()) << "apic_ids must match vcpu_node";
  c.apic_ids = {ApicId(1), ApicId(1)};
  EXPECT_FALSE(LocalController::Create(c, &star->node(1), &port).ok()) << "an APIC ID given twice";
  c.apic_ids = {ApicId(0), ApicId(1)};
  EXPECT_TRUE(LocalController::Create(c, &star->node(1), &port).ok());
}

}  // namespace
}  // namespace aggvm::agent
