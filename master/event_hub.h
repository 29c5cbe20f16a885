// Fan-out of master events (node joined/lost, VM state changes, guest console lines) to WatchEvents streams.
//
// Each subscriber has its own bounded queue: a slow watcher loses its oldest events (counted in dropped()), it never
// blocks the publisher. Close() wakes every subscriber so streaming handlers end when the master shuts down.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "absl/time/time.h"
#include "proto/aggvm.pb.h"

namespace aggvm::master {

class EventHub {
 public:
  using Filter = std::function<bool(const v1::Event&)>;

  class Subscription {
   public:
    ~Subscription();
    Subscription(const Subscription&) = delete;
    Subscription& operator=(const Subscription&) = delete;
    /// The next event, or nullopt after `timeout` or once the hub is closed (see closed()).
    std::optional<v1::Event> Next(absl::Duration timeout);
    [[nodiscard]] bool closed() const;
    [[nodiscard]] uint64_t dropped() const;

   private:
    friend class EventHub;
    struct Queue;
    Subscription(EventHub* hub, std::shared_ptr<Queue> q) : hub_(hub), q_(std::move(q)) {}
    EventHub* hub_;
    std::shared_ptr<Queue> q_;
  };

  explicit EventHub(size_t queue_limit = 4096) : queue_limit_(queue_limit) {}
  ~EventHub();

  /// Events for which `filter` returns true (every event if empty). The hub must outlive the subscription.
  std::unique_ptr<Subscription> Subscribe(Filter filter);
  /// Stamps time_ns (CLOCK_MONOTONIC) when unset and queues the event for every matching subscriber.
  void Publish(v1::Event event);
  /// Ends every subscription (Next returns nullopt at once) and refuses new ones' events.
  void Close();
  [[nodiscard]] size_t subscribers() const;

 private:
  void Unsubscribe(const Subscription::Queue* q);

  const size_t queue_limit_;
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<Subscription::Queue>> subs_;  // guarded by mu_
  bool closed_ = false;                                      // guarded by mu_
};

}  // namespace aggvm::master
