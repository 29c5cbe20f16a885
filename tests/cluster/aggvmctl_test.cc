// The aggvmctl binary against an in-process master and agents: output an operator reads, exit codes, and errors
// when the master is unreachable or a spec is bad.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/cluster/cluster_fixture.h"

namespace aggvm::testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;

struct Run {
  int exit_code = -1;
  std::string output;  // stdout + stderr
};

Run Ctl(const std::string& args) {
  const std::string cmd = std::string(AGGVMCTL_BIN) + " " + args + " 2>&1";
  Run r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// A port nothing listens on (bound then closed).
int DeadPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

std::string WriteSpec(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/" + name + "_" + std::to_string(getpid()) + ".textproto";
  std::ofstream(path) << text;
  return path;
}

TEST(Aggvmctl, UnreachableMasterIsAClearError) {
  const auto r = Ctl(fmt::format("--master 127.0.0.1:{} --timeout 2 status", DeadPort()));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_THAT(r.output, AllOf(HasSubstr("cannot reach the master at 127.0.0.1:"), HasSubstr("is aggvm-master running")));
}

TEST(Aggvmctl, StatusCreateStartTopologyStop) {
  TestCluster c;
  for (const char* n : {"node-a", "node-b", "node-c"}) ASSERT_TRUE(c.StartAgent(n).ok());
  const std::string m = "--master " + c.address() + " ";

  auto status = Ctl(m + "status");
  ASSERT_EQ(status.exit_code, 0) << status.output;
  EXPECT_THAT(status.output, HasSubstr("3 node(s), 0 VM(s)"));
  EXPECT_THAT(status.output, MatchesRegex("(.|\n)*node-b +2 UP +[0-9]+ ms 127.0.0.1:[0-9]+ +-(.|\n)*"));

  auto create = Ctl(m + "vm create " + std::string(AGGVM_SOURCE_DIR) + "/deploy/examples/probe-3x2.textproto");
  ASSERT_EQ(create.exit_code, 0) << create.output;
  EXPECT_THAT(create.output, HasSubstr("vm probe-3x2 CREATED"));

  auto list = Ctl(m + "vm list");
  EXPECT_THAT(list.output, MatchesRegex("(.|\n)*probe-3x2 +CREATED +6 +64 hello +node-a\\[0,1\\] node-b\\[2,3\\] "
                                        "node-c\\[4,5\\](.|\n)*"));

  auto topo = Ctl(m + "vm topology probe-3x2");
  ASSERT_EQ(topo.exit_code, 0) << topo.output;
  EXPECT_THAT(topo.output, MatchesRegex("(.|\n)*\n +3 node-b +2 +3\n(.|\n)*"));

  // console follows in the background; start the VM once it is listening (it prints the VM's state first).
  FILE* console = popen((std::string(AGGVMCTL_BIN) + " " + m + "console probe-3x2 --follow --lines 6 --for 20").c_str(), "r");
  ASSERT_NE(console, nullptr);
  char line[512];
  ASSERT_NE(fgets(line, sizeof line, console), nullptr);
  EXPECT_THAT(line, HasSubstr("-- vm probe-3x2 CREATED"));
  auto start = Ctl(m + "vm start probe-3x2");
  ASSERT_EQ(start.exit_code, 0) << start.output;
  EXPECT_THAT(start.output, HasSubstr("vm probe-3x2 RUNNING"));
  std::string follow;
  while (fgets(line, sizeof line, console)) follow += line;
  EXPECT_EQ(pclose(console), 0) << follow;
  for (int v = 0; v < 6; ++v) {
    const char* node = v < 2 ? "node-a" : v < 4 ? "node-b" : "node-c";
    EXPECT_THAT(follow, HasSubstr(fmt::format("[vcpu {} @ {}] hello from vCPU {} on {}", v, node, v, node)));
  }

  auto routing = Ctl(m + "vm routing probe-3x2");  // served by the master's running global controller
  EXPECT_EQ(routing.exit_code, 0) << routing.output;
  EXPECT_THAT(routing.output, HasSubstr("vm probe-3x2 policy round-robin"));
  EXPECT_THAT(routing.output, HasSubstr("counters:"));
  auto policy = Ctl(m + "vm policy probe-3x2 static --pin 0x44=5");
  EXPECT_EQ(policy.exit_code, 0) << policy.output;
  EXPECT_THAT(policy.output, HasSubstr("static pin: vector 0x44 -> vCPU 5"));
  auto bad_pin = Ctl(m + "vm policy probe-3x2 static --pin 0x44=9");
  EXPECT_EQ(bad_pin.exit_code, 1);
  EXPECT_THAT(bad_pin.output, HasSubstr("static_routes[0].vcpu: vCPU 9 does not exist"));
  auto ring = Ctl(m + "doorbell probe-3x2 --node node-a --gsi 4");
  EXPECT_EQ(ring.exit_code, 0) << ring.output;
  EXPECT_THAT(ring.output, HasSubstr("rang GSI 4 on node node-a"));
  auto ring_bad = Ctl(m + "doorbell probe-3x2 --node node-x --gsi 4");
  EXPECT_EQ(ring_bad.exit_code, 1);
  EXPECT_THAT(ring_bad.output, HasSubstr("has no vCPU on node 'node-x'"));

  auto stop = Ctl(m + "vm stop probe-3x2");
  ASSERT_EQ(stop.exit_code, 0) << stop.output;
  EXPECT_THAT(stop.output, HasSubstr("vm probe-3x2 STOPPED"));
  EXPECT_EQ(c.host("node-a").Times("stop"), 1u);
}

TEST(Aggvmctl, BadSpecsAreRefusedWithTheField) {
  TestCluster c;
  ASSERT_TRUE(c.StartAgent("node-a").ok());
  const std::string m = "--master " + c.address() + " ";
  const auto unknown = WriteSpec("unknown", "name: \"x\" vcpus: 2 placement { node: \"node-z\" vcpus: [0, 1] }");
  auto r = Ctl(m + "vm create " + unknown);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("placement[0].node: unknown node 'node-z'; registered nodes: [node-a]"));

  const auto syntax = WriteSpec("syntax", "name: \"x\"\nvcpus: two\n");
  r = Ctl(m + "vm create " + syntax);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("line 2"));

  // Offline validation needs no master.
  const auto zero = WriteSpec("zero", "name: \"x\" vcpus: 0 placement { node: \"n\" vcpus: [0] }");
  r = Ctl("vm validate " + zero);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("vcpus: 0 vCPUs"));
  r = Ctl("vm validate " + std::string(AGGVM_SOURCE_DIR) + "/deploy/examples/probe-3x2.json");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("is valid: probe-3x2-json: 6 vCPUs"));
  for (const auto& f : {unknown, syntax, zero}) unlink(f.c_str());
}

}  // namespace
}  // namespace aggvm::testing
