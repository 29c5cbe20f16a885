#include "common/thread.h"

#include <sched.h>

#include <atomic>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

namespace aggvm {
namespace {

TEST(CpuList, ParsesNumbersAndRangesSortedWithoutDuplicates) {
  auto c = ParseCpuList("3,0-1,1,8-9");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(*c, (std::vector<int>{0, 1, 3, 8, 9}));
  EXPECT_EQ(FormatCpuList(*c), "0-1,3,8-9");
  auto one = ParseCpuList("5");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, std::vector<int>{5});
  EXPECT_EQ(FormatCpuList(*one), "5");
}

TEST(CpuList, BadListsAreRefusedNamingThePart) {
  struct Case {
    const char* text;
    const char* names;
  } cases[] = {{"", "empty"},          {"1,", ": '' is not"},     {",1", ": '' is not"},   {"a", ": 'a' is not"},
               {"1-", ": '1-' is not"}, {"-1", ": '-1' is not"},   {"+1", ": '+1' is not"}, {"1--2", ": '1--2' is not"},
               {"0--0", ": '0--0' is not"}, {"3-1", "'3-1' is reversed"}, {"0,1-x", ": '1-x' is not"},
               {"99999", "CPU 99999 is above"}, {"99999999999", "'99999999999' is not"}, {" 1", ": ' 1' is not"},
               {"1-2-3", ": '1-2-3' is not"}};
  for (const auto& k : cases) {
    auto c = ParseCpuList(k.text);
    ASSERT_FALSE(c.ok()) << "'" << k.text << "' accepted";
    EXPECT_NE(c.status().message().find(k.names), std::string::npos) << k.text << ": " << c.status();
  }
}

TEST(CpuListFlag, EmptyIsNoPlacementAndUnusableCpusAreRefusedByName) {
  auto none = CpuListFlag("--x", "");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  const std::vector<int> mine = ThreadCpus(pthread_self());
  ASSERT_FALSE(mine.empty());
  auto ok = CpuListFlag("--x", FormatCpuList(mine));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*ok, mine);
  EXPECT_EQ(ThreadCpus(pthread_self()), mine) << "the check runs on a scratch thread";
  // Wholly unusable, and partly usable (the kernel would keep the usable part silently).
  const int unusable = CPU_SETSIZE - 1;
  auto whole = CpuListFlag("--vcpu-cpus", std::to_string(unusable));
  ASSERT_FALSE(whole.ok());
  EXPECT_NE(whole.status().message().find("--vcpu-cpus " + std::to_string(unusable)), std::string::npos)
      << whole.status();
  auto part = CpuListFlag("--dataplane-cpus", fmt::format("{},{}", mine.front(), unusable));
  ASSERT_FALSE(part.ok());
  EXPECT_NE(part.status().message().find(fmt::format("CPUs {} cannot be used", unusable)), std::string::npos)
      << part.status();
  auto bad = CpuListFlag("--cpus", "x");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--cpus: CPU list 'x'"), std::string::npos) << bad.status();
}

TEST(Thread, NameAndPinApplyToTheCallingThreadOnly) {
  cpu_set_t mine;
  ASSERT_EQ(sched_getaffinity(0, sizeof mine, &mine), 0);
  const std::vector<int> allowed = CpusIn(mine);
  ASSERT_FALSE(allowed.empty());
  std::string name;
  std::vector<int> seen;
  absl::Status pinned;
  std::thread t([&] {
    NameThisThread("a-name-longer-than-fifteen");
    std::ifstream("/proc/thread-self/comm") >> name;
    pinned = PinThisThread({allowed.back()});
    seen = ThreadCpus(pthread_self());
  });
  t.join();
  EXPECT_EQ(name, "a-name-longer-t");
  ASSERT_TRUE(pinned.ok()) << pinned;
  EXPECT_EQ(seen, std::vector<int>{allowed.back()});
  cpu_set_t after;
  ASSERT_EQ(sched_getaffinity(0, sizeof after, &after), 0);
  EXPECT_TRUE(CPU_EQUAL(&after, &mine)) << "the caller's own placement changed";
  // A CPU this process may not use is refused with the CPU named.
  auto bad = [&] {
    absl::Status st;
    std::thread([&] { st = PinThisThread({CPU_SETSIZE - 1}); }).join();
    return st;
  }();
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find(std::to_string(CPU_SETSIZE - 1)), std::string::npos) << bad;
}

// The placement checks below mean something where this process may use two CPUs or more (CI's machines have two).
TEST(StartPlacedThread, RunsTheBodyNamedAndPlacedOrReportsTheRefusalWithoutRunningIt) {
  const std::vector<int> allowed = ThreadCpus(pthread_self());
  ASSERT_FALSE(allowed.empty());
  std::string name;
  std::vector<int> seen;
  std::atomic<bool> stopped{false};
  auto t = StartPlacedThread("placed-one", {allowed.back()}, [&](std::stop_token stop) {
    std::ifstream("/proc/thread-self/comm") >> name;
    seen = ThreadCpus(pthread_self());
    while (!stop.stop_requested()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    stopped = true;
  });
  ASSERT_TRUE(t.ok()) << t.status();
  t->request_stop();  // the body ends on the thread's own stop token
  t->join();
  EXPECT_TRUE(stopped);
  EXPECT_EQ(name, "placed-one");
  EXPECT_EQ(seen, std::vector<int>{allowed.back()});
  EXPECT_EQ(ThreadCpus(pthread_self()), allowed) << "the creator's placement changed";

  // No CPUs: the thread runs where its creator may.
  auto free = StartPlacedThread("unplaced", {}, [&](std::stop_token) { seen = ThreadCpus(pthread_self()); });
  ASSERT_TRUE(free.ok()) << free.status();
  free->join();
  EXPECT_EQ(seen, allowed);

  // A refused placement is returned, and the body never ran.
  std::atomic<bool> ran{false};
  auto refused = StartPlacedThread("refused", {CPU_SETSIZE - 1}, [&](std::stop_token) { ran = true; });
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find(std::to_string(CPU_SETSIZE - 1)), std::string::npos) << refused.status();
  EXPECT_FALSE(ran);
}

TEST(ScopedPlacement, PlacesTheThreadForItsLifetimeThenPutsItBack) {
  const std::vector<int> allowed = ThreadCpus(pthread_self());
  ASSERT_FALSE(allowed.empty());
  std::vector<int> inside, after, after_refused;
  absl::Status placed, refused;
  std::thread([&] {
    {
      const ScopedPlacement p({allowed.back()});
      placed = p.status();
      inside = ThreadCpus(pthread_self());
    }
    after = ThreadCpus(pthread_self());
    {
      const ScopedPlacement p({CPU_SETSIZE - 1});
      refused = p.status();
    }
    after_refused = ThreadCpus(pthread_self());
  }).join();
  ASSERT_TRUE(placed.ok()) << placed;
  EXPECT_EQ(inside, std::vector<int>{allowed.back()});
  EXPECT_EQ(after, allowed);
  EXPECT_FALSE(refused.ok());
  EXPECT_EQ(after_refused, allowed);
}

}  // namespace
}  // namespace aggvm
