// The trace record a node agent reports when it injects a traced interrupt (node-agent/cluster_vm_host.h,
// kTraceRecordType), and its decoding back into a transport::TraceBlock of absolute stamps.
//
// The record packs the frame's trace block into four u64: a = raised, b = (master_received - raised) |
// (master_decided - raised) << 32, c = (target_received - raised) | (injected - raised) << 32,
// d = (local_controller - raised) (high half 0), each difference a u32 of ns and 0xFFFFFFFF for a hop that was not
// stamped (or lies before `raised`). Each stamp is CLOCK_MONOTONIC of the process that took it (raising node, master,
// target node), so across machines the decoded stamps are on different clocks: map them with the nodes'
// ClockModels (lab/clock_offset.h) before they go into a HopBreakdown. Records from agents that predate `d` carry
// d = 0: local_controller then reads as `raised`.
#pragma once

#include <cstdint>

#include "transport/frame.h"

namespace aggvm::lab {

/// node-agent/cluster_vm_host.h kTraceRecordType (the agent static_asserts that the two agree).
inline constexpr uint32_t kTraceRecordType = 0x100;
/// The difference value that means "not stamped".
inline constexpr uint32_t kTraceRecordUnstamped = 0xFFFFFFFFu;

struct TraceRecordWords {
  uint64_t a = 0, b = 0, c = 0, d = 0;
};

/// The record of one trace block (raised == 0: all words 0). Never allocates (called on the injecting thread).
TraceRecordWords EncodeTraceRecord(const transport::TraceBlock& t);

/// Absolute stamps (0 = not stamped) from a trace record's four words.
transport::TraceBlock DecodeTraceRecord(uint64_t a, uint64_t b, uint64_t c, uint64_t d);

}  // namespace aggvm::lab
