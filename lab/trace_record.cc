#include "lab/trace_record.h"

#include <algorithm>

namespace aggvm::lab {
namespace {

uint64_t Stamp(uint64_t raised, uint32_t delta) { return delta == kTraceRecordUnstamped ? 0 : raised + delta; }

uint64_t SinceRaised(uint64_t raised, uint64_t stamp) {
  if (stamp == 0 || stamp < raised) return kTraceRecordUnstamped;
  return std::min<uint64_t>(stamp - raised, kTraceRecordUnstamped);
}

}  // namespace

TraceRecordWords EncodeTraceRecord(const transport::TraceBlock& t) {
  TraceRecordWords w;
  if (t.raised == 0) return w;
  w.a = t.raised;
  w.b = SinceRaised(t.raised, t.master_received) | SinceRaised(t.raised, t.master_decided) << 32;
  w.c = SinceRaised(t.raised, t.target_received) | SinceRaised(t.raised, t.injected) << 32;
  w.d = SinceRaised(t.raised, t.local_controller);
  return w;
}

transport::TraceBlock DecodeTraceRecord(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  transport::TraceBlock t;
  t.raised = a;
  if (a == 0) return t;
  t.local_controller = Stamp(a, static_cast<uint32_t>(d));
  t.master_received = Stamp(a, static_cast<uint32_t>(b));
  t.master_decided = Stamp(a, static_cast<uint32_t>(b >> 32));
  t.target_received = Stamp(a, static_cast<uint32_t>(c));
  t.injected = Stamp(a, static_cast<uint32_t>(c >> 32));
  return t;
}

}  // namespace aggvm::lab
