// End to end: a real traced interrupt ping-pong over TcpTransport on 127.0.0.1 (node 1 raises and receives the
// delivery, node 2 plays the master), timestamps taken at each hop, turned into a results file, which the
// aggvm-plot command turns into PNG and SVG plots.
#include "lab/plot.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <iostream>
#include <thread>

#include "common/clock.h"
#include "lab/results.h"
#include "tests/support/require.h"
#include "transport/tcp_transport.h"

namespace aggvm::lab {
namespace {

using transport::Frame;
using transport::FrameType;
using transport::ReceivedFrame;
using transport::TcpTransport;
using transport::TcpTransportOptions;
using transport::WaitMode;

// A timestamp strictly after `previous` (the wire format requires every stamp > raised).
uint64_t StampAfter(uint64_t previous) {
  uint64_t t = MonotonicNanos();
  while (t <= previous) t = MonotonicNanos();
  return t;
}

std::string GnuplotMissing() {
  return std::system("gnuplot --version >/dev/null 2>&1") == 0 ? "" : "gnuplot not found (apt install gnuplot-nox)";
}

std::unique_ptr<TcpTransport> Make(uint16_t node, WaitMode mode) {
  TcpTransportOptions o;
  o.listen_address = "127.0.0.1:0";
  o.wait_mode = mode;
  auto t = TcpTransport::Create(NodeId(node), o);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

// Receives one frame within 5 s.
absl::StatusOr<ReceivedFrame> ReceiveOne(TcpTransport& t) {
  std::array<ReceivedFrame, 1> buf;
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    auto n = t.Wait(buf, absl::Milliseconds(100));
    if (!n.ok()) return n.status();
    if (*n == 1) return buf[0];
  }
  return absl::DeadlineExceededError("no frame within 5 s");
}

// Runs `rounds` traced interrupts node 1 -> node 2 (master) -> node 1 and returns their breakdown.
HopBreakdown MeasurePingPong(WaitMode mode, int rounds) {
  HopBreakdown hops;
  auto source = Make(1, mode);
  auto master = Make(2, mode);
  if (!source || !master) return hops;
  const std::vector<transport::PeerEndpoint> to_master = {{NodeId(2), "127.0.0.1:" + std::to_string(master->listen_port())}};
  const std::vector<transport::PeerEndpoint> to_source = {{NodeId(1), "127.0.0.1:" + std::to_string(source->listen_port())}};
  auto connected = std::async(std::launch::async, [&] { return master->Connect(to_source, absl::Seconds(10)); });
  EXPECT_TRUE(source->Connect(to_master, absl::Seconds(10)).ok());
  EXPECT_TRUE(connected.get().ok());

  // The master: stamps received/decided and answers with a kDeliver carrying the trace block on.
  std::atomic<bool> master_failed{false};
  std::thread master_thread([&] {
    for (int i = 0; i < rounds; ++i) {
      auto in = ReceiveOne(*master);
      if (!in.ok() || !in->frame.traced()) {
        master_failed = true;
        return;
      }
      transport::TraceBlock trace = in->frame.trace;
      trace.master_received = StampAfter(trace.raised);
      const auto& irq = std::get<transport::InterruptPayload>(in->frame.payload);
      Frame out;
      out.type = FrameType::kDeliver;
      out.flags = transport::kFlagTraced;
      transport::DeliverPayload d;
      d.vcpu = VcpuIndex(0);
      d.vector = Vector(static_cast<uint8_t>(0x30 + irq.gsi.value()));
      out.payload = d;
      trace.master_decided = StampAfter(trace.master_received);
      out.trace = trace;
      if (!master->Send(NodeId(1), out).ok()) {
        master_failed = true;
        return;
      }
    }
  });

  for (int i = 0; i < rounds && !master_failed; ++i) {
    Frame f;
    f.type = FrameType::kInterrupt;
    f.flags = transport::kFlagTraced;
    transport::InterruptPayload p;
    p.gsi = Gsi(5);
    p.level = 1;
    f.payload = p;
    f.trace.trace_id = static_cast<uint32_t>(i + 1);
    f.trace.raised = MonotonicNanos();
    f.trace.local_controller = StampAfter(f.trace.raised);
    auto sent = source->Send(NodeId(2), f);
    EXPECT_TRUE(sent.ok()) << sent;
    if (!sent.ok()) break;
    auto back = ReceiveOne(*source);
    EXPECT_TRUE(back.ok()) << back.status();
    if (!back.ok()) break;
    transport::TraceBlock t = back->frame.trace;
    EXPECT_EQ(t.trace_id, static_cast<uint32_t>(i + 1));
    t.target_received = StampAfter(t.master_decided);
    t.injected = StampAfter(t.target_received);  // stands for the injection into the vCPU
    const uint64_t handler = StampAfter(t.injected);
    hops.Add(t, handler);
  }
  master_thread.join();
  EXPECT_FALSE(master_failed);
  return hops;
}

bool StartsWithPngMagic(const std::string& data) {
  static constexpr unsigned char kMagic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  return data.size() > 8 && std::memcmp(data.data(), kMagic, 8) == 0;
}

TEST(LabPlot, RealPingPongResultsBecomePngAndSvgThroughTheCommand) {
  AGGVM_REQUIRE_OR_SKIP("gnuplot", GnuplotMissing());
  constexpr int kRounds = 500;
  ExperimentResult r;
  r.name = "tcp-loopback-pingpong";
  r.software_version = std::string(SoftwareVersion());
  r.machine = MachineInfo::Collect(10);
  for (auto [mode, label] : {std::pair{WaitMode::kBusyPoll, "busy-poll"}, {WaitMode::kEvent, "epoll"}}) {
    ConfigurationResult c;
    c.config = {{"transport", "tcp"}, {"wait", label}, {"route", "via-master"}};
    c.hops = MeasurePingPong(mode, kRounds);
    // Every stamp is on one clock and taken in path order: non-decreasing, nothing missing.
    EXPECT_EQ(c.hops.samples(), static_cast<uint64_t>(kRounds));
    EXPECT_EQ(c.hops.anomalous_samples(), 0u);
    for (size_t h = 0; h < kHopCount; ++h) {
      EXPECT_EQ(c.hops.hop(static_cast<Hop>(h)).histogram.count(), static_cast<uint64_t>(kRounds)) << h;
      EXPECT_EQ(c.hops.hop(static_cast<Hop>(h)).missing, 0u);
    }
    // The network hops dominate the local ones.
    EXPECT_GT(c.hops.hop(Hop::kLocalControllerToMasterReceived).histogram.Percentile(50),
              c.hops.hop(Hop::kMasterReceivedToDecided).histogram.Percentile(50));
    r.configurations.push_back(std::move(c));
  }

  const std::string dir = ::testing::TempDir() + "/lab_plot_test." + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string results = dir + "/pingpong.json";
  ASSERT_TRUE(WriteFile(results, r.ToJsonString()).ok());

  const std::string out = dir + "/plots";
  const std::string cmd = std::string(AGGVM_PLOT_BINARY) + " " + results + " --out " + out + " --csv --table > " +
                          dir + "/stdout.txt 2>&1";
  const int rc = std::system(cmd.c_str());
  auto log = ReadFile(dir + "/stdout.txt");
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << cmd << "\n" << (log.ok() ? *log : "");
  ASSERT_TRUE(log.ok());
  EXPECT_NE(log->find("end_to_end"), std::string::npos) << *log;  // the table
  std::cout << *log;  // the measured table, for the test log
  for (const char* kind : {"cdf", "hops"}) {
    auto png = ReadFile(out + "/pingpong-" + kind + ".png");
    auto svg = ReadFile(out + "/pingpong-" + kind + ".svg");
    ASSERT_TRUE(png.ok()) << png.status();
    ASSERT_TRUE(svg.ok()) << svg.status();
    EXPECT_GT(png->size(), 1000u) << kind;
    EXPECT_TRUE(StartsWithPngMagic(*png)) << kind;
    EXPECT_NE(svg->find("<svg"), std::string::npos) << kind;
    // Each configuration's label appears in the SVG (legend or axis).
    for (const auto& c : r.configurations) {
      EXPECT_NE(svg->find(c.config.at("wait")), std::string::npos) << kind << " " << c.Label();
    }
  }
  auto csv = ReadFile(out + "/pingpong.csv");
  ASSERT_TRUE(csv.ok());
  EXPECT_EQ(*csv, r.ToCsv());
  std::filesystem::remove_all(dir);
}

TEST(LabPlot, NothingToPlotAndMissingGnuplotAreErrors) {
  ExperimentResult empty;
  empty.name = "empty";
  empty.configurations.push_back({{{"a", "b"}}, HopBreakdown(), "ok", {}});
  const std::string dir = ::testing::TempDir();
  EXPECT_EQ(WritePlots(empty, dir, "lab_plot_empty").status().code(), absl::StatusCode::kFailedPrecondition);

  ExperimentResult one = empty;
  transport::TraceBlock t;
  t.raised = 100;
  t.injected = 200;
  one.configurations[0].hops.Add(t);
  auto r = WritePlots(one, dir, "lab_plot_nognuplot", {.gnuplot = "/nonexistent/gnuplot"});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("gnuplot-nox"), std::string_view::npos) << r.status();
}

}  // namespace
}  // namespace aggvm::lab
