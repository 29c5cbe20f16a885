#include "common/thread.h"

#include <sched.h>

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
  } cases[] = {{"", "empty"}, {"1,", "''"}, {"a", "'a'"}, {"1-", "'1-'"}, {"-1", "'-1'"}, {"3-1", "reversed"},
               {"0,1-x", "'1-x'"}, {"99999", "above"}, {" 1", "' 1'"}};
  for (const auto& k : cases) {
    auto c = ParseCpuList(k.text);
    ASSERT_FALSE(c.ok()) << "'" << k.text << "' accepted";
    EXPECT_NE(c.status().message().find(k.names), std::string::npos) << k.text << ": " << c.status();
  }
}

TEST(Thread, NameAndPinApplyToTheCallingThreadOnly) {
  std::vector<int> allowed;
  cpu_set_t mine;
  ASSERT_EQ(sched_getaffinity(0, sizeof mine, &mine), 0);
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &mine)) allowed.push_back(c);
  }
  ASSERT_FALSE(allowed.empty());
  std::string name;
  std::vector<int> seen;
  absl::Status pinned;
  std::thread t([&] {
    NameThisThread("a-name-longer-than-fifteen");
    std::ifstream("/proc/thread-self/comm") >> name;
    pinned = PinThisThread({allowed.back()});
    cpu_set_t s;
    if (pthread_getaffinity_np(pthread_self(), sizeof s, &s) == 0) {
      for (int c = 0; c < CPU_SETSIZE; ++c) {
        if (CPU_ISSET(c, &s)) seen.push_back(c);
      }
    }
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

}  // namespace
}  // namespace aggvm
