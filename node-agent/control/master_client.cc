#include "node-agent/control/master_client.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include "common/clock.h"
#include "common/thread.h"
#include "proto/aggvm.grpc.pb.h"

namespace aggvm::agent::control {
namespace {

constexpr size_t kOutputQueueLimit = 4096;

absl::Status ToAbsl(const grpc::Status& st, std::string_view what) {
  if (st.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()), fmt::format("{}: {}", what, st.error_message()));
}

std::chrono::system_clock::time_point Deadline(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoNanoseconds(d);
}

}  // namespace

struct MasterClient::Impl {
  MasterClientOptions opt;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Master::Stub> stub;

  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;                  // guarded by mu
  NodeId node_id{0};                      // guarded by mu
  uint64_t incarnation = 0;               // guarded by mu
  absl::Duration interval = absl::Milliseconds(500);  // guarded by mu
  std::deque<v1::Event> output;           // guarded by mu
  grpc::ClientContext* output_ctx = nullptr;  // the open ReportGuestOutput stream, guarded by mu

  std::thread heartbeat_thread;
  std::thread output_thread;

  void Log(const std::string& line) const {
    if (opt.log) opt.log(line);
  }
};

MasterClient::MasterClient(MasterClientOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->opt = std::move(options);
  impl_->channel = grpc::CreateChannel(impl_->opt.master_address, grpc::InsecureChannelCredentials());
  impl_->stub = v1::Master::NewStub(impl_->channel);
}

MasterClient::~MasterClient() { Stop(); }

void MasterClient::set_control_address(std::string address) {
  std::lock_guard lock(impl_->mu);
  impl_->opt.control_address = std::move(address);
}

NodeId MasterClient::node_id() const {
  std::lock_guard lock(impl_->mu);
  return impl_->node_id;
}

absl::StatusOr<NodeId> MasterClient::RegisterOnce() {
  v1::RegisterNodeRequest req;
  req.set_node(impl_->opt.node);
  {
    std::lock_guard lock(impl_->mu);
    req.set_control_address(impl_->opt.control_address);
  }
  *req.mutable_data_plane() = impl_->opt.data_plane;
  *req.mutable_capabilities() = impl_->opt.capabilities;
  req.set_software_version(impl_->opt.software_version);
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline(impl_->opt.rpc_timeout));
  v1::RegisterNodeResponse resp;
  auto st = impl_->stub->RegisterNode(&ctx, req, &resp);
  if (!st.ok()) {
    return ToAbsl(st, fmt::format("registering node '{}' with the master at {}", impl_->opt.node, impl_->opt.master_address));
  }
  NodeId id(static_cast<uint16_t>(resp.node_id()));
  {
    std::lock_guard lock(impl_->mu);
    impl_->node_id = id;
    impl_->incarnation = resp.incarnation();
    impl_->interval = absl::Milliseconds(std::max<uint32_t>(10, resp.heartbeat_interval_ms()));
  }
  ++registrations_;
  impl_->Log(fmt::format("registered node '{}' with the master at {}: node id {}, heartbeat every {} ms",
                         impl_->opt.node, impl_->opt.master_address, resp.node_id(), resp.heartbeat_interval_ms()));
  if (impl_->opt.on_registered) impl_->opt.on_registered(id);
  return id;
}

absl::Status MasterClient::Start(absl::Duration deadline) {
  const absl::Time end = absl::Now() + deadline;
  absl::Status last;
  while (true) {
    auto id = RegisterOnce();
    if (id.ok()) break;
    last = id.status();
    const auto code = last.code();
    // Retry what may resolve itself: the master starting up, or our previous registration not yet marked LOST.
    const bool retry = code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kDeadlineExceeded ||
                       code == absl::StatusCode::kAlreadyExists;
    if (!retry || absl::Now() + impl_->opt.register_retry > end) return last;
    std::unique_lock lock(impl_->mu);
    if (impl_->cv.wait_for(lock, absl::ToChronoNanoseconds(impl_->opt.register_retry), [&] { return impl_->stopping; })) {
      return absl::CancelledError("stopped while registering");
    }
  }

  impl_->heartbeat_thread = std::thread([this] {
    NameThisThread("heartbeat");
    Impl& im = *impl_;
    std::unique_lock lock(im.mu);
    bool need_register = false;
    while (!im.stopping) {
      im.cv.wait_for(lock, absl::ToChronoNanoseconds(im.interval), [&] { return im.stopping; });
      if (im.stopping) break;
      v1::HeartbeatRequest req;
      req.set_node(im.opt.node);
      req.set_node_id(im.node_id.value());
      req.set_incarnation(im.incarnation);
      lock.unlock();
      if (need_register) {
        need_register = !RegisterOnce().ok();
      } else {
        req.set_sent_ns(MonotonicNanos());
        grpc::ClientContext ctx;
        ctx.set_deadline(Deadline(im.opt.rpc_timeout));
        v1::HeartbeatResponse resp;
        auto st = im.stub->Heartbeat(&ctx, req, &resp);
        if (st.ok()) {
          ++heartbeats_ok_;
        } else {
          ++heartbeat_failures_;
          im.Log(fmt::format("heartbeat refused by the master at {}: {}", im.opt.master_address, st.error_message()));
          if (st.error_code() == grpc::StatusCode::NOT_FOUND) need_register = !RegisterOnce().ok();
        }
      }
      lock.lock();
    }
  });

  impl_->output_thread = std::thread([this] {
    NameThisThread("guest-output");
    Impl& im = *impl_;
    std::unique_lock lock(im.mu);
    while (!im.stopping) {
      im.cv.wait(lock, [&] { return im.stopping || !im.output.empty(); });
      if (im.stopping) break;
      // One stream per burst of output; it stays open while events keep coming.
      grpc::ClientContext ctx;
      v1::ReportGuestOutputResponse resp;
      im.output_ctx = &ctx;
      lock.unlock();
      auto writer = im.stub->ReportGuestOutput(&ctx, &resp);
      lock.lock();
      while (!im.stopping) {
        if (im.output.empty()) {
          if (!im.cv.wait_for(lock, std::chrono::seconds(1), [&] { return im.stopping || !im.output.empty(); })) break;
          continue;
        }
        v1::Event e = std::move(im.output.front());
        im.output.pop_front();
        lock.unlock();
        const bool ok = writer->Write(e);
        lock.lock();
        if (!ok) {
          ++output_dropped_;
          break;
        }
      }
      im.output_ctx = nullptr;
      lock.unlock();
      writer->WritesDone();
      (void)writer->Finish();
      lock.lock();
    }
  });
  return absl::OkStatus();
}

void MasterClient::Stop() {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stopping && !impl_->heartbeat_thread.joinable() && !impl_->output_thread.joinable()) return;
    impl_->stopping = true;
    if (impl_->output_ctx) impl_->output_ctx->TryCancel();
  }
  impl_->cv.notify_all();
  if (impl_->heartbeat_thread.joinable()) impl_->heartbeat_thread.join();
  if (impl_->output_thread.joinable()) impl_->output_thread.join();
}

void MasterClient::Enqueue(v1::Event e) {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stopping || impl_->output.size() >= kOutputQueueLimit) {
      ++output_dropped_;
      return;
    }
    impl_->output.push_back(std::move(e));
  }
  impl_->cv.notify_all();
}

void MasterClient::ConsoleLine(const std::string& vm, VcpuIndex vcpu, std::string_view text) {
  v1::Event e;
  auto* c = e.mutable_console();
  c->set_vm(vm);
  c->set_vcpu(vcpu.value());
  c->set_node(impl_->opt.node);
  c->set_text(std::string(text));
  Enqueue(std::move(e));
}

void MasterClient::Record(const std::string& vm, VcpuIndex vcpu, uint32_t type, uint64_t a, uint64_t b, uint64_t c,
                          uint64_t d) {
  v1::Event e;
  auto* r = e.mutable_record();
  r->set_vm(vm);
  r->set_vcpu(vcpu.value());
  r->set_node(impl_->opt.node);
  r->set_type(type);
  r->set_a(a);
  r->set_b(b);
  r->set_c(c);
  r->set_d(d);
  Enqueue(std::move(e));
}

}  // namespace aggvm::agent::control
