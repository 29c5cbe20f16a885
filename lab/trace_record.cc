#include "lab/trace_record.h"

namespace aggvm::lab {
namespace {

uint64_t Stamp(uint64_t raised, uint32_t delta) { return delta == kTraceRecordUnstamped ? 0 : raised + delta; }

}  // namespace

transport::TraceBlock DecodeTraceRecord(uint64_t a, uint64_t b, uint64_t c) {
  transport::TraceBlock t;
  t.raised = a;
  if (a == 0) return t;
  t.local_controller = a;
  t.master_received = Stamp(a, static_cast<uint32_t>(b));
  t.master_decided = Stamp(a, static_cast<uint32_t>(b >> 32));
  t.target_received = Stamp(a, static_cast<uint32_t>(c));
  t.injected = Stamp(a, static_cast<uint32_t>(c >> 32));
  return t;
}

}  // namespace aggvm::lab
