#include "bench/cluster/cluster_floor.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>

#include <fmt/format.h>

#include "common/clock.h"
#include "common/futex.h"
#include "common/thread.h"
#include "node-agent/irq_probe.h"
#include "node-agent/probe_vm.h"
#include "transport/tcp_transport.h"

namespace aggvm::bench {
namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }

}  // namespace

bool StopRequested() { return g_stop.load(); }

absl::StatusOr<BenchCluster> StartBenchCluster(const std::string& tag, bool loopback,
                                               std::vector<std::string> master_args,
                                               std::vector<std::string> agent_args) {
  if (::access("/dev/kvm", R_OK | W_OK) != 0) {
    return absl::FailedPreconditionError("/dev/kvm is missing or not accessible (load kvm, run as root)");
  }
  struct sigaction sa{};
  sa.sa_handler = OnSignal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  std::string dir_template = fmt::format("/tmp/aggvm-{}.XXXXXX", tag);
  if (::mkdtemp(dir_template.data()) == nullptr) return absl::InternalError("mkdtemp failed for the daemons' logs");
  BenchCluster out;
  out.logdir = dir_template;
  testing::ClusterOptions options;
  options.tag = tag.substr(0, 2);
  options.master_bin = AGGVM_MASTER_BIN;
  options.agent_bin = AGGVM_AGENT_BIN;
  options.loopback = loopback;
  options.log_dir = out.logdir;
  options.heartbeat_ms = 200;
  options.master_args = std::move(master_args);
  options.agent_args = std::move(agent_args);
  auto c = testing::ClusterLauncher::Start(options);
  if (!c.ok()) {
    return absl::Status(c.status().code(),
                        fmt::format("{} (logs in {})", std::string(c.status().message()), out.logdir));
  }
  out.cluster = std::move(*c);
  out.network = out.cluster->in_namespaces() ? "netns" : "loopback";
  return out;
}

void RemoveLogs(const BenchCluster& b) {
  const std::string rm = fmt::format("rm -rf {}", b.logdir);
  if (std::system(rm.c_str()) != 0) std::fprintf(stderr, "note: could not remove %s\n", b.logdir.c_str());
}

absl::StatusOr<std::vector<double>> TcpOneWayUs(const testing::ClusterLauncher& cluster, int from, int to, size_t n,
                                                int port, absl::Duration pace, const std::vector<int>& cpus,
                                                OneWay how) {
  using namespace transport;
  const ScopedPlacement placement(cpus);
  if (!placement.status().ok()) return placement.status();
  const std::string a = fmt::format("{}:{}", cluster.host(from), port);
  const std::string b = fmt::format("{}:{}", cluster.host(to), port + 1);
  std::unique_ptr<TcpTransport> ta, tb;
  auto make = [&](int host, NodeId id, const std::string& addr, std::unique_ptr<TcpTransport>& t) {
    return cluster.RunIn(host, [&]() -> absl::Status {
      TcpTransportOptions o{.listen_address = addr, .wait_mode = WaitMode::kEvent};
      auto r = TcpTransport::Create(id, o);
      if (!r.ok()) return r.status();
      t = std::move(*r);
      return absl::OkStatus();
    });
  };
  if (auto s = make(from, NodeId(1), a, ta); !s.ok()) return s;
  if (auto s = make(to, NodeId(2), b, tb); !s.ok()) return s;
  PeerEndpoint to_b{NodeId(2), b}, to_a{NodeId(1), a};
  absl::Status sb;
  std::thread connect_b(
      [&] { sb = cluster.RunIn(to, [&] { return tb->Connect(std::span(&to_a, 1), absl::Seconds(10)); }); });
  absl::Status sa = cluster.RunIn(from, [&] { return ta->Connect(std::span(&to_b, 1), absl::Seconds(10)); });
  connect_b.join();
  if (!sa.ok()) return sa;
  if (!sb.ok()) return sb;

  auto send = [](Transport& t, NodeId dst, const Frame& f) -> absl::Status {
    for (;;) {
      Frame copy = f;
      absl::Status s = t.Send(dst, copy);
      if (s.code() != absl::StatusCode::kResourceExhausted) return s;
    }
  };
  // Untimed, as the cluster's data-plane threads wait: a timed wait would arm and cancel a timer around each frame,
  // which the cluster no longer pays. A side that fails sets `abandon` and wakes the other one's wait.
  std::atomic<bool> abandon{false};
  auto receive = [&abandon](Transport& t, ReceivedFrame& out) -> absl::Status {
    for (;;) {
      auto r = t.Wait(std::span(&out, 1), absl::InfiniteDuration());
      if (!r.ok()) return r.status();
      if (*r == 1) return absl::OkStatus();
      if (abandon.load()) return absl::CancelledError("the other side of the floor's transport failed");
    }
  };
  auto give_up = [&abandon](Transport& other) {
    abandon.store(true);
    other.Wake();
  };
  // The far side echoes each frame (round trip), or stamps its arrival and tells the sender so (stream).
  absl::Status far_status;
  std::vector<uint64_t> arrived_ns(n, 0), sent_ns(n, 0);
  std::atomic<uint32_t> stamped{0};  // stream: frames whose arrival the far side has stamped (futex word)
  std::thread far([&] {
    if (!cpus.empty()) far_status = PinThisThread(cpus);
    ReceivedFrame f;
    for (size_t i = 0; i < n && far_status.ok(); ++i) {
      far_status = receive(*tb, f);
      if (!far_status.ok()) break;
      if (how == OneWay::kRoundTripHalf) {
        far_status = send(*tb, NodeId(1), f.frame);
        continue;
      }
      const uint64_t at = MonotonicNanos();
      const auto* c = std::get_if<ControlPayload>(&f.frame.payload);
      if (c != nullptr && c->arg0 < n) arrived_ns[c->arg0] = at;
      stamped.store(static_cast<uint32_t>(i + 1), std::memory_order_release);
      FutexWake(stamped);
    }
    if (!far_status.ok()) give_up(*ta);
    stamped.store(std::numeric_limits<uint32_t>::max(), std::memory_order_release);  // never leave the sender asleep
    FutexWake(stamped);
  });
  std::vector<double> us;
  absl::Status st;
  ReceivedFrame f;
  const uint64_t pace_ns = static_cast<uint64_t>(absl::ToInt64Nanoseconds(pace));
  uint64_t last_send = 0;
  for (size_t i = 0; i < n && st.ok(); ++i) {
    if (pace_ns > 0 && last_send != 0) {  // sleep (not spin): both threads must go idle as in the cluster
      const uint64_t due = last_send + pace_ns, now = MonotonicNanos();
      if (due > now) std::this_thread::sleep_for(std::chrono::nanoseconds(due - now));
    }
    Frame ping;
    ping.type = FrameType::kControl;
    ping.payload = ControlPayload{.op = ControlPayload::Op::kPing, .arg0 = static_cast<uint32_t>(i), .arg1 = 0};
    const uint64_t t0 = MonotonicNanos();
    last_send = t0;
    sent_ns[i] = t0;
    st = send(*ta, NodeId(2), ping);
    if (!st.ok()) break;
    if (how == OneWay::kRoundTripHalf) {
      st = receive(*ta, f);
      if (st.ok()) us.push_back(static_cast<double>(MonotonicNanos() - t0) / 2e3);
      continue;
    }
    // Asleep without a timer until the far side has stamped this frame: the pace's timer is armed only after, so
    // the sender's own timer never delays the receiver (in the traced cluster the woken data-plane thread ran
    // before the sender went back to its wait).
    for (uint32_t v; (v = stamped.load(std::memory_order_acquire)) < i + 1;) FutexWait(stamped, v);
    if (arrived_ns[i] == 0) break;  // the far side stopped: its status says why
  }
  if (!st.ok()) give_up(*tb);  // ends the far thread's wait
  far.join();
  ta->Close();
  tb->Close();
  if (!far_status.ok()) return far_status;  // first: a far side that failed also cancels the sender's wait
  if (!st.ok()) return st;
  if (how == OneWay::kStream) {
    for (size_t i = 0; i < n; ++i) {
      if (arrived_ns[i] < sent_ns[i] || arrived_ns[i] == 0) {
        return absl::InternalError(fmt::format("one-way stream: frame {} of {} not stamped on arrival", i, n));
      }
      us.push_back(static_cast<double>(arrived_ns[i] - sent_ns[i]) / 1e3);
    }
  }
  return us;
}

absl::StatusOr<LocalMsi> MeasureLocalMsi(vcpu::IrqchipMode irqchip, size_t n, absl::Duration pace,
                                         agent::IrqProbe::Waiter waiter, const std::vector<int>& cpus) {
  const ScopedPlacement placement(cpus);
  if (!placement.status().ok()) return placement.status();
  agent::ProbeVmConfig c;
  c.guest_elf = AGGVM_PROBE_GUEST_ELF;
  c.irqchip = irqchip;
  c.workload = guest::AGGVM_WORKLOAD_IRQ_SINK;
  c.num_vcpus = 2;
  agent::IrqProbe probe;
  probe.Attach(c);
  auto vm = agent::ProbeVm::Create(c);
  if (!vm.ok()) return vm.status();
  if (auto s = (*vm)->Start(); !s.ok()) return s;
  if (auto s = (*vm)->PinVcpus(cpus); !s.ok()) {
    (*vm)->Stop();
    return s;
  }
  LocalMsi out;
  out.tsc_khz = (*vm)->tsc_khz();
  // Paced: each MSI `pace` after the previous one, so the vCPU thread has left KVM's halt-polling (halt_poll_ns,
  // 200 µs by default) and sleeps when the MSI comes, as node-b's does in the cluster. One Measure for all samples:
  // a sleeping waiter's budget thread then starts once, not around every sample.
  const absl::Duration budget = absl::Seconds(120) + static_cast<double>(n) * pace;
  auto r = probe.Measure(**vm, VcpuIndex(1), Vector(0x51), n, agent::MsiPath::kInjector, budget, waiter, pace);
  if (r.ok()) out.to_handler_us = std::move(r->to_handler_us);
  const absl::Status st = r.status();
  (*vm)->Stop();
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<LocalIpi> MeasureLocalIpiRoundTrip(vcpu::IrqchipMode irqchip, uint32_t rounds) {
  agent::ProbeVmConfig c;
  c.guest_elf = AGGVM_PROBE_GUEST_ELF;
  c.irqchip = irqchip;
  c.workload = guest::AGGVM_WORKLOAD_IPI_PINGPONG;
  c.num_vcpus = 2;
  c.iterations = rounds;
  auto vm = agent::ProbeVm::Create(c);
  if (!vm.ok()) return vm.status();
  if (auto s = (*vm)->Start(); !s.ok()) return s;
  absl::Status st = (*vm)->WaitDone(absl::Seconds(120));
  LocalIpi out;
  out.tsc_khz = (*vm)->tsc_khz();
  out.round_trip_us = agent::PingPongRoundTripsUs((*vm)->report(VcpuIndex(0)), out.tsc_khz);
  (*vm)->Stop();
  if (!st.ok()) return st;
  if (out.round_trip_us.empty()) return absl::InternalError("the local ipi-pingpong reported no PING_ROUND record");
  return out;
}

double MedianGap(std::vector<double> stamps) {
  if (stamps.size() < 2) return 0;
  std::sort(stamps.begin(), stamps.end());
  std::vector<double> gaps;
  for (size_t i = 1; i < stamps.size(); ++i) gaps.push_back(stamps[i] - stamps[i - 1]);
  std::nth_element(gaps.begin(), gaps.begin() + static_cast<std::ptrdiff_t>(gaps.size() / 2), gaps.end());
  return gaps[gaps.size() / 2];
}

ClockPair ReadPair() {
  ClockPair best;
  uint64_t best_gap = ~uint64_t{0};
  for (int i = 0; i < 5; ++i) {
    const uint64_t t0 = ReadTsc();
    const uint64_t ns = MonotonicNanos();
    const uint64_t t1 = ReadTsc();
    if (t1 - t0 < best_gap) {
      best_gap = t1 - t0;
      best = {t0 + (t1 - t0) / 2, ns};
    }
  }
  return best;
}

nlohmann::json ToJson(const Summary& s) {
  return {{"count", s.count}, {"p50_us", s.p50}, {"p90_us", s.p90}, {"p99_us", s.p99}, {"min_us", s.min},
          {"max_us", s.max}, {"mean_us", s.mean}};
}

}  // namespace aggvm::bench
