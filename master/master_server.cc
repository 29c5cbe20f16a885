#include "master/master_server.h"

#include <condition_variable>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include "master/describe.h"
#include "master/master_service.h"

namespace aggvm::master {

struct MasterServer::Impl {
  std::unique_ptr<MasterService> service;
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
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(), &impl->port);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return absl::UnavailableError(fmt::format(
        "cannot listen on '{}' (address in use or not host:port?); pick another --listen address",
        options.listen_address));
  }
  // Check for loss a few times per heartbeat interval so a LOST node is reported within ~lost_after + interval/4.
  impl->sweeper = std::thread([p = impl.get(), period = options.heartbeat_interval / 4] { p->SweepLoop(period); });
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

void MasterServer::Shutdown(absl::Duration grace) {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stopping) return;
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
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
