// A VM spec for data-plane tests that run the master's VmDataPlane without the control plane: 4 vCPUs on two nodes
// "a" (vCPUs 0, 1) and "b" (2, 3), and the topology CreateVm would give it when "a" and "b" registered as nodes 1
// and 2 (APIC ID = vCPU index). Tests add the interrupt routes, policy and transport they need.
#pragma once

#include <cstdint>
#include <string>

#include "proto/aggvm.pb.h"

namespace aggvm::testing {

inline v1::VmSpec TwoNodeDataPlaneSpec(const std::string& name) {
  v1::VmSpec spec;
  spec.set_name(name);
  spec.set_vcpus(4);
  for (int i = 0; i < 2; ++i) {
    auto* p = spec.add_placement();
    p->set_node(i == 0 ? "a" : "b");
    p->add_vcpus(2 * i);
    p->add_vcpus(2 * i + 1);
  }
  spec.mutable_image()->set_path("/nonexistent");  // not read by the data plane
  spec.set_wait_mode(v1::WAIT_MODE_EVENT);
  return spec;
}

/// Placement i runs on node id i + 1; APIC ID = vCPU index.
inline v1::Topology TopologyByPlacementOrder(const v1::VmSpec& spec) {
  v1::Topology t;
  t.set_vm(spec.name());
  for (int i = 0; i < spec.placement_size(); ++i) {
    for (uint32_t v : spec.placement(i).vcpus()) {
      auto* vp = t.add_vcpus();
      vp->set_vcpu(v);
      vp->set_node(spec.placement(i).node());
      vp->set_node_id(static_cast<uint32_t>(i + 1));
      vp->set_apic_id(v);
    }
  }
  return t;
}

}  // namespace aggvm::testing
