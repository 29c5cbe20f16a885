// rdma_bench: frame ping-pong latency and one-way throughput of RdmaTransport next to a raw verbs baseline
// (tests/rdma/raw_rc.h: bare inline SEND / receive ring, no frame codec), measured in the same run on the same device.
//
// Needs an RDMA device: run it inside the rdma_rxe VM with bench/rdma/run_in_rxe_vm.sh. Both endpoints of each pair
// live in this process and one thread drives both (send on A, poll B until the frame arrives, answer, poll A):
// with one vCPU under TCG a second busy-polling thread would only measure scheduler time slices. Raw and aggvm run
// in alternating blocks so that drift of the emulated machine hits both alike.
//
// Prints a table; --json FILE writes the same numbers.
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/stats.h"
#include "tests/rdma/raw_rc.h"
#include "transport/rdma/rdma_transport.h"
#include "transport/rdma/tcp_bootstrap.h"

namespace aggvm::transport::rdma {
namespace {

struct Setup {
  std::unique_ptr<RdmaTransport> a, b;
  std::unique_ptr<testing::RawRcEndpoint> ra, rb;
};

absl::Status Build(const DeviceSelection& sel, Setup& s) {
  auto boot_a = TcpBootstrap::Listen(NodeId(1), "127.0.0.1:0");
  auto boot_b = TcpBootstrap::Listen(NodeId(2), "127.0.0.1:0");
  if (!boot_a.ok()) return boot_a.status();
  if (!boot_b.ok()) return boot_b.status();
  const PeerEndpoint ep_a{NodeId(1), (*boot_a)->address()}, ep_b{NodeId(2), (*boot_b)->address()};
  RdmaOptions oa, ob;
  oa.self = NodeId(1);
  ob.self = NodeId(2);
  oa.device = ob.device = sel;
  auto a = RdmaTransport::Create(oa, std::move(*boot_a));
  if (!a.ok()) return a.status();
  auto b = RdmaTransport::Create(ob, std::move(*boot_b));
  if (!b.ok()) return b.status();
  absl::Status sb;
  std::thread t([&] { sb = (*b)->Connect({&ep_a, 1}, absl::Seconds(30)); });
  const absl::Status sa = (*a)->Connect({&ep_b, 1}, absl::Seconds(30));
  t.join();
  if (!sa.ok()) return sa;
  if (!sb.ok()) return sb;
  s.a = std::move(*a);
  s.b = std::move(*b);

  auto ra = testing::RawRcEndpoint::Create(sel);
  if (!ra.ok()) return ra.status();
  auto rb = testing::RawRcEndpoint::Create(sel);
  if (!rb.ok()) return rb.status();
  if (auto st = (*ra)->Connect((*rb)->LocalInfo(NodeId(2))); !st.ok()) return st;
  if (auto st = (*rb)->Connect((*ra)->LocalInfo(NodeId(1))); !st.ok()) return st;
  s.ra = std::move(*ra);
  s.rb = std::move(*rb);
  return absl::OkStatus();
}

Frame Ping(uint64_t i) {
  Frame f;
  f.type = FrameType::kControl;
  f.payload = ControlPayload{ControlPayload::Op::kPing, i, 0};
  return f;
}

// Polls `t` until one frame arrives (or fails).
absl::Status AwaitOne(RdmaTransport& t, std::span<ReceivedFrame> buf) {
  for (;;) {
    auto n = t.Poll(buf.first(1));
    if (!n.ok()) return n.status();
    if (*n == 1) return absl::OkStatus();
  }
}

// `n` aggvm round trips: A -> B (decoded), B answers with the same frame, A receives it. Appends RTTs in us.
absl::Status AggvmPingPong(Setup& s, uint64_t n, std::vector<double>& rtt_us) {
  ReceivedFrame buf[1];
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t t0 = MonotonicNanos();
    Frame f = Ping(i);
    if (auto st = s.a->Send(NodeId(2), f); !st.ok()) return st;
    if (auto st = AwaitOne(*s.b, buf); !st.ok()) return st;
    Frame echo = buf[0].frame;
    if (auto st = s.b->Send(NodeId(1), echo); !st.ok()) return st;
    if (auto st = AwaitOne(*s.a, buf); !st.ok()) return st;
    rtt_us.push_back(static_cast<double>(MonotonicNanos() - t0) / 1000.0);
  }
  return absl::OkStatus();
}

// `n` raw round trips of 64-byte messages: the receiver only counts, the answer is the bytes it got.
absl::Status RawPingPong(Setup& s, uint64_t n, std::vector<double>& rtt_us) {
  alignas(64) uint8_t msg[kFrameSize] = {};
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t t0 = MonotonicNanos();
    std::memcpy(msg, &i, sizeof(i));
    if (!s.ra->Send(msg, kFrameSize)) return absl::InternalError("raw send A->B failed");
    int got = 0;
    while (got == 0) {
      got = s.rb->PollRecv(1, [&](const uint8_t* d, uint32_t len) { std::memcpy(msg, d, len); });
      if (got < 0) return absl::InternalError("raw receive on B failed");
    }
    if (!s.rb->Send(msg, kFrameSize)) return absl::InternalError("raw send B->A failed");
    got = 0;
    while (got == 0) {
      got = s.ra->PollRecv(1, [](const uint8_t*, uint32_t) {});
      if (got < 0) return absl::InternalError("raw receive on A failed");
    }
    rtt_us.push_back(static_cast<double>(MonotonicNanos() - t0) / 1000.0);
  }
  return absl::OkStatus();
}

// One-way: A sends `n` frames as fast as its send queue allows; the same thread drains B. Returns frames/s.
absl::StatusOr<double> AggvmThroughput(Setup& s, uint64_t n) {
  std::vector<ReceivedFrame> buf(RdmaTransport::kPollBatch);
  uint64_t sent = 0, got = 0;
  const uint64_t t0 = MonotonicNanos();
  while (got < n) {
    while (sent < n) {
      Frame f = Ping(sent);
      absl::Status st = s.a->Send(NodeId(2), f);
      if (st.code() == absl::StatusCode::kResourceExhausted) break;
      if (!st.ok()) return st;
      ++sent;
    }
    auto r = s.b->Poll(buf);
    if (!r.ok()) return r.status();
    got += *r;
  }
  return static_cast<double>(n) * 1e9 / static_cast<double>(MonotonicNanos() - t0);
}

absl::StatusOr<double> RawThroughput(Setup& s, uint64_t n) {
  alignas(64) uint8_t msg[kFrameSize] = {};
  uint64_t sent = 0, got = 0;
  const uint64_t t0 = MonotonicNanos();
  while (got < n) {
    while (sent < n && s.ra->Send(msg, kFrameSize)) ++sent;
    if (s.ra->failed()) return absl::InternalError("raw send failed");
    const int r = s.rb->PollRecv(32, [](const uint8_t*, uint32_t) {});
    if (r < 0) return absl::InternalError("raw receive failed");
    got += static_cast<uint64_t>(r);
  }
  return static_cast<double>(n) * 1e9 / static_cast<double>(MonotonicNanos() - t0);
}

}  // namespace
}  // namespace aggvm::transport::rdma

int main(int argc, char** argv) {
  using namespace aggvm::transport::rdma;
  CLI::App app{"rdma transport benchmark: frame ping-pong and one-way throughput vs raw verbs"};
  uint64_t round_trips = 100'000, frames = 200'000, warmup = 2'000;
  int blocks = 10;
  std::string json_file;
  DeviceSelection sel;
  app.add_option("--round-trips", round_trips, "ping-pong round trips per variant");
  app.add_option("--frames", frames, "frames per variant for one-way throughput");
  app.add_option("--warmup", warmup, "untimed round trips per variant first");
  app.add_option("--blocks", blocks, "alternate raw / aggvm in this many blocks")->check(CLI::PositiveNumber);
  app.add_option("--rdma-device", sel.device, "RDMA device (default: the first)");
  app.add_option("--rdma-port", sel.port, "port number");
  app.add_option("--rdma-gid-index", sel.gid_index, "GID index (default: automatic)");
  app.add_option("--json", json_file, "write results as JSON to this file");
  CLI11_PARSE(app, argc, argv);

  Setup s;
  if (auto st = Build(sel, s); !st.ok()) {
    std::fprintf(stderr, "rdma_bench: %s\n", st.ToString().c_str());
    return 1;
  }
  std::vector<double> raw_rtt, agg_rtt, discard;
  raw_rtt.reserve(round_trips);
  agg_rtt.reserve(round_trips);
  absl::Status st = RawPingPong(s, warmup, discard);
  if (st.ok()) st = AggvmPingPong(s, warmup, discard);
  const uint64_t t_start = aggvm::MonotonicNanos();
  for (int blk = 0; st.ok() && blk < blocks; ++blk) {
    const uint64_t n = round_trips / static_cast<uint64_t>(blocks) +
                       (static_cast<uint64_t>(blk) < round_trips % static_cast<uint64_t>(blocks) ? 1 : 0);
    st = RawPingPong(s, n, raw_rtt);
    if (st.ok()) st = AggvmPingPong(s, n, agg_rtt);
  }
  absl::StatusOr<double> raw_tput = st.ok() ? RawThroughput(s, frames) : absl::StatusOr<double>(st);
  absl::StatusOr<double> agg_tput = raw_tput.ok() ? AggvmThroughput(s, frames) : raw_tput;
  if (!agg_tput.ok()) {
    std::fprintf(stderr, "rdma_bench: %s\n", agg_tput.status().ToString().c_str());
    return 1;
  }
  const double secs = static_cast<double>(aggvm::MonotonicNanos() - t_start) / 1e9;
  const auto raw = aggvm::Summarize(raw_rtt);
  const auto agg = aggvm::Summarize(agg_rtt);
  const auto& port = s.a->port_info();
  std::printf("device %s port %d gid index %d, inline sends %s (max_inline_data %u); %.1f s\n",
              port.device_name.c_str(), port.port, port.gid_index, s.a->inline_sends() ? "yes" : "no",
              port.max_inline_data, secs);
  std::printf("%-34s %8s %9s %9s %9s %9s %12s\n", "64-byte frame ping-pong RTT (µs)", "n", "p50", "p99", "p99.9",
              "max", "one-way f/s");
  std::printf("%-34s %8zu %9.2f %9.2f %9.2f %9.2f %12.0f\n", "raw verbs (baseline)", raw.count, raw.p50, raw.p99,
              raw.p999, raw.max, *raw_tput);
  std::printf("%-34s %8zu %9.2f %9.2f %9.2f %9.2f %12.0f\n", "aggvm RdmaTransport", agg.count, agg.p50, agg.p99,
              agg.p999, agg.max, *agg_tput);
  const double ratio = agg.p50 / raw.p50;
  std::printf("aggvm p50 / raw p50 = %.3f (goal <= 1.10: %s); throughput aggvm / raw = %.3f\n", ratio,
              ratio <= 1.10 ? "met" : "NOT met", *agg_tput / *raw_tput);

  if (!json_file.empty()) {
    auto row = [](const char* name, const aggvm::Summary& x, double tput) {
      return nlohmann::json{{"name", name}, {"unit", "us"}, {"count", x.count}, {"p50", x.p50}, {"p90", x.p90},
                            {"p99", x.p99}, {"p999", x.p999}, {"min", x.min}, {"max", x.max}, {"mean", x.mean},
                            {"one_way_frames_per_s", tput}};
    };
    nlohmann::json j{{"benchmark", "rdma_transport"},
                     {"device", port.device_name},
                     {"inline_sends", s.a->inline_sends()},
                     {"round_trips", round_trips},
                     {"frames", frames},
                     {"p50_ratio", ratio},
                     {"results", nlohmann::json::array({row("raw_verbs", raw, *raw_tput),
                                                        row("aggvm_rdma", agg, *agg_tput)})}};
    std::ofstream out(json_file);
    out << j.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "rdma_bench: cannot write %s\n", json_file.c_str());
      return 1;
    }
  }
  return 0;
}
