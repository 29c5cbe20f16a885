// One-line human-readable forms of control-plane messages, shared by aggvm-master's log and aggvmctl.
#pragma once

#include <string>

#include "proto/aggvm.pb.h"

namespace aggvm::master {

/// "RUNNING" for VM_STATE_RUNNING, "UP" for NODE_HEALTH_UP (the enum name without its prefix).
std::string ShortName(v1::VmState state);
std::string ShortName(v1::NodeHealth health);

/// "node a (id 1) UP at 127.0.0.1:4000", "vm demo RUNNING", "[demo vcpu 3 @ b] hello from vCPU 3", ...
std::string DescribeEvent(const v1::Event& event);
/// A probe-guest record (guest/abi.h): "irq vector 0x44 tsc 123 seq 2", "hello apic 3 tsc 456", ...
std::string DescribeRecord(const v1::GuestRecord& record);

}  // namespace aggvm::master
