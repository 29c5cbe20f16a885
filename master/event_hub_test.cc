// EventHub: filtering, bounded queues that drop the oldest, Close() waking a blocked subscriber.
#include "master/event_hub.h"

#include <thread>

#include "absl/time/clock.h"

#include <gtest/gtest.h>

namespace aggvm::master {
namespace {

v1::Event Console(const std::string& vm, const std::string& text) {
  v1::Event e;
  e.mutable_console()->set_vm(vm);
  e.mutable_console()->set_text(text);
  return e;
}

TEST(EventHub, DeliversInOrderWithFilter) {
  EventHub hub;
  auto all = hub.Subscribe(nullptr);
  auto only_x = hub.Subscribe([](const v1::Event& e) { return e.console().vm() == "x"; });
  hub.Publish(Console("x", "1"));
  hub.Publish(Console("y", "2"));
  hub.Publish(Console("x", "3"));
  for (const char* t : {"1", "2", "3"}) {
    auto e = all->Next(absl::Seconds(1));
    ASSERT_TRUE(e);
    EXPECT_EQ(e->console().text(), t);
    EXPECT_NE(e->time_ns(), 0u);
  }
  EXPECT_EQ(only_x->Next(absl::Seconds(1))->console().text(), "1");
  EXPECT_EQ(only_x->Next(absl::Seconds(1))->console().text(), "3");
  EXPECT_FALSE(only_x->Next(absl::Milliseconds(10)));
  EXPECT_FALSE(only_x->closed());
}

TEST(EventHub, SlowSubscriberDropsOldest) {
  EventHub hub(4);
  auto sub = hub.Subscribe(nullptr);
  for (int i = 0; i < 10; ++i) hub.Publish(Console("x", std::to_string(i)));
  EXPECT_EQ(sub->dropped(), 6u);
  EXPECT_EQ(sub->Next(absl::Seconds(1))->console().text(), "6");
}

TEST(EventHub, CloseWakesBlockedSubscriber) {
  EventHub hub;
  auto sub = hub.Subscribe(nullptr);
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    hub.Close();
  });
  const absl::Time start = absl::Now();
  EXPECT_FALSE(sub->Next(absl::Seconds(30)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_TRUE(sub->closed());
  closer.join();
}

TEST(EventHub, UnsubscribesOnDestruction) {
  EventHub hub;
  { auto sub = hub.Subscribe(nullptr); EXPECT_EQ(hub.subscribers(), 1u); }
  EXPECT_EQ(hub.subscribers(), 0u);
}

}  // namespace
}  // namespace aggvm::master
