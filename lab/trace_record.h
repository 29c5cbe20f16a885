// The trace record a node agent reports when it injects a traced interrupt (node-agent/cluster_vm_host.h,
// kTraceRecordType), decoded back into a transport::TraceBlock of absolute stamps.
//
// The record packs the frame's trace block into three u64: a = raised, b = (master_received - raised) |
// (master_decided - raised) << 32, c = (target_received - raised) | (injected - raised) << 32, each difference a u32
// of ns and 0xFFFFFFFF for a hop that was not stamped. Each stamp is CLOCK_MONOTONIC of the process that took it
// (raising node, master, target node), so across machines the decoded stamps are on different clocks: map them with
// the nodes' ClockModels (lab/clock_offset.h) before they go into a HopBreakdown. The record does not carry the
// local_controller stamp; LocalController takes it right after `raised` (node-agent/local_controller.cc), so the
// decoded block repeats `raised` there: hop raised->local_controller reads 0 and local_controller->master_received
// is the first network hop.
#pragma once

#include <cstdint>

#include "transport/frame.h"

namespace aggvm::lab {

/// node-agent/cluster_vm_host.h kTraceRecordType (the agent static_asserts that the two agree).
inline constexpr uint32_t kTraceRecordType = 0x100;
/// The difference value that means "not stamped".
inline constexpr uint32_t kTraceRecordUnstamped = 0xFFFFFFFFu;

/// Absolute stamps (0 = not stamped; local_controller = raised) from a trace record's three words.
transport::TraceBlock DecodeTraceRecord(uint64_t a, uint64_t b, uint64_t c);

}  // namespace aggvm::lab
