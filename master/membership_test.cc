// Membership rules with made-up times: ids, double registration, incarnations, loss detection.
#include "master/membership.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace aggvm::master {
namespace {

using ::testing::HasSubstr;

v1::RegisterNodeRequest Req(const std::string& name, const std::string& addr = "127.0.0.1:5000") {
  v1::RegisterNodeRequest r;
  r.set_node(name);
  r.set_control_address(addr);
  return r;
}

v1::HeartbeatRequest Beat(const NodeRecord& n) {
  v1::HeartbeatRequest h;
  h.set_node(n.name);
  h.set_node_id(n.id.value());
  h.set_incarnation(n.incarnation);
  return h;
}

const absl::Time t0 = absl::FromUnixSeconds(1000);

TEST(Membership, AssignsDistinctIdsFromOne) {
  Membership m(absl::Milliseconds(100), 3);
  auto a = m.Register(Req("a"), t0);
  auto b = m.Register(Req("b"), t0);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->id, NodeId(1));
  EXPECT_EQ(b->id, NodeId(2));
  EXPECT_EQ(m.Nodes().size(), 2u);
}

TEST(Membership, RefusesSecondRegistrationWhileAlive) {
  Membership m(absl::Milliseconds(100), 3);
  ASSERT_TRUE(m.Register(Req("a"), t0).ok());
  auto again = m.Register(Req("a", "127.0.0.1:6000"), t0 + absl::Milliseconds(50));
  ASSERT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(again.status().message()), HasSubstr("node 'a' is already registered and alive (node id 1"));
}

TEST(Membership, RejectsBadNamesAndAddresses) {
  Membership m(absl::Milliseconds(100), 3);
  EXPECT_THAT(std::string(m.Register(Req(""), t0).status().message()), HasSubstr("not a node name"));
  EXPECT_THAT(std::string(m.Register(Req("a b"), t0).status().message()), HasSubstr("not a node name"));
  EXPECT_THAT(std::string(m.Register(Req("a", "nowhere"), t0).status().message()), HasSubstr("control_address"));
}

TEST(Membership, LostAfterMissedIntervalsThenRejoinsWithSameId) {
  Membership m(absl::Milliseconds(100), 3);
  auto a = m.Register(Req("a"), t0);
  auto b = m.Register(Req("b"), t0);
  ASSERT_TRUE(a.ok() && b.ok());
  // b keeps beating, a goes silent.
  for (int i = 1; i <= 4; ++i) ASSERT_TRUE(m.Heartbeat(Beat(*b), t0 + absl::Milliseconds(100 * i)).ok());
  EXPECT_TRUE(m.Sweep(t0 + absl::Milliseconds(300)).empty());  // exactly 3 intervals: not yet
  auto lost = m.Sweep(t0 + absl::Milliseconds(301));
  ASSERT_EQ(lost.size(), 1u);
  EXPECT_EQ(lost[0].name, "a");
  EXPECT_EQ(m.Find("a")->health, v1::NODE_HEALTH_LOST);
  EXPECT_TRUE(m.Sweep(t0 + absl::Milliseconds(500)).empty()) << "reported once";
  // A late heartbeat of the lost registration is refused: register again.
  auto late = m.Heartbeat(Beat(*a), t0 + absl::Milliseconds(510));
  EXPECT_EQ(late.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(late.message()), HasSubstr("marked LOST"));
  auto again = m.Register(Req("a"), t0 + absl::Milliseconds(520));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id, a->id);
  EXPECT_NE(again->incarnation, a->incarnation);
  // The old incarnation cannot keep the new registration alive.
  EXPECT_EQ(m.Heartbeat(Beat(*a), t0 + absl::Milliseconds(530)).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(m.Heartbeat(Beat(*again), t0 + absl::Milliseconds(530)).ok());
}

TEST(Membership, StatusReportsHeartbeatAge) {
  Membership m(absl::Milliseconds(100), 3);
  auto a = m.Register(Req("a"), t0);
  ASSERT_TRUE(a.ok());
  auto s = m.Status(*m.Find("a"), t0 + absl::Milliseconds(250));
  EXPECT_EQ(s.last_heartbeat_ms_ago(), 250u);
  EXPECT_EQ(s.health(), v1::NODE_HEALTH_UP);
  EXPECT_EQ(s.node_id(), 1u);
}

TEST(Membership, UnknownNodeHeartbeat) {
  Membership m(absl::Milliseconds(100), 3);
  v1::HeartbeatRequest h;
  h.set_node("ghost");
  EXPECT_EQ(m.Heartbeat(h, t0).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace aggvm::master
