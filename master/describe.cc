#include "master/describe.h"

#include <fmt/format.h>

namespace aggvm::master {
namespace {

std::string StripPrefix(const std::string& name, std::string_view prefix) {
  return name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name;
}

}  // namespace

std::string ShortName(v1::VmState state) { return StripPrefix(v1::VmState_Name(state), "VM_STATE_"); }
std::string ShortName(v1::NodeHealth health) { return StripPrefix(v1::NodeHealth_Name(health), "NODE_HEALTH_"); }

std::string DescribeRecord(const v1::GuestRecord& r) {
  switch (r.type()) {  // guest/abi.h enum aggvm_record_type
    case 1: return fmt::format("hello apic {} tsc {}", r.a(), r.b());
    case 2: return fmt::format("irq vector {:#x} tsc {} seq {}", r.a(), r.b(), r.c());
    case 3: return fmt::format("ping round {} tsc {} -> {}", r.a(), r.b(), r.c());
    case 4: return fmt::format("error {} ({:#x}, {:#x})", r.a(), r.b(), r.c());
    case 5: return fmt::format("exit round {} tsc {} -> {}", r.a(), r.b(), r.c());
    default: return fmt::format("record type {} a={:#x} b={:#x} c={:#x}", r.type(), r.a(), r.b(), r.c());
  }
}

std::string DescribeEvent(const v1::Event& e) {
  switch (e.kind_case()) {
    case v1::Event::kNodeChanged: {
      const auto& n = e.node_changed();
      return fmt::format("node {} (id {}) {} at {}{}", n.node(), n.node_id(), ShortName(n.health()), n.control_address(),
                         n.health() == v1::NODE_HEALTH_LOST
                             ? fmt::format(", last heartbeat {} ms ago", n.last_heartbeat_ms_ago())
                             : "");
    }
    case v1::Event::kVmChanged: {
      const auto& v = e.vm_changed();
      return fmt::format("vm {} {}{}", v.name(), ShortName(v.state()), v.error().empty() ? "" : ": " + v.error());
    }
    case v1::Event::kConsole: {
      const auto& c = e.console();
      return fmt::format("[{} vcpu {} @ {}] {}", c.vm(), c.vcpu(), c.node(), c.text());
    }
    case v1::Event::kRecord: {
      const auto& r = e.record();
      return fmt::format("[{} vcpu {} @ {}] {}", r.vm(), r.vcpu(), r.node(), DescribeRecord(r));
    }
    default:
      return "(empty event)";
  }
}

}  // namespace aggvm::master
