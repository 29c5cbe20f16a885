#include "master/master_server.h"

#include <condition_variable>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include "common/clock.h"
#include "common/thread.h"
#include "lab/clock_offset.h"
#include "lab/metrics.h"
#include "master/describe.h"
#include "master/master_service.h"

namespace aggvm::master {
namespace {

constexpr uint32_t kDefaultClockSamples = 16, kMaxClockSamples = 1000;

// The Lab service: the master's clock, and every UP node's offset against it by the RTT/2 method over the nodes'
// NodeAgent.GetClock (lab/clock_offset.h). It reads membership through the Master service's own ListNodes.
class LabService final : public v1::Lab::Service {
 public:
  LabService(MasterService& master, absl::Duration call_timeout) : master_(master), call_timeout_(call_timeout) {}

  grpc::Status GetClock(grpc::ServerContext*, const v1::GetClockRequest*, v1::ClockReading* out) override {
    out->set_monotonic_ns(MonotonicNanos());
    out->set_tsc(ReadTsc());
    return grpc::Status::OK;
  }

  grpc::Status ProbeClocks(grpc::ServerContext*, const v1::ProbeClocksRequest* req,
                           v1::ProbeClocksResponse* out) override {
    const uint32_t n = req->samples() == 0 ? kDefaultClockSamples : req->samples();
    if (n > kMaxClockSamples) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          fmt::format("ProbeClocks: samples = {} is above the limit {}", n, kMaxClockSamples));
    }
    v1::ListNodesRequest lreq;
    v1::ListNodesResponse nodes;
    if (auto st = master_.ListNodes(nullptr, &lreq, &nodes); !st.ok()) return st;
    for (const auto& node : nodes.nodes()) {
      if (node.health() != v1::NODE_HEALTH_UP) continue;
      *out->add_nodes() = Probe(node, n);
    }
    out->set_master_ns(MonotonicNanos());
    return grpc::Status::OK;
  }

 private:
  v1::NodeClockOffset Probe(const v1::NodeStatus& node, uint32_t n) const {
    v1::NodeClockOffset r;
    r.set_node(node.node());
    auto stub = v1::NodeAgent::NewStub(grpc::CreateChannel(node.control_address(), grpc::InsecureChannelCredentials()));
    std::vector<lab::ClockSample> samples;
    std::vector<v1::ClockReading> readings;
    // Two unrecorded calls first: channel set-up and cold caches only widen the first RTTs.
    for (uint32_t i = 0; i < n + 2; ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(call_timeout_));
      v1::GetClockRequest req;
      v1::ClockReading reading;
      const uint64_t t0 = MonotonicNanos();
      const grpc::Status st = stub->GetClock(&ctx, req, &reading);
      const uint64_t t1 = MonotonicNanos();
      if (!st.ok()) {
        r.set_error(fmt::format("GetClock on node '{}' at {}: {}", node.node(), node.control_address(),
                                st.error_message()));
        return r;
      }
      if (i < 2) continue;
      samples.push_back({t0, reading.monotonic_ns(), t1});
      readings.push_back(reading);
    }
    auto est = lab::EstimateOffset(samples);
    if (!est.ok()) {
      r.set_error(std::string(est.status().message()));
      return r;
    }
    r.set_offset_ns(est->offset_ns);
    r.set_uncertainty_ns(est->uncertainty_ns);
    r.set_rtt_min_ns(est->rtt_min_ns);
    r.set_samples(static_cast<uint32_t>(samples.size()));
    r.set_at_master_ns(est->at_local_ns);
    size_t best = 0;
    for (size_t i = 1; i < samples.size(); ++i) {
      if (samples[i].t_recv_local - samples[i].t_send_local <
          samples[best].t_recv_local - samples[best].t_send_local) {
        best = i;
      }
    }
    r.set_node_tsc(readings[best].tsc());
    r.set_node_tsc_monotonic_ns(readings[best].monotonic_ns());
    return r;
  }

  MasterService& master_;
  const absl::Duration call_timeout_;
};

// The master's scrape-time samples: node health and, per running VM, its GlobalController counters.
std::vector<lab::ScrapedSample> MasterSamples(MasterService& service) {
  using lab::ScrapedSample;
  std::vector<ScrapedSample> out;
  v1::ListNodesRequest nreq;
  v1::ListNodesResponse nodes;
  (void)service.ListNodes(nullptr, &nreq, &nodes);
  double up = 0, lost = 0;
  for (const auto& n : nodes.nodes()) (n.health() == v1::NODE_HEALTH_UP ? up : lost) += 1;
  out.push_back({"aggvm_nodes", "Registered nodes by health", {{"health", "up"}}, up, ScrapedSample::Type::kGauge});
  out.push_back({"aggvm_nodes", "Registered nodes by health", {{"health", "lost"}}, lost, ScrapedSample::Type::kGauge});
  v1::ListVmsRequest vreq;
  v1::ListVmsResponse vms;
  (void)service.ListVms(nullptr, &vreq, &vms);
  double running = 0;
  for (const auto& vm : vms.vms()) {
    if (vm.state() != v1::VM_STATE_RUNNING) continue;
    running += 1;
    v1::VmRef ref;
    ref.set_name(vm.name());
    v1::RoutingTable table;
    if (!service.GetRoutingTable(nullptr, &ref, &table).ok()) continue;
    const auto& c = table.counters();
    auto get = [&](const char* k) -> double {
      auto it = c.find(k);
      return it == c.end() ? 0.0 : static_cast<double>(it->second);
    };
    const lab::MetricLabels base = {{"node", "master"}, {"vm", vm.name()}};
    auto counter = [&](const char* name, const char* help, double v, lab::MetricLabels extra = {}) {
      lab::MetricLabels l = base;
      l.insert(extra.begin(), extra.end());
      out.push_back({name, help, std::move(l), v, ScrapedSample::Type::kCounter});
    };
    counter("aggvm_interrupts_raised_total", "Interrupt messages put on the master's bus (IOAPIC pin, MSI, IPI)",
            get("raised"));
    counter("aggvm_interrupts_routed_total", "Router decisions naming at least one vCPU", get("routed"));
    counter("aggvm_interrupts_delivered_total", "kDeliver frames sent to the owner nodes", get("delivered"));
    for (const auto& [k, v] : c) {
      if (k.rfind("dropped_", 0) == 0) {
        counter("aggvm_interrupts_dropped_total", "Interrupt frames dropped, by reason", static_cast<double>(v),
                {{"reason", k.substr(8)}});
      }
    }
    counter("aggvm_frames_received_total", "Data-plane frames received", get("frames_received"));
    // The controller's own sends: deliveries, doorbell raises, I/O answers.
    counter("aggvm_frames_sent_total", "Data-plane frames sent", get("delivered") + get("rings") + get("io_requests"));
    for (const auto& [k, v] : c) {
      lab::MetricLabels l = base;
      l["key"] = k;
      out.push_back({"aggvm_master_stat", "Every counter of the VM's global controller, by key", std::move(l),
                     static_cast<double>(v), ScrapedSample::Type::kGauge});
    }
  }
  out.push_back({"aggvm_vms_running", "VMs in state RUNNING", {}, running, ScrapedSample::Type::kGauge});
  return out;
}

}  // namespace

struct MasterServer::Impl {
  std::unique_ptr<MasterService> service;
  std::unique_ptr<LabService> lab;
  std::unique_ptr<lab::MetricsRegistry> metrics_registry;
  std::unique_ptr<lab::MetricsEndpoint> metrics;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::thread sweeper;
  std::thread logger;
  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;  // guarded by mu
  bool stopped = false;   // guarded by mu

  void SweepLoop(absl::Duration period) {
    std::unique_lock lock(mu);
    while (!stopping) {
      cv.wait_for(lock, absl::ToChronoNanoseconds(period));
      if (stopping) break;
      lock.unlock();
      service->Sweep(absl::Now());
      lock.lock();
    }
  }
};

absl::StatusOr<std::unique_ptr<MasterServer>> MasterServer::Start(const MasterOptions& options) {
  if (options.heartbeat_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("heartbeat interval must be positive");
  }
  auto impl = std::make_unique<Impl>();
  impl->service = std::make_unique<MasterService>(options);
  impl->lab = std::make_unique<LabService>(*impl->service, options.agent_call_timeout);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(), &impl->port);
  builder.RegisterService(impl->service.get());
  builder.RegisterService(impl->lab.get());
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return absl::UnavailableError(fmt::format(
        "cannot listen on '{}' (address in use or not host:port?); pick another --listen address",
        options.listen_address));
  }
  if (!options.metrics_listen.empty()) {
    impl->metrics_registry = std::make_unique<lab::MetricsRegistry>();
    auto ep = lab::MetricsEndpoint::Start(*impl->metrics_registry, options.metrics_listen,
                                          [svc = impl->service.get()] { return MasterSamples(*svc); });
    if (!ep.ok()) {
      impl->server->Shutdown();
      return ep.status();
    }
    impl->metrics = std::move(*ep);
  }
  // Check for loss a few times per heartbeat interval so a LOST node is reported within ~lost_after + interval/4.
  impl->sweeper = std::thread([p = impl.get(), period = options.heartbeat_interval / 4] {
    NameThisThread("node-sweeper");
    p->SweepLoop(period);
  });
  if (options.event_log) {
    impl->logger = std::thread([sub = impl->service->events().Subscribe(nullptr), log = options.event_log]() mutable {
      while (true) {
        auto e = sub->Next(absl::Seconds(1));
        if (e && !e->has_record()) log(DescribeEvent(*e));  // records (IRQs...) can be many: aggvmctl shows them
        else if (sub->closed()) return;
      }
    });
  }
  return std::unique_ptr<MasterServer>(new MasterServer(std::move(impl)));
}

MasterServer::MasterServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MasterServer::~MasterServer() { Shutdown(); }

int MasterServer::port() const { return impl_->port; }

int MasterServer::metrics_port() const { return impl_->metrics ? impl_->metrics->port() : 0; }

void MasterServer::Shutdown(absl::Duration grace) {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stopping) return;
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  impl_->metrics.reset();  // no scrape reads the service from here on
  if (impl_->sweeper.joinable()) impl_->sweeper.join();
  impl_->service->Shutdown();  // ends WatchEvents streams and the event logger
  if (impl_->logger.joinable()) impl_->logger.join();
  impl_->server->Shutdown(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(grace));
  impl_->server->Wait();
  {
    std::lock_guard lock(impl_->mu);
    impl_->stopped = true;
  }
  impl_->cv.notify_all();
}

void MasterServer::Wait() {
  std::unique_lock lock(impl_->mu);
  impl_->cv.wait(lock, [&] { return impl_->stopped; });
}

}  // namespace aggvm::master
