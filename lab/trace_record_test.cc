#include "lab/trace_record.h"

#include <gtest/gtest.h>

namespace aggvm::lab {
namespace {

transport::TraceBlock Block() {
  transport::TraceBlock t;
  t.raised = 5'000'000'000'123;
  t.local_controller = t.raised + 180;
  t.master_received = t.raised + 46'000;
  t.master_decided = t.raised + 47'500;
  t.target_received = t.raised + 84'000;
  t.injected = t.raised + 90'000;
  return t;
}

TEST(TraceRecord, EveryStampSurvivesTheRoundTrip) {
  const transport::TraceBlock t = Block();
  const TraceRecordWords w = EncodeTraceRecord(t);
  const transport::TraceBlock back = DecodeTraceRecord(w.a, w.b, w.c, w.d);
  EXPECT_EQ(back.raised, t.raised);
  EXPECT_EQ(back.local_controller, t.local_controller);
  EXPECT_EQ(back.master_received, t.master_received);
  EXPECT_EQ(back.master_decided, t.master_decided);
  EXPECT_EQ(back.target_received, t.target_received);
  EXPECT_EQ(back.injected, t.injected);
}

TEST(TraceRecord, MissingOrEarlierStampsDecodeAsNotStamped) {
  transport::TraceBlock t = Block();
  t.master_decided = 0;               // not stamped
  t.target_received = t.raised - 10;  // before raised (another machine's clock): not representable
  const TraceRecordWords w = EncodeTraceRecord(t);
  const transport::TraceBlock back = DecodeTraceRecord(w.a, w.b, w.c, w.d);
  EXPECT_EQ(back.master_decided, 0u);
  EXPECT_EQ(back.target_received, 0u);
  EXPECT_EQ(back.injected, t.injected);
}

TEST(TraceRecord, RecordsWithoutTheFourthWordKeepLocalControllerAtRaised) {
  const TraceRecordWords w = EncodeTraceRecord(Block());
  const transport::TraceBlock back = DecodeTraceRecord(w.a, w.b, w.c, 0);
  EXPECT_EQ(back.local_controller, back.raised);
}

TEST(TraceRecord, AnUntracedBlockIsAllZero) {
  const TraceRecordWords w = EncodeTraceRecord(transport::TraceBlock{});
  EXPECT_EQ(w.a | w.b | w.c | w.d, 0u);
  const transport::TraceBlock back = DecodeTraceRecord(0, 123, 456, 789);
  EXPECT_EQ(back.raised | back.master_received | back.injected | back.local_controller, 0u);
}

}  // namespace
}  // namespace aggvm::lab
