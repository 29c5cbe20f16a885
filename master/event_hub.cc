#include "master/event_hub.h"

#include <algorithm>

#include "common/clock.h"

namespace aggvm::master {

struct EventHub::Subscription::Queue {
  Filter filter;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<v1::Event> events;  // guarded by mu
  bool closed = false;           // guarded by mu
  uint64_t dropped = 0;          // guarded by mu
};

EventHub::Subscription::~Subscription() { hub_->Unsubscribe(q_.get()); }

std::optional<v1::Event> EventHub::Subscription::Next(absl::Duration timeout) {
  std::unique_lock lock(q_->mu);
  q_->cv.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return q_->closed || !q_->events.empty(); });
  if (q_->events.empty()) return std::nullopt;
  v1::Event e = std::move(q_->events.front());
  q_->events.pop_front();
  return e;
}

bool EventHub::Subscription::closed() const {
  std::lock_guard lock(q_->mu);
  return q_->closed;
}

uint64_t EventHub::Subscription::dropped() const {
  std::lock_guard lock(q_->mu);
  return q_->dropped;
}

EventHub::~EventHub() { Close(); }

std::unique_ptr<EventHub::Subscription> EventHub::Subscribe(Filter filter) {
  auto q = std::make_shared<Subscription::Queue>();
  q->filter = std::move(filter);
  std::lock_guard lock(mu_);
  if (closed_) {
    q->closed = true;
  } else {
    subs_.push_back(q);
  }
  return std::unique_ptr<Subscription>(new Subscription(this, std::move(q)));
}

void EventHub::Publish(v1::Event event) {
  if (event.time_ns() == 0) event.set_time_ns(MonotonicNanos());
  std::lock_guard lock(mu_);
  for (const auto& q : subs_) {
    if (q->filter && !q->filter(event)) continue;
    {
      std::lock_guard ql(q->mu);
      if (q->events.size() >= queue_limit_) {
        q->events.pop_front();
        ++q->dropped;
      }
      q->events.push_back(event);
    }
    q->cv.notify_one();
  }
}

void EventHub::Close() {
  std::lock_guard lock(mu_);
  closed_ = true;
  for (const auto& q : subs_) {
    {
      std::lock_guard ql(q->mu);
      q->closed = true;
    }
    q->cv.notify_all();
  }
}

size_t EventHub::subscribers() const {
  std::lock_guard lock(mu_);
  return subs_.size();
}

void EventHub::Unsubscribe(const Subscription::Queue* q) {
  std::lock_guard lock(mu_);
  subs_.erase(std::remove_if(subs_.begin(), subs_.end(), [&](const auto& s) { return s.get() == q; }), subs_.end());
}

}  // namespace aggvm::master
