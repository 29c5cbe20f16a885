// The experiment file: defaults, the matrix's cartesian product in a stable order, and refusals that name the field.
#include "lab/runner/experiment.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace aggvm::lab::runner {
namespace {

TEST(Experiment, DefaultsAndMatrixExpansion) {
  auto e = Experiment::FromJsonString(R"({"name": "m", "matrix": {"transport": ["tcp-epoll", "tcp-busy-poll"],
                                          "irqchip": ["kernel", "user"], "route_mode": ["direct"]}})");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->workload, "doorbell");
  EXPECT_EQ(e->samples, 200u);
  EXPECT_EQ(e->broadcast_dest, "all-excluding-self");
  const auto configs = e->Expand();
  ASSERT_EQ(configs.size(), 4u);
  EXPECT_EQ(configs[0].transport, "tcp-epoll");
  EXPECT_EQ(configs[0].irqchip, "kernel");
  EXPECT_EQ(configs[1].irqchip, "user");
  EXPECT_EQ(configs[2].transport, "tcp-busy-poll");
  for (const auto& c : configs) {
    EXPECT_EQ(c.route_mode, "direct");
    EXPECT_EQ(c.routing_policy, "sdm");
    EXPECT_EQ(c.Labels().size(), 5u);
  }
  // ToJson -> FromJson gives the same experiment (what a results file records can be run again).
  auto back = Experiment::FromJson(e->ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), e->ToJson());
}

TEST(Experiment, RefusalsNameTheField) {
  struct Case {
    const char* text;
    const char* field;
  };
  const Case cases[] = {
      {R"({"workload": "doorbell"})", "'name'"},
      {R"({"name": "x", "workload": "dorbell"})", "'workload'"},
      {R"({"name": "x", "samples": 0})", "'samples'"},
      {R"({"name": "x", "sample": 10})", "'sample'"},
      {R"({"name": "x", "matrix": {"transport": ["tcp"]}})", "'matrix.transport'"},
      {R"({"name": "x", "matrix": {"transport": []}})", "'matrix.transport'"},
      {R"({"name": "x", "matrix": {"irqchip": ["user", "user"]}})", "'matrix.irqchip'"},
      {R"({"name": "x", "matrix": {"wait": ["busy"]}})", "'matrix.wait'"},
      {R"({"name": "x", "storm": {"rate_hz": 0}})", "'storm.rate_hz'"},
      {R"({"name": "x", "storm": {"rate_hz": 200000}})", "'storm.rate_hz'"},
      {R"({"name": "x", "storm": {"rate_hz": 100000, "seconds": 20}})", "'storm.seconds'"},
      {R"({"name": "x", "storm": {"rate_hz": 1.5, "seconds": 600}})", "'storm.seconds'"},  // 900 x 666667 µs
      {R"({"name": "x", "workload": "storm", "trace_cost": true})", "'trace_cost'"},
      {R"({"name": "x", "nodes": 1})", "'nodes'"},
      {R"({"name": "x", "workload": "ipi-broadcast", "broadcast_dest": "x2apic-logical"})", "'broadcast_dest'"},
      {R"({"name": "x", "broadcast_dest": 3})", "'broadcast_dest'"},
      {R"({"name": "x", "trace_cost_control": true})", "'trace_cost_control'"},
      {R"({"name": "x", "pace_us": -1})", "'pace_us'"},
      {R"({"name": "x", "pace_us": 2e6})", "'pace_us'"},
      {R"({"name": "x", "workload": "ipi-pingpong", "pace_us": 3000})", "'pace_us'"},
      {R"([1, 2])", "'(top)'"},
  };
  for (const auto& c : cases) {
    auto e = Experiment::FromJsonString(c.text);
    ASSERT_FALSE(e.ok()) << c.text;
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(e.status().message().find(c.field), std::string::npos) << c.text << " -> " << e.status();
  }
  EXPECT_FALSE(Experiment::FromJsonString("{not json").ok());
}

TEST(Experiment, BroadcastDestinationRoundTrips) {
  auto e = Experiment::FromJsonString(
      R"({"name": "b", "workload": "ipi-broadcast", "broadcast_dest": "all-including-self", "nodes": 3})");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->broadcast_dest, "all-including-self");
  auto back = Experiment::FromJson(e->ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->broadcast_dest, "all-including-self");
  EXPECT_EQ(back->Expand().front().workload, "ipi-broadcast");
}

TEST(Experiment, PaceRoundTrips) {
  auto e = Experiment::FromJsonString(R"({"name": "p", "trace_cost": true, "pace_us": 4000})");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->pace_us, 4000);
  auto back = Experiment::FromJson(e->ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->pace_us, 4000);
  auto unpaced = Experiment::FromJsonString(R"({"name": "u"})");
  ASSERT_TRUE(unpaced.ok());
  EXPECT_EQ(unpaced->pace_us, 0) << "by default a ring follows as soon as the previous one's records are back";
}

}  // namespace
}  // namespace aggvm::lab::runner
